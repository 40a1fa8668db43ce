"""Export CLIP towers to ONNX (fp32, dynamic batch and text length), then check parity with ORT.

    from mmfast.export.onnx import export_clip
    paths = export_clip(clip.model, "out/")   # {"image": out/clip_image.onnx, "text": out/clip_text.onnx}

The text graph takes `ids` [B, T] already cut at the batch's longest EOT position and `pool`
[B] (the EOT positions), so the runtime's exact truncation carries over to ONNX Runtime.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17


class _TextGraph(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, ids: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        m = self.clip
        x = m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]]
        x = m.ln_final(m.transformer(x, causal=True))
        return x[torch.arange(ids.shape[0]), pool] @ m.text_projection


class _ImageGraph(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)


def export_clip(model, out_dir, *, check: bool = True, atol: float = 1e-4) -> dict[str, Path]:
    """Write `clip_image.onnx` and `clip_text.onnx` for an fp32 `mmfast.clip.model.CLIP`."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("export_clip needs an fp32 model (load with dtype='fp32'); int8/bf16 towers "
                         "are quantized by the runtime, not exported")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s, ctx = model.cfg.vision.image_size, model.cfg.text.context_length
    # batch 2 / length 7 examples with symbolic axes: a batch-1 example can freeze the axis to 1
    px = torch.randn(2, 3, s, s)
    ids = torch.randint(1, model.cfg.text.vocab_size, (2, min(7, ctx)))
    pool = torch.tensor([min(6, ctx - 1), min(3, ctx - 1)])
    paths = {"image": out / "clip_image.onnx", "text": out / "clip_text.onnx"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_ImageGraph(model).eval(), (px,), str(paths["image"]), input_names=["pixels"],
                          output_names=["embeddings"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"pixels": {0: "batch"}, "embeddings": {0: "batch"}})
        torch.onnx.export(_TextGraph(model).eval(), (ids, pool), str(paths["text"]),
                          input_names=["ids", "pool"], output_names=["embeddings"], opset_version=OPSET,
                          dynamo=False, dynamic_axes={"ids": {0: "batch", 1: "length"}, "pool": {0: "batch"},
                                                      "embeddings": {0: "batch"}})
    if check:
        sess = ort_sessions(paths)
        with torch.no_grad():
            want_i = model.encode_image(px).numpy()
            want_t = _TextGraph(model)(ids, pool).numpy()
        got_i = sess["image"].run(None, {"pixels": px.numpy()})[0]
        got_t = sess["text"].run(None, {"ids": ids.numpy(), "pool": pool.numpy()})[0]
        for name, got, want in (("image", got_i, want_i), ("text", got_t, want_t)):
            err = float(np.abs(got - want).max())
            if err > atol:
                raise RuntimeError(f"ONNX {name} tower differs from PyTorch by {err:.2e} (> {atol:.0e})")
    return paths


def ort_sessions(paths: dict, threads: int = 0) -> dict:
    """ONNX Runtime CPU sessions for the exported towers (graph optimisations on)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError("ONNX Runtime is not installed; pip install 'mmfast[onnx]'") from None
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    return {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
