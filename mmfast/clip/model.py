"""CLIP (Radford et al., 2021) in plain PyTorch, weight-compatible with OpenAI / open_clip.

Parameter names are OpenAI's (`visual.transformer.resblocks.0.mlp.c_fc.weight`, ...) except that
the fused qkv projection is a module (`attn.in_proj.weight`, not `attn.in_proj_weight`);
`mmfast.clip.load` maps OpenAI, open_clip and Hugging Face files onto these names. Two things make it faster than the references without changing a result:
- the patch embedding (a conv whose stride equals its kernel) runs as one matmul over patches;
- text runs only up to the longest pooled (EOT) position of the batch: attention is causal, so
  later positions can never change the pooled token, and most prompts use ~10 of the 77 positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig, ClipTextConfig, ClipVisionConfig


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"gelu": F.gelu, "quick_gelu": _quick_gelu}


class Attention(nn.Module):
    """Multi-head self-attention; q, k and v come from one fused projection (`in_proj`).

    nn.MultiheadAttention stores that projection as raw `in_proj_weight` / `in_proj_bias`; here it
    is an nn.Linear (`in_proj.weight`) so every projection can be swapped for a quantized one alike.
    `mmfast.clip.load` renames the keys.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, (width, heads)
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.in_proj(x)
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, act)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, mlp_dim, act, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ClipVisionConfig, embed_dim: int, act: str, eps: float):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=eps)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, act, eps)
        self.ln_post = nn.LayerNorm(w, eps=eps)
        self.proj = nn.Parameter(torch.zeros(w, embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: (B, 3, S, S) normalised -> (B, embed_dim), not L2-normalised
        B, p, g = pixels.shape[0], self.cfg.patch_size, self.cfg.grid
        x = pixels[:, :, : g * p, : g * p].reshape(B, 3, g, p, g, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * p * p)  # (B, N, 3*p*p), conv's order
        x = F.linear(x, self.conv1.weight.reshape(self.cfg.width, -1))  # (B, N, W)
        cls = (self.class_embedding + self.positional_embedding[0]).expand(B, 1, -1)
        x = torch.cat([cls.to(x.dtype), x + self.positional_embedding[1:]], dim=1)  # (B, N+1, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """Both towers; the text tower's parameters sit at the top level as in OpenAI's checkpoints."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.act, cfg.layer_norm_eps)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_dim, cfg.act,
                                       cfg.layer_norm_eps)
        self.ln_final = nn.LayerNorm(t.width, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.zeros(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # log(100), CLIP's trained value

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (B, T) -> (B,) index of the token whose state becomes the sentence embedding
        t: ClipTextConfig = self.cfg.text
        if t.pool == "argmax":
            return ids.argmax(dim=-1)
        return (ids == t.eos_token_id).int().argmax(dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (B, T) int64 -> (B, embed_dim), not L2-normalised
        pos = self.pool_positions(ids)
        T = int(pos.max()) + 1 if ids.shape[0] else 1  # causal: later tokens cannot reach pos
        x = self.token_embedding(ids[:, :T]) + self.positional_embedding[:T]
        x = self.ln_final(self.transformer(x.to(self.text_projection.dtype), causal=True))
        x = x[torch.arange(ids.shape[0], device=ids.device), pos]  # (B, width)
        return x @ self.text_projection
