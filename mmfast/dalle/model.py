"""The DALL·E mini / mega BART encoder and decoder in plain PyTorch, weight-compatible with min-dalle.

Parameter names are min-dalle's (its `encoder.pt` / `decoder.pt` load as they are). The layers
compute what min-dalle's do; the decoder is driven differently:

- `DalleDecoder.cross_kv` projects the encoder state to every layer's cross-attention keys and
  values once per prompt (min-dalle recomputes them in every layer at every step), with the valid
  text positions moved to the front so a step reads only those (attention is order-free);
- the self-attention cache is allocated once at its final size in the model dtype
  (`DalleDecoder.new_cache`) and a step reads only the positions written so far, through
  `mmfast.kernels.decode_attention`;
- `DalleDecoder.step` is a function of tensors (no `.item()`, no Python branch on values), so the
  loop around it can be compiled, CUDA-graph captured or exported;
- final LayerNorm and logits are fp32 whatever the model dtype (`cast`): guidance multiplies
  logit differences by ~16, which bf16 logits cannot carry;
- on the CPU a step is bound by streaming every weight once (R = 2-16 rows against ~193M weights
  at mini size), so `pack_weights` swaps the per-step linears for the formats of
  `mmfast.quantize` (fp32 as fp16 pairs, fp16 or int8 weights) whose GEMMs stream them faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..quantize import pack_weight
from .config import DalleConfig


class GLU(nn.Module):
    """min-dalle's feed-forward: LayerNorm, gelu(fc0) * fc1, a LayerNorm on the hidden size, fc2."""

    def __init__(self, width: int, hidden: int, eps: float):
        super().__init__()
        self.ln0 = nn.LayerNorm(width, eps=eps)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.fc0 = nn.Linear(width, hidden, bias=False)
        self.fc1 = nn.Linear(width, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, width, bias=False)
        self.fc01 = None  # fc0 and fc1 as one GEMM of 2 * hidden outputs, once `pack_weights` fuses them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln0(x)
        a, b = self.fc01(x).chunk(2, -1) if self.fc01 is not None else (self.fc0(x), self.fc1(x))
        return self.fc2(self.ln1(F.gelu(a) * b))


class Attention(nn.Module):
    """Bias-free q/k/v/out projections; the callers decide where keys and values come from."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.out_proj = nn.Linear(width, width, bias=False)
        self.qkv_proj = None  # q, k, v as one GEMM of 3 * width outputs, once `pack_weights` fuses them

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(-3, -2)  # (..., T, W) -> (..., H, T, Dh)

    def qkv(self, x: torch.Tensor):
        """(q, k, v) projections of x (..., W), each (..., W)."""
        if self.qkv_proj is not None:
            return self.qkv_proj(x).chunk(3, -1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x: (N, T, W); key_mask: (N, T) bool, False for padding. Self-attention over the text.
        q, k, v = (self.split(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.out_proj(y.transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        w, eps = cfg.width, cfg.layer_norm_eps
        self.pre_self_attn_layer_norm = nn.LayerNorm(w, eps=eps)
        self.self_attn = Attention(w, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(w, eps=eps)  # BART-"normformer": LN after attention too
        self.glu = GLU(w, cfg.glu_dim, eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn_layer_norm(self.self_attn(self.pre_self_attn_layer_norm(x), key_mask))
        return x + self.glu(x)


class DalleEncoder(nn.Module):
    """Text ids [N, text_tokens] -> encoder state [N, text_tokens, width]."""

    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.text_vocab, cfg.width)
        self.embed_positions = nn.Embedding(cfg.text_tokens, cfg.width)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layernorm_embedding = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.final_ln = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        key_mask = text != self.cfg.text_pad_token  # (N, T): min-dalle masks every <pad> id
        x = self.embed_tokens(text) + self.embed_positions.weight[: text.shape[1]]
        x = self.layernorm_embedding(x)
        for layer in self.layers:
            x = layer(x, key_mask)
        return self.final_ln(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        w, eps = cfg.width, cfg.layer_norm_eps
        self.pre_self_attn_layer_norm = nn.LayerNorm(w, eps=eps)
        self.self_attn = Attention(w, cfg.heads)
        self.self_attn_layer_norm = nn.LayerNorm(w, eps=eps)
        self.pre_encoder_attn_layer_norm = nn.LayerNorm(w, eps=eps)
        self.encoder_attn = Attention(w, cfg.heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(w, eps=eps)
        self.glu = GLU(w, cfg.glu_dim, eps)

    def step(self, x, pos, k_cache, v_cache, cross_k, cross_v, cross_len):
        # x: (R, W) one token per row; pos: () int64; k/v_cache: (R, H, image_tokens, Dh);
        # cross_k/v: (R, H, text_tokens, Dh) with cross_len (R,) valid positions in front.
        sa, ca = self.self_attn, self.encoder_attn
        h = self.pre_self_attn_layer_norm(x)
        q, k, v = (sa.split(t[:, None]) for t in sa.qkv(h))  # (R, H, 1, Dh)
        k_cache.index_copy_(2, pos.view(1), k)  # write this position: no allocation, no host sync
        v_cache.index_copy_(2, pos.view(1), v)
        lengths = (pos + 1).expand(x.shape[0])  # (R,): positions 0..pos are written
        a = kernels.decode_attention(q[:, :, 0], k_cache, v_cache, lengths, check_lengths=False)
        x = x + self.self_attn_layer_norm(sa.out_proj(a.flatten(1)))  # (R, H, Dh) -> (R, W)

        q = ca.split(ca.q_proj(self.pre_encoder_attn_layer_norm(x))[:, None])[:, :, 0]  # (R, H, Dh)
        a = kernels.decode_attention(q, cross_k, cross_v, cross_len, check_lengths=False)
        x = x + self.encoder_attn_layer_norm(ca.out_proj(a.flatten(1)))
        return x + self.glu(x)


class DalleDecoder(nn.Module):
    """Image-token decoder. Drive it with `cross_kv` once per prompt, `new_cache`, then `step`."""

    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.image_vocab + 1, cfg.width)
        self.embed_positions = nn.Embedding(cfg.image_tokens, cfg.width)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.layernorm_embedding = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.final_ln = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.width, cfg.image_vocab + 1, bias=False)

    def cast(self, dtype: torch.dtype) -> "DalleDecoder":
        """Weights to `dtype`, except final_ln and lm_head, which stay fp32 (fp32 logits)."""
        self.to(dtype)
        self.final_ln.float()
        self.lm_head.float()
        return self

    # The linears a step reads, besides the fused q/k/v and fc0/fc1. The cross-attention k / v
    # projections run once per prompt (`cross_kv`, hundreds of rows: compute-bound) and stay.
    STEP_LINEARS = ("self_attn.out_proj", "encoder_attn.q_proj", "encoder_attn.out_proj", "glu.fc2")

    def pack_weights(self, fmt: str | None, head: str = "fp32") -> "DalleDecoder":
        """CPU only: the step linears to weight format `fmt` (None: leave them), lm_head's sampled rows to `head`.

        Formats are `mmfast.quantize.pack_weight`'s: "fp32" (fp32 results, fp16-pair storage),
        "fp16" (fp16 weights, fp32 activations) or "int8" (int8 weights, per output channel).
        Self-attention's q/k/v and the GLU's fc0/fc1 are fused into one GEMM each (fewer calls:
        measured 0-15% off a step). Activations, caches, LayerNorms and the logits keep their dtype.
        Irreversible: the original nn.Linear modules are dropped.

        Example
        -------
        >>> decoder.pack_weights("int8")                 # then decoder.step(...) as before
        """
        for layer in self.layers if fmt is not None else ():
            sa, glu = layer.self_attn, layer.glu
            sa.qkv_proj = pack_weight(torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight]), fmt)
            glu.fc01 = pack_weight(torch.cat([glu.fc0.weight, glu.fc1.weight]), fmt)
            del sa.q_proj, sa.k_proj, sa.v_proj, glu.fc0, glu.fc1
            for name in self.STEP_LINEARS:
                parent, attr = name.split(".")
                owner = getattr(layer, parent)
                setattr(owner, attr, pack_weight(getattr(owner, attr), fmt))
        if isinstance(self.lm_head, nn.Linear):  # only the sampled rows: mega's extra 31 are never read
            self.lm_head = pack_weight(self.lm_head.weight[: self.cfg.codebook_size].float(), head)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def cross_kv(self, encoder_state: torch.Tensor, text: torch.Tensor):
        """Every layer's cross-attention keys and values of an encoder state; once per prompt.

        Parameters
        ----------
        encoder_state : Tensor [N, T, width], the encoder's output for `text`.
        text : LongTensor [N, T], the text ids (padding = `text_pad_token` is masked out).

        Returns
        -------
        (keys, values, lengths): keys / values [layers, N, heads, T, head_dim] in the model dtype
        with each row's valid text positions first, lengths [N] int64 their count.

        Example
        -------
        >>> ck, cv, cl = decoder.cross_kv(encoder(text), text)
        """
        valid = text != self.cfg.text_pad_token  # (N, T)
        # A stable sort of "is padding" moves the valid positions to the front, in order.
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
        x = encoder_state.gather(1, order[..., None].expand_as(encoder_state)).to(self.dtype)
        ks, vs = [], []
        for layer in self.layers:
            ca = layer.encoder_attn
            ks.append(ca.split(ca.k_proj(x)))  # (N, H, T, Dh)
            vs.append(ca.split(ca.v_proj(x)))
        return torch.stack(ks), torch.stack(vs), valid.sum(1)

    def new_cache(self, rows: int, device=None):
        """Self-attention keys and values [layers, rows, heads, image_tokens, head_dim], zeroed, model dtype."""
        c = self.cfg
        shape = (c.decoder_layers, rows, c.heads, c.image_tokens, c.head_dim)
        device = self.embed_tokens.weight.device if device is None else device
        return (torch.zeros(shape, dtype=self.dtype, device=device),
                torch.zeros(shape, dtype=self.dtype, device=device))

    def step(self, tokens, pos, k_cache, v_cache, cross_k, cross_v, cross_len) -> torch.Tensor:
        """One decoding step: the logits of position `pos + 1` given token `tokens` at `pos`.

        Parameters
        ----------
        tokens : LongTensor [R], the previous token of every row (`start_token` at pos 0).
        pos : LongTensor [] (0-d), the position of `tokens`, 0 <= pos < image_tokens.
        k_cache, v_cache : from `new_cache(R)`; position `pos` of every layer is written in place.
        cross_k, cross_v, cross_len : from `cross_kv`, one row per decoder row.

        Returns
        -------
        Tensor [R, codebook_size] float32: the logits of the sampled vocabulary.

        Example
        -------
        >>> logits = decoder.step(tokens, torch.tensor(0), k, v, ck, cv, cl)
        """
        emb = self.embed_tokens(tokens) + F.embedding(pos.view(1), self.embed_positions.weight)
        x = self.layernorm_embedding(emb)  # (R, W)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, pos, k_cache[i], v_cache[i], cross_k[i], cross_v[i], cross_len)
        ln = self.final_ln  # fp32 after `cast`; .float() is then free
        x = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
        if not isinstance(self.lm_head, nn.Linear):  # packed by `pack_weights`: the sampled rows only
            return self.lm_head(x)
        # Only the sampled rows of lm_head are read: mega's extra logits are never used.
        return F.linear(x, self.lm_head.weight[: self.cfg.codebook_size].float())
