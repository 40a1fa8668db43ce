"""Choosing the next image token: guidance, top-k, temperature, top-p, and a random stream per image.

Everything is a tensor op on every row at once: no host sync, no Python branch on values, so the
step can be compiled, graph-captured or exported. Randomness is counter-based: the noise of image
row b at step t is a hash of (seed[b], t, token id), so an image depends on its prompt and its seed
only, never on the batch it ran in or on torch's global RNG. A draw is the Gumbel-max trick,
`argmax(logits / T + Gumbel noise)` over the kept tokens, which samples softmax(logits / T)
restricted to them: the distribution min-dalle's `torch.multinomial` draws from.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    # (x * m) mod 2**32 for 0 <= x < 2**32 in int64 without overflow: m is split in 16-bit halves.
    return (x * (m & 0xFFFF) + ((x * (m >> 16)) & 0xFFFF) * 65536) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # Wellons' "lowbias32": a bijective 32-bit integer hash with strong avalanche. Shifts are
    # written as floor divisions (x >= 0) because ONNX's BitShift takes unsigned types only.
    x = x ^ (x // 65536)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x // 32768)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x // 65536)


def uniform_noise(seeds: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): out[b, j] is a function of (seeds[b], pos, ids[b, j]) only.

    Parameters
    ----------
    seeds : LongTensor [B], each in [0, 2**63).
    pos : LongTensor [] (0-d), the step.
    ids : LongTensor [B, K], token ids in [0, 2**32).

    Returns
    -------
    Tensor [B, K] float32.

    Example
    -------
    >>> u = uniform_noise(torch.tensor([0, 1]), torch.tensor(3), torch.arange(16384).expand(2, -1))
    """
    lo, hi = seeds & _M32, seeds // 2 ** 32
    row = _mix32(lo ^ _mix32((hi + 0x9E3779B9) & _M32))                 # (B,) one stream per seed
    row = _mix32(row ^ _mix32((pos + 0x85EBCA6B) & _M32))[:, None]       # (B, 1) ... per step
    bits = _mix32((_mix32(ids ^ row) + row) & _M32)                      # (B, K)
    # 23 bits: (k + 0.5) / 2**23 is exact in float32 and never reaches 0 or 1.
    return ((bits // 512).float() + 0.5) * 2.0 ** -23


def sample_next(logits, pos, seeds, temperature, top_k, top_p, guidance, max_top_k: int) -> torch.Tensor:
    """Guided, filtered, seeded choice of the next token of every image.

    Parameters
    ----------
    logits : Tensor [2B, V] float32: rows 0..B-1 unconditioned, rows B..2B-1 conditioned (min-dalle's order).
    pos : LongTensor [] (0-d), the step (feeds the random stream).
    seeds : LongTensor [B], one seed per image, in [0, 2**63).
    temperature, top_p, guidance : Tensor [B] float32; top_k : LongTensor [B] in [1, max_top_k].
    max_top_k : Python int >= every top_k, <= V: the candidates' count, a static shape (a top-k of
        that size replaces a sort of all V logits; the noise is drawn for those candidates only).

    Returns
    -------
    LongTensor [B]: the chosen token ids.

    Notes
    -----
    Guided logits are `uncond * (1 - guidance) + cond * guidance` (min-dalle's formula). top-k keeps
    the tokens at least as large as the k-th largest (ties kept, as min-dalle, as far as they fall
    within the max_top_k candidates), then top-p keeps the smallest prefix of those, by decreasing
    probability under temperature, whose mass reaches top_p. The noise of a token depends on its id,
    not its rank, so the choice does not depend on max_top_k.

    Example
    -------
    >>> tok = sample_next(logits, pos, seeds, t, k, p, g, max_top_k=256)      # [B]
    """
    B = seeds.shape[0]
    f = guidance[:, None]
    x = logits[:B] * (1 - f) + logits[B:] * f                          # (B, V), fp32
    vals, ids = x.topk(max_top_k, dim=1)                               # (B, K) sorted, descending
    kth = vals.gather(1, top_k[:, None] - 1)                           # (B, 1) the k-th largest
    t = temperature[:, None]
    # Probabilities of the top-k tokens in sorted order, then the mass strictly before each.
    p = torch.softmax(((vals - vals[:, :1]) / t).masked_fill(vals < kth, float("-inf")), dim=1)
    before = p.cumsum(1) - p
    # top_p >= 1 keeps everything, even where rounding lets `before` reach 1 in a long tail.
    in_p = (before < top_p[:, None]) | (top_p[:, None] >= 1)
    n_keep = (in_p & (vals >= kth)).sum(1, keepdim=True)              # >= 1: the best token is kept
    keep = vals >= vals.gather(1, n_keep - 1)                          # (B, K)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, pos, ids)))
    best = torch.where(keep, vals / t + gumbel, float("-inf")).argmax(1, keepdim=True)
    return ids.gather(1, best)[:, 0]
