"""Model configurations: one frozen dataclass per model family, named presets in one dict.

A config describes the architecture only (no weights, no file paths, no preprocessing: that is
`mmfast.preprocess.ImagePreprocessor`, read from the same checkpoint directory). Loaders infer it from the
checkpoint files; presets exist for bare state dicts and for building random-init models.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClipVisionConfig:
    image_size: int = 224   # input side after centre crop; fixes the number of patches
    patch_size: int = 32    # conv stride = kernel: one token per patch_size^2 pixels
    width: int = 768        # residual stream width of the ViT
    layers: int = 12
    heads: int = 12         # width must divide by heads
    mlp_dim: int = 3072     # hidden size of the MLP (4 x width for every OpenAI model; HF allows others)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:  # patches + the class token
        return self.grid * self.grid + 1


@dataclass(frozen=True)
class ClipTextConfig:
    context_length: int = 77   # positional embedding rows; tokenizer pads/truncates to this
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    # How the sentence embedding is read off the token sequence: "argmax" takes the position of the
    # largest token id (OpenAI / open_clip: EOT has the largest id), "eos" the first eos_token_id
    # (Hugging Face configs whose eos id is not the largest).
    pool: str = "argmax"
    eos_token_id: int = 49407


@dataclass(frozen=True)
class ClipConfig:
    embed_dim: int = 512   # joint embedding size both towers project to
    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    # OpenAI's weights were trained with x * sigmoid(1.702 x) ("quick_gelu"); open_clip's own
    # configs without "-quickgelu" use exact erf GELU. Using the wrong one silently changes outputs.
    act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def replace(self, **changes) -> "ClipConfig":
        return dataclasses.replace(self, **changes)


def _vit(embed_dim, image_size, patch, width, layers, heads, text_width, text_heads, act="gelu"):
    return ClipConfig(
        embed_dim=embed_dim,
        vision=ClipVisionConfig(image_size, patch, width, layers, heads, 4 * width),
        text=ClipTextConfig(width=text_width, heads=text_heads, mlp_dim=4 * text_width),
        act=act,
    )


# Names follow open_clip; "-quickgelu" variants are what OpenAI's released weights need.
CLIP_PRESETS: dict[str, ClipConfig] = {}
for _name, _args in {
    "ViT-B-32": (512, 224, 32, 768, 12, 12, 512, 8),
    "ViT-B-16": (512, 224, 16, 768, 12, 12, 512, 8),
    "ViT-L-14": (768, 224, 14, 1024, 24, 16, 768, 12),
    "ViT-L-14-336": (768, 336, 14, 1024, 24, 16, 768, 12),
}.items():
    CLIP_PRESETS[_name] = _vit(*_args)
    CLIP_PRESETS[_name + "-quickgelu"] = _vit(*_args, act="quick_gelu")


def clip_preset(name: str) -> ClipConfig:
    """Return the architecture preset `name` (e.g. "ViT-B-32"); unknown names list the valid ones."""
    try:
        return CLIP_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown CLIP preset {name!r}; valid presets: {', '.join(sorted(CLIP_PRESETS))}"
        ) from None
