"""What an exported ONNX file promises: its checked signature and its content hash.

TensorRT profiles and Triton model configs are both written from these, never from names typed
by hand, so they follow whatever `mmfast.export.onnx` produces.

    from mmfast.export.graph import check_onnx, signature
    check_onnx("out/clip_text.onnx")                  # onnx.checker + strict shape inference
    signature("out/clip_text.onnx").inputs[0]         # Tensor(name='ids', dtype='int64', dims=('batch', 'length'))
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# ONNX TensorProto element types -> numpy-style names (the ones mmfast's exports use, and a few more).
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
           10: "float16", 11: "float64", 16: "bfloat16"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str                          # "float32", "int64", ... (see _DTYPES)
    dims: tuple[int | str | None, ...]  # int: fixed; str: symbolic (dim_param); None: unknown


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def names(self) -> tuple[set[str], set[str]]:
        return {t.name for t in self.inputs}, {t.name for t in self.outputs}


def _load(model):
    import onnx
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist; export it first (mmfast.export.onnx)")
    return onnx.load(str(path), load_external_data=False)  # the graph only: weights are not needed


def _tensor(vi) -> Tensor:
    tt = vi.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return Tensor(vi.name, _DTYPES.get(tt.elem_type, f"onnx:{tt.elem_type}"), dims)


def signature(model) -> Signature:
    """Graph inputs (initializers excluded) and outputs of an ONNX file or `onnx.ModelProto`."""
    m = _load(model)
    weights = {t.name for t in m.graph.initializer}
    return Signature(tuple(_tensor(v) for v in m.graph.input if v.name not in weights),
                     tuple(_tensor(v) for v in m.graph.output))


def check_onnx(path) -> Signature:
    """`onnx.checker` with strict shape inference on the file (external data included); its signature.

    Raises `onnx.checker.ValidationError` / `onnx.shape_inference.InferenceError` naming the node.
    """
    import onnx
    path = Path(path)
    _load(path)  # the clear FileNotFoundError
    onnx.checker.check_model(str(path), full_check=True)
    return signature(path)


def onnx_digest(path) -> str:
    """sha256 of the ONNX file and of every external-data file it names (the weights are the model)."""
    path = Path(path)
    m = _load(path)
    h = hashlib.sha256()
    files = [path] + sorted({path.parent / e.value for t in m.graph.initializer for e in t.external_data
                             if e.key == "location"})
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weight_dtypes(model) -> set[str]:
    """dtype names of the graph's initializers: {"float16", ...} marks an fp16 export."""
    return {_DTYPES.get(t.data_type, f"onnx:{t.data_type}") for t in _load(model).graph.initializer}


def onnx_config(model) -> dict:
    """The model config mmfast's exports stamp into the file (`mmfast.config` metadata), as a dict."""
    meta = {p.key: p.value for p in _load(model).metadata_props}
    if "mmfast.config" not in meta:
        raise ValueError(f"{model} carries no mmfast.config metadata: export it with mmfast.export.onnx")
    return json.loads(meta["mmfast.config"])
