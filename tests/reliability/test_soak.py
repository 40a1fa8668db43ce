"""Soak: many calls of each hot entry point in one process; resident memory stays flat after warm-up.

CI runs 300 calls per entry point (60 of the generator's); `MMFAST_RELIABILITY_SCALE=1` (or tools/reliability_report.py)
runs the issue's 10,000, whose figures are in benchmarks/results/reliability-cpu.jsonl.
"""
import sys

import pytest

from tests.reliability import workload

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


@pytest.mark.parametrize("name", workload.ENTRY_POINTS)
def test_rss_is_flat_after_warmup(models, name):
    r = workload.soak(models, name)
    assert r["rss_growth_pct"] < 5.0, r
    # a tighter bound than the 5% of a ~400 MB process: a leak of 2 KB a call shows here
    assert r["rss_growth_bytes_per_call"] < 2048, r
