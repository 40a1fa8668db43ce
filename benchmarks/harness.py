"""The one benchmark harness: interleaved timing of mmfast and its peers in the same process,
ratios against a named baseline, achieved GB/s and TFLOP/s, rows appended to benchmarks/results/.

A suite (benchmarks/suites/<name>.py) defines `cases(args) -> list[Case]`; each Case is one
(op, shape, dtype) measured once per provider. Providers of the same case are timed round-robin
(A B C A B C ...) so that the noise of this shared machine hits them alike.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


@dataclasses.dataclass
class Provider:
    name: str                      # "mmfast", "open_clip eager fp32", "faiss IndexFlatIP", ...
    fn: Callable[[], object]       # one timed call; must synchronise itself if it runs on a GPU
    dtype: str = ""                # storage / compute dtype it runs in
    quality: dict = dataclasses.field(default_factory=dict)  # e.g. {"cosine_min": 0.9995}


@dataclasses.dataclass
class Case:
    op: str                        # "clip.encode_images", "similarity_topk", ...
    shape: str                     # human-readable shape, e.g. "B=32 224x224"
    providers: list[Provider]
    baseline: str                  # provider name the ratios are taken against
    items: float = 0.0             # items per call (images, queries, tokens) -> items/s
    bytes: float = 0.0             # bytes a call must move at least -> GB/s
    flops: float = 0.0             # FLOPs per call -> TFLOP/s
    extra: dict = dataclasses.field(default_factory=dict)
    # Calls per provider turn; with block > 1 the first call of each turn is untimed. For engines that
    # keep their own spinning thread pools (ONNX Runtime, OpenMP): A B A B single calls would time each
    # one against the other's still-spinning threads, which no deployment running one engine sees.
    block: int = 1


def machine() -> dict:
    """Name the machine a row was measured on: CPU model, family / model numbers (a bare "AMD EPYC"
    says nothing about the generation), and the vector extensions that pick code paths."""
    cpu = platform.processor() or platform.machine()
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if key.strip() == "flags":
                break
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    isa = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx512_fp16")
           if f in fields.get("flags", "").split()]
    info = {"host_cpu": cpu, "isa": isa, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("mmfast", "open_clip", "transformers", "onnxruntime", "faiss", "triton", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            pass
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(case: Case, *, warmup: int = 1, repeats: int = 5, min_seconds: float = 0.0) -> list[dict]:
    """Time every provider of `case` round-robin; return one row per provider."""
    for p in case.providers:
        for _ in range(warmup):
            p.fn()
    _sync()
    times: dict[str, list[float]] = {p.name: [] for p in case.providers}
    start = time.perf_counter()
    r = 0
    load = os.getloadavg()[0]
    while r < repeats or time.perf_counter() - start < min_seconds:
        for p in case.providers:
            if case.block > 1:
                p.fn()                                        # untimed: this engine's threads wake up
                _sync()
            for _ in range(max(1, case.block - 1)):
                t0 = time.perf_counter()
                p.fn()
                _sync()
                times[p.name].append(time.perf_counter() - t0)
        r += 1
    base = statistics.median(times[case.baseline]) if case.baseline in times else None
    rows = []
    for p in case.providers:
        ts = sorted(times[p.name])
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        p50 = statistics.median(ts)
        row = {
            "op": case.op, "provider": p.name, "shape": case.shape, "dtype": p.dtype,
            "p50_ms": p50 * 1e3, "p20_ms": q(0.2) * 1e3, "p80_ms": q(0.8) * 1e3, "n": len(ts),
            "speedup_vs_baseline": (base / p50) if base else None, "baseline": case.baseline,
            "load_1m": round(load, 2),                       # the machine's 1-minute load when the case began
        }
        if case.items:
            row["items_per_s"] = case.items / p50
        if case.bytes:
            row["GB_per_s"] = case.bytes / p50 / 1e9
        if case.flops:
            row["TFLOP_per_s"] = case.flops / p50 / 1e12
        row.update(p.quality)
        row.update(case.extra)
        rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    cols = ["op", "shape", "provider", "dtype", "p50_ms", "speedup_vs_baseline", "items_per_s",
            "GB_per_s", "TFLOP_per_s"]
    extra = sorted({k for r in rows for k in r} - set(cols) - {"p20_ms", "p80_ms", "n", "baseline"})
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    print(" | ".join(cols + extra))
    for r in rows:
        print(" | ".join(fmt(r.get(c)) for c in cols + extra))


def save_rows(suite: str, rows: list[dict], tag: str = "cpu") -> Path:
    """Append rows (with machine, versions and time) to benchmarks/results/<suite>-<tag>.jsonl."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{suite}-{tag}.jsonl"
    stamp = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "machine": machine(), "versions": versions()}
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps({**r, **stamp}) + "\n")
    return path
