"""Export every model part to ONNX (fp32 or fp16 files, symbolic batch axes), each checked against PyTorch.

    from mmfast.export.onnx import export, export_clip, export_vq, export_generator
    export_clip("open_clip_dir", "out/")        # {"image": out/clip_image.onnx, "text": out/clip_text.onnx}
    export_vq(vq, "out/", parts=("decoder",))   # a loaded mmfast.VQ works as well as a path
    export_generator("pretrained/dalle_bart_mini", "out/", fp16=True)
    export("any checkpoint", "out/")            # the family found from the path (the CLI's entry)

Every `export_*` takes a checkpoint path, a loaded runtime object (`Clip`, `VQ`, `Generator`) in
fp32, or the inner fp32 module; returns {part: Path}; and ends with a parity check on ONNX Runtime
that raises with the worst difference. The graphs, their inputs and outputs (axes named in brackets
are symbolic; the rest are static per model):

- clip_image.onnx: pixels f32 [batch, 3, S, S] (normalised) -> embeddings f32 [batch, D] (not L2-normalised)
- clip_text.onnx: ids i64 [batch, length] (cut at the batch's last EOT), pool i64 [batch] (the EOT
  positions) -> embeddings f32 [batch, D]
- vq_encoder.onnx: pixels f32 [batch, 3, height, width] in the model's range -> latents f32
  [batch, embed_dim, grid_h, grid_w]
- vq_decoder.onnx: tokens i64 [batch, grid_h, grid_w] -> pixels f32 [batch, 3, height, width] (model
  range, unclamped)
- dalle_encoder.onnx: text i64 [batch, 64] -> state [batch, 64, width]
- dalle_step.onnx (opset 18): the decode step, cache in and cache out, sampling inside ->
  tokens, logits, k_cache_out, v_cache_out (see `mmfast.export.onnx_dalle`)
- dalle_step_logits.onnx: the same without the sampling inputs -> logits, k_cache_out, v_cache_out

fp16 files (`fp16=True`, named `*_fp16.onnx`) keep what the PyTorch model keeps in fp32 (VQGAN
norm statistics and last conv, DALL·E logits) and take and return fp32 at the edges except the
DALL·E caches and states, which are fp16. Each file carries `mmfast.*` metadata (family, part,
dtype, config, opset). Tokens come from the VQGAN's latents through `mmfast.kernels.nearest_code`
outside the graph (the backend does it), so the graph holds no 16384-way distance matrix.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .onnx_common import (OPSET, TOLERANCE, as_numpy, check_parity, check_parts, export_graph, file_name,
                          ort_session)
from .onnx_dalle import STEP_OPSET, export_generator  # noqa: F401  (re-exported: the entry point)
from .onnx_vqgan import export_vq  # noqa: F401

__all__ = ["OPSET", "STEP_OPSET", "export", "export_clip", "export_generator", "export_vq", "ort_sessions"]
CLIP_PARTS = ("image", "text")


class _TextGraph(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, ids: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        m = self.clip
        x = m.token_embedding(ids) + m.positional_embedding[: ids.shape[1]]
        x = m.ln_final(m.transformer(x, causal=True))
        return (x[torch.arange(ids.shape[0]), pool] @ m.text_projection).float()


class _ImageGraph(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels.to(self.clip.text_projection.dtype)).float()


def clip_module(src):
    """The fp32 `mmfast.clip.model.CLIP` of a path, a `Clip` or the module itself (a CPU copy if needed)."""
    from mmfast.clip.model import CLIP
    from mmfast.clip.runtime import Clip, load_clip

    if isinstance(src, (str, os.PathLike)):
        return load_clip(src, device="cpu", dtype="fp32").model
    if isinstance(src, Clip):
        if not isinstance(src.model, CLIP) or src.dtype != "fp32":
            raise ValueError(f"export_clip: this Clip runs {src.dtype} on {src.backend}; its fp32 weights are gone. "
                             "Export from the checkpoint path, or load it with dtype='fp32', backend='torch'")
        src = src.model
    if not isinstance(src, CLIP):
        raise TypeError(f"export_clip: expected a checkpoint path, an mmfast.Clip or a CLIP module, got "
                        f"{type(src).__name__}")
    if any(p.dtype != torch.float32 for p in src.parameters()):
        raise ValueError("export_clip needs fp32 weights (load with dtype='fp32'); int8 / bf16 towers are made "
                         "by the runtime, and fp16 files by export_clip(..., fp16=True)")
    return src if next(src.parameters()).device.type == "cpu" else copy.deepcopy(src).cpu()


def export_clip(src, out_dir, *, parts=CLIP_PARTS, fp16: bool = False, check: bool = True) -> dict[str, Path]:
    """Write `clip_image.onnx` / `clip_text.onnx` (or `*_fp16.onnx`) for a CLIP path, `Clip` or module.

    Example
    -------
    >>> paths = export_clip("open_clip_dir", "out/")                 # doctest: +SKIP
    >>> paths["image"]
    PosixPath('out/clip_image.onnx')
    """
    parts = check_parts("export_clip", parts, CLIP_PARTS)
    model = clip_module(src).eval()
    if fp16:
        model = copy.deepcopy(model).half()
    out = Path(out_dir)
    s, ctx = model.cfg.vision.image_size, model.cfg.text.context_length
    # batch 2 / length 7 examples with symbolic axes: a batch-1 example can freeze the axis to 1
    g = torch.Generator().manual_seed(0)
    px = torch.randn(2, 3, s, s, generator=g)
    ids = torch.randint(1, model.cfg.text.vocab_size, (2, min(7, ctx)), generator=g)
    pool = torch.tensor([min(6, ctx - 1), min(3, ctx - 1)])
    dtype = "fp16" if fp16 else "fp32"
    meta = {"family": "clip", "dtype": dtype, "config": dataclasses.asdict(model.cfg)}
    graphs = {"image": (_ImageGraph(model), (px,), {"pixels": {0: "batch"}}),
              "text": (_TextGraph(model), (ids, pool), {"ids": {0: "batch", 1: "length"}, "pool": {0: "batch"}})}
    paths = {}
    for part in parts:
        module, args, inputs = graphs[part]
        paths[part] = export_graph(module, args, out / file_name(part, fp16, "clip"), inputs=inputs,
                                   outputs={"embeddings": {0: "batch"}}, meta={**meta, "part": part}, check=check)
        if check:
            with torch.no_grad():
                want = as_numpy(module(*args))
            check_parity(paths[part], {k: as_numpy(a) for k, a in zip(inputs, args)}, {"embeddings": want},
                         TOLERANCE[dtype], f"CLIP {part} tower")
    return paths


def ort_sessions(paths: dict, threads: int = 0) -> dict:
    """Plain ONNX Runtime CPU sessions for exported graphs (graph optimisations on): {part: session}."""
    return {k: ort_session(p, threads) for k, p in paths.items()}


FAMILIES = {"clip": export_clip, "vq": export_vq, "dalle": export_generator}


def detect_family(src) -> str:
    """"clip", "vq" or "dalle" for a runtime object, module or checkpoint path (by its files)."""
    from mmfast.clip.model import CLIP
    from mmfast.clip.runtime import Clip
    from mmfast.dalle.generate import Generator
    from mmfast.vqgan.model import VQGAN
    from mmfast.vqgan.runtime import VQ

    for kinds, fam in (((Clip, CLIP), "clip"), ((VQ, VQGAN), "vq"), ((Generator, tuple), "dalle")):
        if isinstance(src, kinds):
            return fam
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"export: {str(p)!r} does not exist")
    names = {q.name for q in p.iterdir()} if p.is_dir() else {p.name}
    if (any(n in names for n in ("encoder.pt", "encoder.safetensors"))
            and any(n in names for n in ("decoder.pt", "decoder.safetensors"))) or any(n.startswith("dalle_bart_") for n in names):
        return "dalle"
    if p.suffix in (".ckpt", ".yaml") or p.name == "detoker.pt" or names & {"detoker.pt", "vqgan", "ckpts", "model.yaml",
                                                                             "checkpoints", "last.ckpt"}:
        return "vq"
    return "clip"


def export(src, out_dir, *, family: str | None = None, parts=None, fp16: bool = False,
           check: bool = True) -> dict[str, Path]:
    """Export any model part: `family` ("clip", "vq", "dalle") is found from `src` unless given;
    `parts` defaults to the family's usual parts (see each `export_*`)."""
    family = family or detect_family(src)
    if family not in FAMILIES:
        raise ValueError(f"export: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    kw = {} if parts is None else {"parts": parts}
    return FAMILIES[family](src, out_dir, fp16=fp16, check=check, **kw)
