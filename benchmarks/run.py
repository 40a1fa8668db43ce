"""Entry point: `python -m benchmarks.run <suite> [--quick] [--tag cpu]`.

Suites live in benchmarks/suites/<suite>.py and expose `cases(args) -> Iterable[Case]` (a
generator is fine: each case is measured and printed as soon as it is built, and its inputs can be
freed before the next one).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil

from . import harness, suites


def main(argv=None) -> None:
    names = [m.name for m in pkgutil.iter_modules(suites.__path__)]
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("suite", choices=names)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tag", default="cpu", help="results file suffix, e.g. cpu or h100")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--only", default="", help="run only cases whose op or shape contains this")
    args = ap.parse_args(argv)
    mod = importlib.import_module(f"benchmarks.suites.{args.suite}")
    print("machine:", harness.machine())
    all_rows = []
    for case in mod.cases(args):
        if args.only and args.only not in case.op and args.only not in case.shape:
            continue
        rows = harness.measure(case, repeats=2 if args.quick else args.repeats)
        harness.print_rows(rows)
        all_rows += rows
    if not args.no_save and not args.quick:
        print("wrote", harness.save_rows(args.suite, all_rows, args.tag))


if __name__ == "__main__":
    main()
