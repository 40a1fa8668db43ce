"""DALL·E mini / mega (the BART text -> image-token model of min-dalle): one frozen config, named presets.

The config describes the architecture only. `mmfast.dalle.load` infers it from min-dalle's
`encoder.pt` / `decoder.pt`; the presets exist for random-init models and for documentation.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DalleConfig:
    # min-dalle uses one layer count for both towers; kept apart here so the files' shapes decide.
    encoder_layers: int = 12
    decoder_layers: int = 12
    width: int = 1024            # min-dalle's embed_count: residual stream of both towers
    # Not visible in the weights (q_proj is [width, width]); both released models use 64-wide heads.
    heads: int = 16
    glu_dim: int = 2730          # GLU hidden size (min-dalle's glu_embed_count)
    text_vocab: int = 50264      # encoder token-embedding rows: 50264 mini, 50272 mega
    text_tokens: int = 64        # encoder positions: every prompt is padded / truncated to this
    image_vocab: int = 16384     # decoder logits minus one: 16384 mini, 16415 mega (embedding has +1 rows)
    image_tokens: int = 256      # one token per cell of the VQGAN's 16 x 16 latent grid
    # Logits actually sampled: the VQGAN codebook (2**14). mega's 31 extra logits never are.
    codebook_size: int = 2 ** 14
    # The first "previous token" of every image. min-dalle's files are run from 2**14 - 1 (a real
    # codebook id), not from BART's decoder_start_token_id 16384; we reproduce min-dalle's outputs.
    start_token: int = 2 ** 14 - 1
    text_pad_token: int = 1      # BART's <pad>: fills text rows; the text attention mask is ids != 1
    layer_norm_eps: float = 1e-5  # nn.LayerNorm's default, which min-dalle's modules use everywhere

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"DalleConfig: width={self.width} must be a multiple of heads={self.heads}")
        if not 1 <= self.codebook_size <= self.image_vocab + 1:
            raise ValueError(f"DalleConfig: codebook_size={self.codebook_size} must lie in "
                             f"[1, image_vocab + 1 = {self.image_vocab + 1}] (the decoder's logits)")
        if not 0 <= self.start_token <= self.image_vocab:
            raise ValueError(f"DalleConfig: start_token={self.start_token} must be a row of the "
                             f"decoder's token embedding [0, {self.image_vocab}]")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def replace(self, **changes) -> "DalleConfig":
        return dataclasses.replace(self, **changes)


DALLE_PRESETS: dict[str, DalleConfig] = {
    "dalle-mini": DalleConfig(),
    "dalle-mega": DalleConfig(encoder_layers=24, decoder_layers=24, width=2048, heads=32, glu_dim=4096,
                              text_vocab=50272, image_vocab=16415),
    # Random-init tests: tiny towers, but the image vocabulary of the real models, because
    # min-dalle hard-codes the 2**14 sampled logits and the start token 2**14 - 1.
    # 64-wide heads like the real ones, so the loader's heads = width / 64 holds for it too.
    "dalle-tiny": DalleConfig(encoder_layers=2, decoder_layers=2, width=128, heads=2, glu_dim=200,
                              text_vocab=512),
}


def dalle_preset(name: str) -> DalleConfig:
    """Return the architecture preset `name` ("dalle-mini", "dalle-mega", "dalle-tiny").

    Example
    -------
    >>> dalle_preset("dalle-mega").width
    2048
    """
    try:
        return DALLE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown DALL·E preset {name!r}; valid presets: "
                         f"{', '.join(sorted(DALLE_PRESETS))}") from None
