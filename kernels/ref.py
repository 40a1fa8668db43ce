"""PyTorch references of every fused op, written for clarity; each states its bytes and FLOPs.

These are the ground truth the Triton and C++ kernels are tested against, and the fallback
when neither is available. They may materialise intermediates the kernels never do.
"""
from __future__ import annotations

import torch

# ---- similarity -----------------------------------------------------------------------------------
def _similarity_scores(queries, gallery, scale, normalize_queries, gallery_scale):
    q = queries.float()                                        # [Q, D]
    if normalize_queries:
        q = torch.nn.functional.normalize(q, dim=-1)           # a zero query stays zero
    if scale is not None:
        q = q * scale
    g = gallery.float()                                        # [N, D], stored normalised
    if gallery_scale is not None:                              # int8 rows: value * per-row scale
        g = g * gallery_scale.float()[:, None]
    return q @ g.T                                             # [Q, N]


def similarity_ref(queries, gallery, *, scale=None, gallery_scale=None):
    """scale * normalize(queries) @ gallery.T -> [Q, N] float32 (gallery rows already unit-norm)."""
    return _similarity_scores(queries, gallery, scale, True, gallery_scale)


def similarity_topk_ref(queries, gallery, k, *, scale=None, normalize_queries=True, gallery_scale=None):
    """Exact top-k of the similarity scores: (scores [Q, k] float32, ids [Q, k] int64), best first.

    Ties go to the smaller gallery id (a stable sort); a NaN score ranks as -inf.
    Materialises the whole [Q, N] score matrix, which the kernels never do.
    """
    s = _similarity_scores(queries, gallery, scale, normalize_queries, gallery_scale)
    s = torch.nan_to_num(s, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    v, i = torch.sort(s, dim=1, descending=True, stable=True)
    return v[:, :k].contiguous(), i[:, :k].contiguous()


def similarity_cost(n_queries, n_gallery, dim, k=0, gallery_bytes=2):
    """(bytes, flops) one call must at least move and compute: the gallery read once (plus int8's
    per-row fp32 scale), the queries read, the [Q, k] (or [Q, N] when k == 0) result written;
    2 FLOPs per multiply-add of the [Q, D] x [D, N] product."""
    scale_bytes = 4 * n_gallery if gallery_bytes == 1 else 0
    out = n_queries * k * (4 + 8) if k else n_queries * n_gallery * 4
    return (n_gallery * dim * gallery_bytes + scale_bytes + n_queries * dim * 4 + out,
            2 * n_queries * n_gallery * dim)


# ---- nearest codebook vector ----------------------------------------------------------------------
def nearest_code_ref(x, codebook, *, codebook_sqnorm=None, return_distance=False):
    """ids = argmin_k ||x - codebook[k]||^2 over the last dim of x, in fp32 (see kernels.nearest_code).

    Reads M*D + K*D elements and writes M ids; 2*M*K*D FLOPs. Materialises the (M, K) fp32 score
    matrix (4*M*K bytes written and read again), which is exactly what the kernels avoid.
    """
    K, D = codebook.shape
    xf = x.reshape(-1, D).float()                                            # (M, D)
    e = codebook.float()                                                     # (K, D)
    e2 = (e * e).sum(1) if codebook_sqnorm is None else codebook_sqnorm.float()  # (K,)
    # argmin |x - e|^2 = argmax x.e - |e|^2/2: |x|^2 is the same for every code of a row
    score = xf @ e.T - 0.5 * e2                                              # (M, K)
    # NaN never wins (argmax would pick it), nor does a code whose norm is not finite
    score = torch.where(torch.isnan(score) | ~torch.isfinite(e2), float("-inf"), score)
    best, ids = score.max(1)                                                 # first max wins
    # the distance to the chosen code, computed directly (no cancellation); a row whose distance
    # is not finite (NaN/Inf in x, fp32 overflow) or that found no finite score gets id -1
    dist = (xf - e[ids]).pow(2).sum(1)                                       # (M,)
    bad = ~torch.isfinite(dist) | (best == float("-inf"))
    ids = ids.masked_fill(bad, -1).reshape(x.shape[:-1])
    if not return_distance:
        return ids
    return ids, dist.masked_fill(bad, float("nan")).reshape(x.shape[:-1])


def nearest_code_taming(z, embedding):
    """taming-transformers' VectorQuantizer nearest-code lookup, verbatim: the peer to beat.

    z: (M, D) fp32, embedding: (K, D) fp32 -> (M,) int64. 2*M*K*D FLOPs, and four (M, K) fp32
    temporaries (z^2 + e^2, z e^T, 2 z e^T, the difference) written and read back before the
    argmin: about 32*M*K bytes of memory traffic beyond the inputs.
    """
    d = torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(embedding ** 2, dim=1) - \
        2 * torch.matmul(z, embedding.t())
    return torch.argmin(d, dim=1)


# ---- decode attention (one new query per row against a static KV cache) ---------------------------
def decode_attention_ref(q, k_cache, v_cache, lengths, *, scale=None):
    """out[b, h] = softmax(scale * q[b, h] . k_cache[b, h, :L_b]) @ v_cache[b, h, :L_b], L_b = lengths[b].

    q: [B, H, D]; k_cache, v_cache: [B, H, T, D]; lengths: [B] int. fp32 math for every storage
    dtype; the result is cast back to q's dtype. Lengths outside [1, T] (which kernels.decode_attention
    rejects unless told not to check) behave as if clamped to [0, T], and a row with no position
    gets zeros. Reads the valid part of K and V once (2*B*H*L*D elements) plus q, writes B*H*D;
    4*B*H*L*D FLOPs (two dot products per position), see decode_attention_cost. Materialises the
    [B, H, T] fp32 scores and reads all T positions, which the kernels never do.
    """
    B, H, T, D = k_cache.shape
    scale = D ** -0.5 if scale is None else float(scale)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k_cache.float()) * scale      # (B, H, T)
    valid = torch.arange(T, device=k_cache.device) < lengths.to(k_cache.device)[:, None]  # (B, T)
    p = torch.softmax(s.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    p = torch.where(valid.any(1)[:, None, None], p, 0.0)                        # empty row -> 0, not NaN
    return torch.einsum("bht,bhtd->bhd", p, v_cache.float()).to(q.dtype)


def decode_attention_min_dalle(q, k_cache, v_cache, lengths, *, scale=None):
    """min-dalle's decoder self-attention step, in our [B, H, T, D] layout: the peer to beat.

    Every step attends over all T cache positions with an additive -1e12 bias on the unused ones,
    in the cache's dtype: reads all 2*B*H*T*D cache elements (not just the valid ones) and writes
    and reads two [B, H, T] temporaries (the scores, then the softmax).
    """
    T, D = k_cache.shape[2], k_cache.shape[3]
    scale = D ** -0.5 if scale is None else float(scale)
    mask = torch.arange(T, device=k_cache.device) < lengths.to(k_cache.device)[:, None]   # (B, T)
    bias = (1 - mask.to(q.dtype)) * -1e12
    w = torch.einsum("bhd,bhtd->bht", q * scale, k_cache) + bias[:, None, :]
    return torch.einsum("bht,bhtd->bhd", torch.softmax(w, -1), v_cache)


def decode_attention_cost(batch, heads, dim, kv_len, cache_bytes=2, q_bytes=None):
    """(bytes, flops) one call must at least move and compute: K and V read over the kv_len valid
    positions of each of the batch*heads rows (kv_len may be a mean), q read and the output written
    (q_bytes each, default cache_bytes); 2 FLOPs per multiply-add of q.k and of p*v."""
    q_bytes = cache_bytes if q_bytes is None else q_bytes
    rows = batch * heads
    return (2 * rows * kv_len * dim * cache_bytes + 2 * rows * dim * q_bytes, 4 * rows * kv_len * dim)


# ---- group norm + SiLU (VQGAN's ResNet blocks) -----------------------------------------------------
def group_norm_silu_ref(x, weight, bias, *, groups=32, eps=1e-6, silu=True, out_dtype=None):
    """silu(group_norm(x)) with fp32 statistics, affine and SiLU, rounded once to out_dtype (default
    x.dtype); x's memory format is kept. silu=False gives the bare GroupNorm.

    The fused kernels read x twice (statistics, then normalise) and write the output once:
    numel * (2 * x bytes + out bytes). torch's group_norm + silu_ (and this reference, which also
    makes an fp32 copy of a 16-bit x) read and write it three to four times.
    """
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # in NCHW: torch's channels-last group_norm keeps less precise statistics (7e-5 vs 2e-6 measured)
    y = torch.nn.functional.group_norm(x.float().contiguous(), groups, weight.float(), bias.float(), eps)
    if silu:
        y = torch.nn.functional.silu(y)
    return y.to(out_dtype or x.dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)


def group_norm_silu_cost(numel, in_bytes=2, out_bytes=None):
    """(bytes, flops) of one fused call: x read twice, the output written once; about 30 FLOPs per
    element (statistics 3, normalise 2, SiLU's exp and division ~25)."""
    out_bytes = in_bytes if out_bytes is None else out_bytes
    return numel * (2 * in_bytes + out_bytes), 30 * numel
