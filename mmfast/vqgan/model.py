"""VQGAN (taming-transformers' encoder / decoder, VQ and Gumbel quantizers) as readable modules.

Parameter names are taming's (`encoder.down.0.block.1.norm1.weight`, `quantize.embedding.weight`,
...), so a taming state dict loads as is; `mmfast.vqgan.load` maps the other layouts onto them.

Inference choices (exact up to float rounding, tested against taming and min-dalle):
- tokens come from `kernels.nearest_code` (VQ) or the argmax of `quantize.proj` (Gumbel, no
  noise), and codes go back to vectors with a gather, never a one-hot matmul;
- GroupNorm statistics, attention softmax, `norm_out` and `conv_out` run in fp32 whatever the
  dtype of the convolutions (VQGANs overflow in fp16 and lose colour accuracy in bf16 there);
- GroupNorm + SiLU is one `kernels.group_norm_silu` call (two passes over the activation instead
  of four; the decoder's last norm reads bf16 and writes fp32 directly); a ResNet block's second
  norm and its residual add work in place on the conv outputs they consume;
- `Upsample.fold()` turns "nearest 2x upsample, then 3x3 conv" into one stride-2 transposed conv
  with a 4x4 kernel: each output phase sees a 2x2 sum of the 3x3 taps (16 instead of 36
  multiply-adds per channel pair and output pixel), written straight into the upsampled layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import VQConfig


def _norm(channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=eps)


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True, **kw) -> torch.Tensor:
    """GroupNorm (fp32 statistics and affine) then SiLU, fused; in x's dtype unless out_dtype= is given,
    into x itself with inplace=True."""
    return kernels.group_norm_silu(x, norm.weight, norm.bias, groups=norm.num_groups, eps=norm.eps, silu=silu, **kw)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, eps), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h, inplace=True))   # dropout is 0 in every released VQGAN
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))   # h: conv2's own output


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, q/k/v/proj_out as 1x1 convs."""

    def __init__(self, c: int, eps: float):
        super().__init__()
        self.norm = _norm(c, eps)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = _norm_silu(self.norm, x, silu=False)
        h = h.permute(0, 2, 3, 1).reshape(b, 1, hh * ww, c)                   # (B, 1, HW, C): a view if channels-last
        # the 1x1 convs as matmuls on that view; attention in fp32 (scale c**-0.5 is SDPA's default)
        q, k, v = (F.linear(h, m.weight.view(c, c), m.bias).float() for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).to(x.dtype)              # (B, 1, HW, C)
        a = F.linear(a, self.proj_out.weight.view(c, c), self.proj_out.bias)
        return x + a.view(b, hh, ww, c).permute(0, 3, 1, 2)                  # channels-last strides


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))   # taming pads right / bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        # fold()'s transposed-conv kernel (not saved: derived from conv.weight); .to() converts it
        self.register_buffer("folded", None, persistent=False)

    def fold(self) -> None:
        """Precompute the stride-2 transposed conv equal to conv3x3(upsample2x(x)) (call once the
        weights are final; computed in fp32, stored in conv.weight's dtype and memory format).

        Output row 2i + a of conv3x3(upsample2x(x)) reads x rows {i-1, i} (a = 0) or {i, i+1}
        (a = 1), the 3x3 taps summed where two land on the same x row. A transposed conv (stride 2,
        padding 1, 4 taps k) adds x[i] * tap[k] into output row 2i - 1 + k: so tap 3 is x row i-1
        for a = 0 (w0), tap 1 x row i (w1 + w2); for a = 1 tap 2 is x row i (w0 + w1), tap 0 row
        i+1 (w2). The same along columns.
        """
        w = self.conv.weight.detach()

        def taps(t):  # (..., 3) -> (..., 4) along the last axis
            return torch.stack([t[..., 2], t[..., 1] + t[..., 2], t[..., 0] + t[..., 1], t[..., 0]], -1)

        k = taps(taps(w.float()).transpose(-1, -2)).transpose(-1, -2)        # (Cout, Cin, 4, 4)
        self.folded = k.transpose(0, 1).to(w.dtype).contiguous(memory_format=_format_of(w))  # (Cin, Cout, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is None or self.folded.dtype != x.dtype:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.conv_transpose2d(x, self.folded, self.conv.bias, stride=2, padding=1)   # (B, C, 2H, 2W)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format


def _level_blocks(cin: int, cout: int, n: int, attn: bool, eps: float) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, eps) for i in range(n))
    level.attn = nn.ModuleList(AttnBlock(cout, eps) for _ in range(n)) if attn else nn.ModuleList()
    return level


def _middle(c: int, eps: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c, eps), AttnBlock(c, eps), ResnetBlock(c, c, eps)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        eps, mult = cfg.norm_eps, (1,) + tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i, m in enumerate(cfg.ch_mult):
            level = _level_blocks(cfg.ch * mult[i], cfg.ch * m, cfg.num_res_blocks, res in cfg.attn_resolutions, eps)
            if i != len(cfg.ch_mult) - 1:
                level.downsample, res = Downsample(cfg.ch * m), res // 2
            self.down.append(level)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = _middle(c, eps)
        self.norm_out, self.conv_out = _norm(c, eps), nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                     # no list of skips: the encoder of a VQGAN needs none
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        eps, n = cfg.norm_eps, len(cfg.ch_mult)
        c = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _middle(c, eps)
        up = []
        for i in reversed(range(n)):
            cout = cfg.ch * cfg.ch_mult[i]
            level = _level_blocks(c, cout, cfg.num_res_blocks + 1, res in cfg.attn_resolutions, eps)
            if i != 0:
                level.upsample, res = Upsample(cout), res * 2
            up.insert(0, level)                 # taming's order: up[0] is the full-resolution level
            c = cout
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = _norm(c, eps), nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        # the last norm and conv in fp32: they set the pixel values (keep norm_out / conv_out fp32)
        return self.conv_out(_norm_silu(self.norm_out, h, out_dtype=torch.float32))


class VectorQuantizer(nn.Module):
    """Nearest codebook vector (taming VectorQuantizer / VectorQuantizer2 at inference)."""

    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)
        self.register_buffer("sqnorm", torch.zeros(n_embed), persistent=False)

    def refresh(self) -> None:
        """||e_k||^2 in fp32, computed once after loading instead of on every call."""
        self.sqnorm = self.embedding.weight.detach().float().pow(2).sum(1)

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        # h: (B, D, H, W) -> ids (B, H, W); the codebook's dtype, fp32 accumulation
        w = self.embedding.weight
        return kernels.nearest_code(h.permute(0, 2, 3, 1).to(w.dtype), w, codebook_sqnorm=self.sqnorm)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding.weight).permute(0, 3, 1, 2)   # (B, D, H, W)


class GumbelQuantizer(nn.Module):
    """taming's GumbelQuantize at inference: argmax of the 1x1-conv logits (no Gumbel noise)."""

    def __init__(self, n_embed: int, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(hidden, n_embed, 1)
        self.embed = nn.Embedding(n_embed, dim)

    def refresh(self) -> None:
        pass

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h.to(self.proj.weight.dtype)).argmax(dim=1)         # (B, H, W)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed.weight).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    """images <-> tokens. Pixels here are in the config's `output_range` (taming: [-1, 1])."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.has_encoder:
            self.encoder = Encoder(cfg)
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)
        self.quantize = (VectorQuantizer(cfg.n_embed, cfg.embed_dim) if cfg.quantizer == "vq"
                         else GumbelQuantizer(cfg.n_embed, cfg.embed_dim, cfg.embed_dim))

    def prepare(self, dtype: torch.dtype = torch.float32, channels_last: bool = True) -> "VQGAN":
        """Ready for inference, in place: convolutions in `dtype` except `decoder.conv_out`; GroupNorm
        parameters, the codebook and the Gumbel projection in fp32; channels-last weights (oneDNN's
        fast layout on CPU, NHWC tensor cores on CUDA); folded upsamples; codebook norms cached."""
        self.eval().requires_grad_(False).float()
        for m in self.modules():
            if isinstance(m, Upsample):
                m.fold()                        # from the fp32 weights, rounded once below
        keep32 = (self.decoder.conv_out, getattr(self.quantize, "proj", None))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, Upsample)) and not any(m is k for k in keep32):
                m.to(dtype)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.quantize.refresh()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, embed_dim, H/f, W/f) pre-quantization latents."""
        w = self.encoder.conv_in.weight
        return self.quant_conv(self.encoder(x.to(w.dtype).contiguous(memory_format=_format_of(w))))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, H/f, W/f) int64 tokens."""
        return self.quantize.codes(self.encode_latents(x))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 tokens -> (B, 3, h*f, w*f) fp32 pixels (unclamped)."""
        w = self.post_quant_conv.weight
        z = self.quantize.lookup(ids).to(w.dtype)                            # a channels-last view
        return self.decoder(self.post_quant_conv(z.contiguous(memory_format=_format_of(w))))
