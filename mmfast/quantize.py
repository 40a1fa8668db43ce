"""int8 linear layers for CPUs with AVX-512 VNNI: weights int8 per output channel, activations
quantized per call (dynamic, per tensor), int32 accumulation, fp32 in and out.

The GEMM is fbgemm's (through torch's `quantized::linear_dynamic`), which uses VNNI's 4-way int8
dot products: about 3x fp32 throughput on this class of CPU. Everything around the linears
(LayerNorm, softmax attention, residual stream) stays fp32, which is why embeddings stay within
cosine 0.999 of fp32; `mmfast.clip` checks that on the loaded weights before choosing this mode.

Weight-only formats for skinny GEMMs (a KV-cached decoding step, e.g. DALL·E's): fp32 weights as
fp16 pairs, fp16 weights, int8 weights (`pack_weight`, see the section below for the measurements).

The CPU feature checks and device resolution that every family's dtype="auto" rests on live here too.
"""
from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
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
    if d.type not in ("cpu", "cuda"):  # "meta", "xpu", ...: models would be moved there, then fail on first use
        raise ValueError(f"device={device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
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


# ---- weight-only formats for skinny GEMMs (a decoding step: 2-16 rows against every weight) --------
# A KV-cached decoding step multiplies a few rows by every weight matrix once, so it is bound by
# the bytes of the weights, and by how well the GEMM streams them. Measured on the 2-vCPU Zen 5
# machine, one thread, DALL·E mini's decoder matrices in rotation (from DRAM), GB/s of weights read:
#                                       M = 2 rows    M = 8 rows
#   torch fp32 F.linear (MKL sgemm)        5-8           4-8      (M = 1 takes a GEMV path: 13-15)
#   torch bf16 F.linear (oneDNN)           6-12          7-8
#   fbgemm fp16-weight GEMM (fp32 x)       20-23         15
#   fbgemm dynamic int8 (Int8Linear)       16-20         11-14
#   aten _weight_int8pack_mm (bf16 x)      12-16         5-7      (fp32 x: a scalar path, 10x slower)
# So fbgemm's fp16 kernel is the fast way to stream 16-bit weights here, and also to stream fp32
# ones, split in two fp16 halves (Fp32PairLinear): the same bytes, 2-3x the speed of sgemm. A
# hand-written AVX-512 fp32 kernel (dot-product tiles of 4-8 rows) reached 17 GB/s at M = 2 but
# no better than sgemm at M >= 4, so there is none here.
def has_fbgemm() -> bool:
    """torch's fbgemm kernels (x86 CPUs): the fp16-weight GEMM of Fp16Linear / Fp32PairLinear."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def _as_weight(w) -> torch.Tensor:
    w = w.weight if isinstance(w, nn.Linear) else w
    assert isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type == "cpu", "a CPU [N, K] weight"
    return w.detach().float().contiguous()


def _prepack_fp16(w: torch.Tensor):
    # fbgemm keeps weights as fp16, with a warning when values saturate (none here: |w| <= 65504 checked)
    assert bool(w.abs().max() <= 65504), "weights beyond fp16's range"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_prepack_fp16(w, None)


class Fp16Linear(nn.Module):
    """Weight-only fp16 (fbgemm): weights stored and streamed as fp16, activations and sums fp32.

    Half the bytes of fp32 for a weight rounding of 2**-11 relative (8x finer than bf16's).
    x [..., K] any float dtype -> [..., N] float32. Example: ``Fp16Linear(linear)(x)``.
    """

    def __init__(self, weight):
        super().__init__()
        w = _as_weight(weight)
        self.out_features, self.in_features = w.shape
        self._packed = _prepack_fp16(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self._packed)

    @property
    def weight(self) -> torch.Tensor:
        """The fp32 [N, K] weight this layer computes with (a new tensor on every access)."""
        return torch.ops.quantized.linear_unpack_fp16(self._packed)[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weights"


class Fp32PairLinear(nn.Module):
    """fp32 weights as two fp16 halves through fbgemm's fp16 GEMM: fp32 results, faster streaming.

    w = hi + lo * 2**-s with hi = fp16(w) and lo = fp16((w - hi) * 2**s), s a power of two per
    matrix that puts the residuals in fp16's normal range; then ``x @ w.T = x @ hi.T + (x * 2**-s)
    @ lo.T`` (the scaling of x is exact). Each weight is represented to 2**-22 relative (fp32 itself:
    2**-24), activations and accumulation are fp32, so outputs differ from torch's fp32 GEMM by
    summation-order noise (~1e-6 relative). Same 4 bytes per weight; measured 2-3x faster than
    torch's sgemm for 1-16 rows (see above). x [..., K] -> [..., N] float32.
    """

    def __init__(self, weight):
        super().__init__()
        w = _as_weight(weight)
        self.out_features, self.in_features = w.shape
        hi = w.half().float()
        r = w - hi                                   # exact: w and fp16(w) share their leading bits
        top = float(r.abs().max())
        # largest residual -> [2**13, 2**14): far from fp16's overflow, and small ones stay normal
        self.shift = 0 if top == 0 else 13 - math.frexp(top)[1] + 1
        self._hi = _prepack_fp16(hi)
        self._lo = _prepack_fp16((r * 2.0 ** self.shift).half().float())
        self._unshift = 2.0 ** -self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return torch.ops.quantized.linear_dynamic_fp16(x, self._hi) + \
            torch.ops.quantized.linear_dynamic_fp16(x * self._unshift, self._lo)

    @property
    def weight(self) -> torch.Tensor:
        """The fp32 [N, K] weight this layer computes with, hi + lo * 2**-s (a new tensor per access)."""
        unpack = torch.ops.quantized.linear_unpack_fp16
        return unpack(self._hi)[0] + unpack(self._lo)[0] * self._unshift

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 as fp16 hi + lo"


class Int8WeightLinear(nn.Module):
    """Weight-only int8: per-output-channel symmetric scales, aten's `_weight_int8pack_mm`.

    Activations enter the GEMM in bf16 (its fp32-activation path is scalar, ~10x slower) and the
    result is returned in fp32; only the weights are quantized, so a row's output depends on that
    row alone (fbgemm's dynamic int8 quantizes activations per tensor: one scale for the whole
    batch, so an image would depend on the batch it ran in). K is zero-padded to a multiple of 32:
    the kernel crashes on bf16 inputs whose K is not a multiple of 16 (torch 2.13).
    x [..., K] -> [..., N] float32.
    """

    _K_ALIGN = 32

    def __init__(self, weight):
        super().__init__()
        w = _as_weight(weight)
        self.out_features, self.in_features = w.shape
        # The kernel takes the scales in the activations' dtype: round them up to bf16 first and
        # quantize with those, so that w ~ q * scale holds to half a step (|q| <= 127 still).
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127).to(torch.bfloat16)
        low = scale.float() < w.abs().amax(dim=1) / 127
        scale[low] = (scale[low].view(torch.int16) + 1).view(torch.bfloat16)  # next bf16 up (positive)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        self._pad = -self.in_features % self._K_ALIGN
        self.register_buffer("qweight", F.pad(q, (0, self._pad)).contiguous(), persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self._pad:
            x = F.pad(x, (0, self._pad))
        shape = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scale)
        return y.float().reshape(*shape, self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The fp32 [N, K] weight this layer computes with, int8 * scale (a new tensor per access)."""
        return self.qweight[:, : self.in_features].float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, bf16 x"


WEIGHT_FORMATS = {"fp32": Fp32PairLinear, "fp16": Fp16Linear, "int8": Int8WeightLinear}


def pack_weight(weight, fmt: str) -> nn.Module:
    """A CPU linear (no bias) over `weight` [N, K] in format "fp32" (Fp32PairLinear), "fp16" (Fp16Linear)
    or "int8" (Int8WeightLinear); fp32 falls back to a plain nn.Linear where fbgemm is missing.

    Example
    -------
    >>> layer.fc0 = pack_weight(layer.fc0, "int8")     # x [M, K] fp32 -> [M, N] fp32
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    if fmt in ("fp32", "fp16"):
        w = _as_weight(weight)
        beyond = bool(w.numel()) and (not bool(torch.isfinite(w).all()) or float(w.abs().max()) > 65504)
        if fmt == "fp16" and beyond:
            raise ValueError("weights: values beyond fp16's range (|w| > 65504, or inf / NaN) cannot be stored as "
                             "fp16; use dtype='fp32'")
    if fmt in ("fp32", "fp16") and (not has_fbgemm() or beyond):  # fp32 beyond fp16's range: plain fp32 GEMM
        if fmt == "fp16":
            raise ValueError("fp16 weights on the CPU need torch's fbgemm kernels (x86); use 'fp32' or 'bf16'")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = nn.Parameter(w, requires_grad=False)
        return lin
    return WEIGHT_FORMATS[fmt](w if fmt in ("fp32", "fp16") else weight)   # w: converted once above
