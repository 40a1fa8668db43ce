"""int8 linear layers for CPUs with AVX-512 VNNI: weights int8 per output channel, activations
quantized per call (dynamic, per tensor), int32 accumulation, fp32 in and out.

The GEMM is fbgemm's (through torch's `quantized::linear_dynamic`), which uses VNNI's 4-way int8
dot products: about 3x fp32 throughput on this class of CPU. Everything around the linears
(LayerNorm, softmax attention, residual stream) stays fp32, which is why embeddings stay within
cosine 0.999 of fp32; `mmfast.clip` checks that on the loaded weights before choosing this mode.

The CPU feature checks and device resolution that every family's dtype="auto" rests on live here too.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn


@functools.cache
def cpu_flags() -> frozenset:
    """The x86 feature flags of this CPU (empty where /proc/cpuinfo does not exist)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_device(device) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else must name a usable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu' or 'cuda'") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'")
    return d


def has_vnni() -> bool:
    return "avx512_vnni" in cpu_flags() or "avx_vnni" in cpu_flags()


def has_fast_bf16() -> bool:
    """Native bf16 dot products (AVX512_BF16 on Zen 4 / Cooper Lake, AMX on Sapphire Rapids)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


class Int8Linear(nn.Module):
    """Drop-in for an fp32 nn.Linear at inference; holds only the packed int8 weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        bias = None if linear.bias is None else linear.bias.detach().float()
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).double()  # symmetric, per out channel
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks quantized tensors for removal after 2.13 (pinned)
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Without VNNI, fbgemm's 16-bit intermediate sums can saturate unless activations use 7 bits.
        self._reduce_range = not has_vnni()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, self._reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears_int8(module: nn.Module) -> nn.Module:
    """Replace every nn.Linear under `module` (in place) by an Int8Linear; returns `module`."""
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_linears_int8(child)
    return module
