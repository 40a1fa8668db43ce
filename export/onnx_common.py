"""What every ONNX export shares: trace with the reference kernels, check the graph, compare with PyTorch.

`export_graph` writes one graph (opset 17 unless told otherwise; external data only past the 2 GB
protobuf limit), stamps `mmfast.*` metadata into it, runs `onnx.checker` with shape inference and
makes sure every declared batch axis stayed symbolic. `check_parity` runs the file on ONNX Runtime
and raises with the worst difference.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

OPSET = 17                     # GroupNorm lowers to InstanceNormalization + Reshape (opset 18's op is mis-specified)
PROTOBUF_LIMIT = 2 ** 31 - 1   # one protobuf message; bigger models keep their weights in `<file>.data`
# Parity: max |ORT - torch| / max(1, max |torch|) per output (a relative error for outputs far above 1).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


def ort_import():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("ONNX Runtime is not installed; pip install 'mmfast[onnx]'") from None
    return onnxruntime


@contextlib.contextmanager
def reference_kernels():
    """Trace `mmfast.kernels` ops through their PyTorch references: the C++ and Triton kernels are
    opaque calls the tracer cannot see into. (Other threads running kernels meanwhile take the
    reference too: slower, same results.)"""
    old = os.environ.get("MMFAST_KERNELS")
    os.environ["MMFAST_KERNELS"] = "ref"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MMFAST_KERNELS", None)
        else:
            os.environ["MMFAST_KERNELS"] = old


@contextlib.contextmanager
def _symbolics(opset: int):
    """BitwiseXor for int64 at opset >= 18 (the TorchScript exporter has And but refuses Xor)."""
    if opset < 18:
        yield
        return
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    def xor(g, a, b):
        return g.op("BitwiseXor", a, b)

    names = ("aten::bitwise_xor", "aten::__xor_")
    for n in names:
        register_custom_op_symbolic(n, xor, opset)
    try:
        yield
    finally:
        for n in names:
            unregister_custom_op_symbolic(n, opset)


@contextlib.contextmanager
def _plain_attention(enabled: bool):
    """Trace F.scaled_dot_product_attention as matmul / softmax in fp32 around 16-bit q, k, v: the
    exporter's own SDPA turns a boolean mask into an fp32 bias and returns fp32 from fp16 inputs,
    which breaks the graph's types."""
    if not enabled:
        yield
        return
    import torch.nn.functional as F

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        s = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if is_causal:
            T = q.shape[-2]
            attn_mask = torch.ones(T, T, dtype=torch.bool).tril()
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def check_parts(fn: str, parts, valid: tuple[str, ...]) -> tuple[str, ...]:
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    bad = [p for p in parts if p not in valid]
    if bad or not parts:
        raise ValueError(f"{fn}: unknown part(s) {bad or parts!r}; valid parts: {', '.join(valid)}")
    return parts


def file_name(part: str, fp16: bool, prefix: str) -> str:
    return f"{prefix}_{part}{'_fp16' if fp16 else ''}.onnx"


def export_graph(module: torch.nn.Module, args: tuple, path: Path, *, inputs: dict, outputs: dict,
                 meta: dict, opset: int = OPSET, check: bool = True) -> Path:
    """Trace `module(*args)` to `path`. `inputs` / `outputs`: name -> {axis: symbolic name}, in order.

    Atomic: the graph is traced, stamped and checked in a hidden staging folder beside `path`, then
    moved over it (`mmfast._atomic.replace_with_sidecar`), so a failed or killed export leaves the
    previous graph in place."""
    from mmfast._atomic import replace_with_sidecar, staging_dir

    path = Path(path)
    axes = {k: v for k, v in {**inputs, **outputs}.items() if v}
    half = any(p.dtype == torch.float16 for p in module.parameters())
    with staging_dir(path.parent, path.name) as stage:
        tmp = stage / path.name  # the final name: external data is referenced by it
        with warnings.catch_warnings(), torch.no_grad(), reference_kernels(), _symbolics(opset), \
                _plain_attention(half):
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), args, str(tmp), input_names=list(inputs), output_names=list(outputs),
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        import onnx

        model = onnx.load(str(tmp), load_external_data=False)
        external = _external_files(model)
        if external:  # the exporter writes one file per tensor past 2 GB: gather them into <file>.data
            onnx.load_external_data_for_model(model, str(stage))
            for f in external:
                (stage / f).unlink(missing_ok=True)
        for k, v in {**meta, "opset": opset}.items():
            model.metadata_props.add(key=f"mmfast.{k}", value=v if isinstance(v, str) else json.dumps(v))
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        if check:
            check_graph(tmp, inputs)
        replace_with_sidecar(tmp, path)
    return path


def _external_files(model) -> list[str]:
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


def check_graph(path: Path, inputs: dict) -> None:
    """onnx.checker (full check: shape inference too), then every declared input axis is symbolic."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
    for name, ax in inputs.items():
        for a, label in (ax or {}).items():
            d = dims[name][a]
            if not d.dim_param:
                raise RuntimeError(f"{path.name}: input {name!r} axis {a} ({label}) was frozen to {d.dim_value} by "
                                   "the exporter; it must stay symbolic (export with a batch >= 2)")


def ort_session(path, threads: int = 0, providers=None):
    """A plain ONNX Runtime session (all graph optimisations) for parity checks and tools."""
    ort = ort_import()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])


def worst(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|): absolute near unit scale, relative above it."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max(initial=0.0) / max(1.0, np.abs(want).max(initial=0.0)))


def check_parity(path: Path, feeds: dict, want: dict, tol: float, what: str, session=None) -> dict:
    """Run `path` on ORT with `feeds`; raise if an output in `want` differs by more than `tol`."""
    sess = session or ort_session(path)
    names = list(want)
    got = dict(zip(names, sess.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})))
    errs = {n: worst(got[n], want[n]) for n in names}
    bad = {n: e for n, e in errs.items() if not e <= tol}
    if bad:
        n, e = max(bad.items(), key=lambda kv: kv[1])
        raise RuntimeError(f"ONNX {what} ({Path(path).name}) differs from PyTorch: output {n!r} worst "
                           f"difference {e:.3g} (> {tol:.0e}; scaled by max(1, max |torch|)); all: "
                           + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))
    return errs


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()
