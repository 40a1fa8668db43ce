"""Property-based fuzzing of mmfast's public entry points (issue 10).

Profiles (env MMFAST_FUZZ_PROFILE): "ci" (default: fixed seed, EXAMPLES cases per entry point, the
whole folder in a few minutes on 2 vCPUs) and "long" (20x as many, for benchmark-style runs).
MMFAST_FUZZ_REPORT=1 appends one JSON row per entry point (cases, outcome counts, seconds) to
benchmarks/results/fuzz-cpu.jsonl, with the CPU model, the profile and the date.
"""
import datetime
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.fuzz import oracle

PROFILE = os.environ.get("MMFAST_FUZZ_PROFILE", "ci")
EXAMPLES = {"ci": 1000, "long": 20000}
_common = dict(deadline=None, database=None, print_blob=True, derandomize=True,
               suppress_health_check=list(HealthCheck))
settings.register_profile("ci", max_examples=EXAMPLES["ci"], **_common)
settings.register_profile("long", max_examples=EXAMPLES["long"], **_common)
settings.register_profile("dev", max_examples=100, **_common)  # a quick look while writing a fuzzer
settings.load_profile(PROFILE)

_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "fuzz-cpu.jsonl"
_start = time.perf_counter()


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_run_on_one_thread():
    # tiny models lose more to thread hand-offs than they gain on a busy 2-vCPU machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _rows():
    wall = time.perf_counter() - _start
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {"suite": "fuzz", "profile": PROFILE, "date": now, "cpu": _cpu_name(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "folder_wall_s": round(wall, 1)}
    for entry in sorted(oracle.COUNTS):
        c = oracle.COUNTS[entry]
        yield {**common, "entry": entry, "cases": c["cases"], "ok": c["ok"], "documented_error": c["error"],
               "raw_exception": c["raw"], "unnamed_error": c["unnamed"], "silent_wrong": c["wrong"],
               "crash": c["crash"] + c["hang"], "seconds": round(oracle.SECONDS[entry], 2)}


def pytest_terminal_summary(terminalreporter):
    if not oracle.COUNTS:
        return
    rows = list(_rows())
    tr = terminalreporter
    tr.section(f"mmfast fuzz ({PROFILE} profile), {rows[0]['folder_wall_s']} s since tests/fuzz was collected")
    tr.write_line(f"{'entry point':<34}{'cases':>7}{'ok':>7}{'error':>7}{'raw':>5}{'unnamed':>8}{'wrong':>6}"
                  f"{'crash':>6}{'s':>8}")
    for r in rows:
        tr.write_line(f"{r['entry']:<34}{r['cases']:>7}{r['ok']:>7}{r['documented_error']:>7}"
                      f"{r['raw_exception']:>5}{r['unnamed_error']:>8}{r['silent_wrong']:>6}{r['crash']:>6}"
                      f"{r['seconds']:>8}")
    if os.environ.get("MMFAST_FUZZ_REPORT") == "1":
        _RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(_RESULTS, "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tr.write_line(f"appended {len(rows)} rows to {_RESULTS}")
