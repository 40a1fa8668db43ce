"""VQGAN to ONNX: the encoder (pixels -> pre-quantisation latents) and the decoder (tokens -> pixels).

The encoder stops at the latents: tokens are `mmfast.kernels.nearest_code` of them (or the Gumbel
projection's argmax), run by the backend outside the graph, so no [pixels, 16384] distance matrix
is materialised in ONNX. The decoder starts from int64 tokens: the codebook gather is inside.
Both are traced from an fp32 (or fp16) copy in the contiguous layout, upsamples folded into
stride-2 transposed convolutions as in PyTorch; height and width are symbolic like the batch.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .onnx_common import TOLERANCE, as_numpy, check_parity, check_parts, export_graph, file_name

VQ_PARTS = ("encoder", "decoder")


class _EncoderGraph(nn.Module):
    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vq.encode_latents(pixels).float()            # (B, embed_dim, H/f, W/f)


class _DecoderGraph(nn.Module):
    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vq.decode(tokens).float()                   # (B, 3, h*f, w*f)


def vq_module(src, fp16: bool = False):
    """A CPU copy of the VQGAN of a path, `VQ` or module, prepared in fp32 (fp16) without channels-last."""
    from mmfast.vqgan.model import VQGAN
    from mmfast.vqgan.runtime import VQ, load_vq

    if isinstance(src, (str, os.PathLike)):
        src = load_vq(src, device="cpu", dtype="fp32")
    if isinstance(src, VQ):
        if src.dtype != "fp32" or not isinstance(src.model, VQGAN):
            raise ValueError(f"export_vq: this VQ runs {src.dtype} ({type(src.model).__name__}); its fp32 weights "
                             "are gone. Export from the checkpoint path, or load it with dtype='fp32'")
        src = src.model
    if not isinstance(src, VQGAN):
        raise TypeError(f"export_vq: expected a checkpoint path, an mmfast.VQ or a VQGAN module, got "
                        f"{type(src).__name__}")
    if any(p.dtype != torch.float32 for p in src.parameters()):
        raise ValueError("export_vq needs fp32 weights (load with dtype='fp32'); fp16 files come from "
                         "export_vq(..., fp16=True)")
    m = copy.deepcopy(src).cpu().to(memory_format=torch.contiguous_format)
    return m.prepare(torch.float16 if fp16 else torch.float32, channels_last=False)


def export_vq(src, out_dir, *, parts=None, fp16: bool = False, check: bool = True) -> dict[str, Path]:
    """Write `vq_encoder.onnx` and `vq_decoder.onnx` (or `*_fp16.onnx`) for a VQGAN path, `VQ` or module.

    parts : subset of ("encoder", "decoder"); default both (the decoder only for decoder-only files
        such as min-dalle's detoker.pt).

    Example
    -------
    >>> paths = export_vq("vqgan_imagenet_f16_16384/ckpts/last.ckpt", "out/")   # doctest: +SKIP
    >>> sorted(paths)
    ['decoder', 'encoder']
    """
    model = vq_module(src, fp16)
    cfg = model.cfg
    if parts is None:
        parts = VQ_PARTS if cfg.has_encoder else ("decoder",)
    parts = check_parts("export_vq", parts, VQ_PARTS)
    if "encoder" in parts and not cfg.has_encoder:
        raise ValueError("export_vq: this checkpoint has no encoder (min-dalle's detoker.pt is decoder-only); "
                         "export parts=('decoder',)")
    f, out, dtype = cfg.factor, Path(out_dir), "fp16" if fp16 else "fp32"
    g = torch.Generator().manual_seed(0)
    lo, hi = cfg.output_range
    # batch 2, a non-square 3 x 4 grid: every axis named below must come out symbolic
    px = lo + (hi - lo) * torch.rand(2, 3, 3 * f, 4 * f, generator=g)
    tokens = torch.randint(0, cfg.n_embed, (2, 3, 4), generator=g)
    meta = {"family": "vq", "dtype": dtype, "config": dataclasses.asdict(cfg)}
    graphs = {
        "encoder": (_EncoderGraph(model), px, "pixels", {0: "batch", 2: "height", 3: "width"},
                    "latents", {0: "batch", 2: "grid_h", 3: "grid_w"}),
        "decoder": (_DecoderGraph(model), tokens, "tokens", {0: "batch", 1: "grid_h", 2: "grid_w"},
                    "pixels", {0: "batch", 2: "height", 3: "width"}),
    }
    paths = {}
    for part in parts:
        module, x, iname, iaxes, oname, oaxes = graphs[part]
        paths[part] = export_graph(module, (x,), out / file_name(part, fp16, "vq"), inputs={iname: iaxes},
                                   outputs={oname: oaxes}, meta={**meta, "part": part}, check=check)
        if check:
            with torch.no_grad():
                want = as_numpy(module(x))
            check_parity(paths[part], {iname: as_numpy(x)}, {oname: want}, TOLERANCE[dtype], f"VQGAN {part}")
    return paths
