"""Issue 10's reliability figures at full scale, as rows in benchmarks/results/reliability-cpu.jsonl.

    python tools/reliability_report.py                 # 8 threads x 1000 mixed calls, 10,000 calls per entry point
    python tools/reliability_report.py --calls 200 --soak 2000 --no-save    # a smaller, unsaved run

Rows (each with the machine, CPU model named, versions and time, as every benchmark row):
- op "reliability.threads": threads x calls mixed calls on one Clip / VQ / Generator / SimilarityIndex;
  `failures` = calls whose result is not bit for bit the serial call's (or that raised).
- op "reliability.index_snapshots": searches racing adds on one index; `inconsistent` = answers that
  no number of whole adds gives, `went_back` = a thread seeing fewer adds than before.
- op "reliability.soak", one per entry point: RSS after warm-up and after `calls` more calls.
- op "reliability.sanitizers": the report count of the last tools/sanitize.sh run, when its output exists.

The workloads are tests/reliability/workload.py's, which the CI tests run at a smaller size.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from tests.reliability import workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--calls", type=int, default=1000, help="mixed calls per thread")
    ap.add_argument("--soak", type=int, default=10_000, help="calls per entry point after warm-up")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (1: the service's threads are the parallelism)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    print("machine:", harness.machine(), flush=True)
    m = workload.build()
    modes = {"clip": m.clip.dtype, "vq": m.vq.dtype, "generator": m.gen.mode, "index": "fp16 + int8 prefilter"}
    rows = []

    want = workload.serial_results(m)
    r = workload.run_threads(m, want, threads=args.threads, calls=args.calls)
    rows.append({"op": "reliability.threads", "provider": "mmfast", "shape": f"{args.threads} threads x {args.calls} "
                 "mixed calls", "dtype": ", ".join(f"{k} {v}" for k, v in modes.items()), "failures": len(r["failures"]),
                 "calls": r["calls"], "seconds": r["seconds"], "entry_points": list(workload.ENTRY_POINTS),
                 "failure_examples": [list(map(str, f)) for f in r["failures"][:5]]})
    print(rows[-1], flush=True)

    s = workload.index_snapshots(n_adds=100, searchers=args.threads)
    rows.append({"op": "reliability.index_snapshots", "provider": "mmfast", "shape": f"{args.threads} searchers, "
                 "100 adds x 40 rows", "dtype": "fp16 + int8 prefilter", **{k: v for k, v in s.items() if k != "errors"},
                 "errors": len(s["errors"])})
    print(rows[-1], flush=True)

    for name in workload.ENTRY_POINTS:
        r = workload.soak(m, name, calls=args.soak, warmup=args.warmup)
        rows.append({"op": "reliability.soak", "provider": name, "shape": f"{args.soak} calls after {args.warmup}",
                     "dtype": modes[{"Clip": "clip", "VQ": "vq", "Generator": "generator",
                                     "SimilarityIndex": "index"}[name.split(".")[0]]], **r})
        print(rows[-1], flush=True)

    san = ROOT / "benchmarks" / "results" / "sanitizers-cpu.txt"
    if san.exists():
        text = san.read_text(errors="replace")
        count = re.findall(r"^sanitizer reports: (\d+)", text, re.M)
        summary = re.findall(r"^=*\s*(\d+ passed.*?)\s*=*$", text, re.M)
        date = re.findall(r"^date: (\S+)", text, re.M)
        rows.append({"op": "reliability.sanitizers", "provider": "mmfast._C ASan+UBSan", "shape": "tests/kernels",
                     "dtype": "", "reports": int(count[-1]) if count else None,
                     "tests": summary[-1] if summary else None, "run": date[-1] if date else None,
                     "log": str(san.relative_to(ROOT))})
        print(rows[-1], flush=True)

    if not args.no_save:
        print("wrote", harness.save_rows("reliability", rows))
    bad = rows[0]["failures"] + s["inconsistent"] + s["went_back"] + len(s["errors"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
