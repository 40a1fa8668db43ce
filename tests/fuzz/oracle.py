"""The property every fuzz case checks, and the counts the report is made of.

A call into mmfast may end in one of two acceptable ways:

- "ok": it returned, and the result equals the reference (the `check` callable raises
  AssertionError otherwise: a *silent wrong answer*);
- "error": it raised a documented mmfast error: ValueError, TypeError or FileNotFoundError (or a
  subclass), raised by mmfast's own code (the innermost frame is in the mmfast package), whose
  message names the argument or the file (one of `names`).

Everything else is "bad": an exception of another type or raised from inside a third-party library
("raw": SafetensorError, PIL's OSError, torch's RuntimeError, an UnpicklingError, a ValueError that
numpy raised ...), a documented type whose message names nothing the caller passed ("unnamed"), a
wrong result ("wrong"), or a crash-like end (MemoryError, RecursionError, an unexpected SystemExit,
or more than HANG_S seconds: "crash" / "hang"). A bad case fails the test (hypothesis then shrinks it).
"""
from __future__ import annotations

import collections
import os
import signal
import time
import traceback

import mmfast
import mmfast.kernels

HANG_S = 30.0
DOCUMENTED = (ValueError, TypeError, FileNotFoundError)
_OWN_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (mmfast, mmfast.kernels))

# entry point -> Counter(cases, ok, error, raw, unnamed, wrong, crash, hang), and seconds spent in the calls
COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
SECONDS: dict[str, float] = collections.defaultdict(float)
BAD_KINDS = ("raw", "unnamed", "wrong", "crash", "hang")


class Hang(BaseException):
    pass


def _on_alarm(signum, frame):
    raise Hang(f"no answer after {HANG_S} s")


def _raised_by_mmfast(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OWN_DIRS)


def classify(e: BaseException, names) -> str:
    """"error", or the kind of bad outcome, for an exception raised by a call given `names`."""
    if isinstance(e, Hang):
        return "hang"
    if isinstance(e, (MemoryError, RecursionError, SystemExit, KeyboardInterrupt)) or not isinstance(e, Exception):
        return "crash"
    if not isinstance(e, DOCUMENTED) or not _raised_by_mmfast(e) or type(e).__module__ != "builtins":
        return "raw"
    msg = str(e)
    return "error" if any(str(n) in msg for n in names if n is not None and str(n)) else "unnamed"


def run_case(entry: str, call, *, names, check=None, allow=()):
    """Run `call()` as one case of `entry`; return ("ok", result) or ("error", exception).

    names : strings one of which a documented error's message must contain (the argument's name,
        the file's path or name).
    check : check(result) raises AssertionError when the result differs from the reference.
    allow : extra (exception type, predicate) pairs that are documented for this entry point (the CLI's
        exits, for instance): an exception of that type for which predicate(exception) is true.
    Any bad outcome is counted, then raised as an AssertionError describing it.
    """
    counts = COUNTS[entry]
    counts["cases"] += 1
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    t0 = time.perf_counter()
    try:
        try:
            result = call()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            SECONDS[entry] += time.perf_counter() - t0
    except BaseException as e:  # noqa: BLE001 - classifying every way out is the point
        if any(isinstance(e, t) and ok(e) for t, ok in allow):
            kind = "error"
        else:
            kind = classify(e, names)
        counts[kind] += 1
        if kind != "error":
            tb = "".join(traceback.format_exception(e)[-6:])
            raise AssertionError(f"{entry}: {kind} outcome {type(e).__module__}.{type(e).__name__}: "
                                 f"{str(e)[:500]}\n(names expected: {list(names)[:4]})\n{tb}") from None
        return "error", e
    if check is not None:
        try:
            check(result)
        except AssertionError as e:
            counts["wrong"] += 1
            raise AssertionError(f"{entry}: silent wrong answer: {e}") from None
    counts["ok"] += 1
    return "ok", result
