"""VQGAN architecture: one frozen dataclass, presets in one dict.

The fields are taming-transformers' `ddconfig` plus the quantizer's, so a run's `model.yaml` maps
onto it one to one; `mmfast.vqgan.load` also infers every field from a checkpoint's tensor shapes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

QUANTIZERS = ("vq", "gumbel")


@dataclass(frozen=True)
class VQConfig:
    resolution: int = 256       # training image side; the model runs on any multiple of `factor`
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128               # channels of the first level; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # one entry per level: len - 1 halvings of the side
    num_res_blocks: int = 2     # per level in the encoder; the decoder has one more per level
    attn_resolutions: tuple[int, ...] = (16,)    # sides (at `resolution`) whose levels get attention
    z_channels: int = 256       # encoder output / decoder input channels
    embed_dim: int = 256        # codebook vector size (quant_conv maps z_channels -> embed_dim)
    n_embed: int = 16384        # codebook size = token vocabulary
    quantizer: str = "vq"       # "vq": nearest code (taming VectorQuantizer); "gumbel": argmax of
                                # quantize.proj logits (taming GumbelQuantize, ru-dalle's f8 model)
    norm_eps: float = 1e-6      # GroupNorm eps: taming 1e-6; min-dalle's detokenizer uses torch's 1e-5
    # Decoder output range mapped to [0, 1] pixels: taming / ru-dalle (clamp(x, -1, 1) + 1) / 2;
    # min-dalle clip(x, 0, 1). Encoder inputs are taken in the same range as the decoder's output.
    output_range: tuple[float, float] = (-1.0, 1.0)
    has_encoder: bool = True    # min-dalle ships the decoder only (`detoker.pt`)

    def __post_init__(self):
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"VQConfig.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if not self.ch_mult or self.ch % 32 or any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f"VQConfig: every level's channels (ch * ch_mult = {self.ch} * "
                             f"{self.ch_mult}) must divide by GroupNorm's 32 groups")

    @property
    def factor(self) -> int:
        """Pixels per token along each side (16 for f16 models, 8 for f8)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        """Tokens per side at the training resolution (16 for 256 px f16)."""
        return self.resolution // self.factor

    def replace(self, **changes) -> "VQConfig":
        return dataclasses.replace(self, **changes)


VQ_PRESETS: dict[str, VQConfig] = {
    # taming ImageNet VQGANs (vqgan_imagenet_f16_1024 / _16384)
    "vqgan-f16-1024": VQConfig(n_embed=1024),
    "vqgan-f16-16384": VQConfig(n_embed=16384),
    # min-dalle's detokenizer: the f16-16384 decoder with torch's default GroupNorm eps, [0, 1] output
    "min-dalle-f16-16384": VQConfig(n_embed=16384, norm_eps=1e-5, output_range=(0.0, 1.0), has_encoder=False),
    # ru-dalle's vqgan.gumbelf8-sber: 4 levels (f8), attention at 32, Gumbel quantizer
    "gumbel-f8-8192": VQConfig(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,), n_embed=8192, quantizer="gumbel"),
}


def vq_preset(name: str) -> VQConfig:
    """Return the architecture preset `name` (e.g. "vqgan-f16-16384"); unknown names list the valid ones."""
    try:
        return VQ_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown VQ preset {name!r}; valid presets: {', '.join(sorted(VQ_PRESETS))}") from None
