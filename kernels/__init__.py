"""mmfast.kernels — the only dispatcher of the fused ops.

Every op has three implementations with one name: the PyTorch reference (`ref.<op>_ref`), a
Triton kernel (`<op>.py`, used for CUDA tensors) and a C++ kernel (`cpu/<op>.cpp`, in
`mmfast._C`, used for CPU tensors). Models call the functions below and never import Triton or
`_C` themselves. `MMFAST_KERNELS=ref` forces the reference everywhere (debugging, bisecting).

Inputs are validated here, at the public boundary; the implementations only assert.
"""
from __future__ import annotations

import os

import torch

from . import ref

try:  # the compiled CPU kernels; absent only in a source tree that was never built
    from mmfast import _C
except ImportError:  # pragma: no cover - exercised only on broken installs
    _C = None

__all__ = ["similarity_topk", "similarity", "similarity_prefilter", "nearest_code", "decode_attention",
           "group_norm_silu", "backend_for"]


def backend_for(t: torch.Tensor) -> str:
    """Which implementation serves tensors on `t`'s device: "triton", "cpu" or "ref"."""
    forced = os.environ.get("MMFAST_KERNELS", "")
    if forced == "ref":
        return "ref"
    if t.is_cuda:
        return "triton"
    if t.device.type == "cpu" and _C is not None:
        return "cpu"
    return "ref"


# ---- similarity (fused L2-normalize + dot + scale (+ top-k)) -------------------------------------
_GALLERY_KINDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8"}


def _require_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}; "
                        "wrap it with torch.as_tensor(...)")


def _check_similarity(fn, queries, gallery, scale, gallery_scale):
    """Validate at the boundary; returns the logit scale as a float (or None)."""
    for name, t, rows in (("queries", queries, "Q"), ("gallery", gallery, "N")):
        _require_tensor(fn, name, t)
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D [{rows}, D], got shape {tuple(t.shape)}; "
                             "use x[None] for a single vector")
    if queries.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: queries must be float32, float16 or bfloat16, got {queries.dtype}")
    if gallery.dtype not in _GALLERY_KINDS:
        raise TypeError(f"{fn}: gallery must be float32, float16, bfloat16 or int8 (with "
                        f"gallery_scale), got {gallery.dtype}")
    if queries.device != gallery.device:
        raise ValueError(f"{fn}: queries are on {queries.device} but the gallery is on "
                         f"{gallery.device}; move the queries with .to({str(gallery.device)!r})")
    if queries.shape[1] != gallery.shape[1] or gallery.shape[1] == 0:
        raise ValueError(f"{fn}: queries have D={queries.shape[1]} but the gallery has "
                         f"D={gallery.shape[1]}; both must share one embedding dimension > 0")
    if gallery.shape[0] == 0:
        raise ValueError(f"{fn}: the gallery is empty (shape {tuple(gallery.shape)}); add vectors first")
    if gallery.dtype == torch.int8:
        if not isinstance(gallery_scale, torch.Tensor) or gallery_scale.shape != (gallery.shape[0],) \
                or gallery_scale.dtype != torch.float32 or gallery_scale.device != gallery.device:
            got = tuple(gallery_scale.shape) if isinstance(gallery_scale, torch.Tensor) else gallery_scale
            raise ValueError(f"{fn}: an int8 gallery needs gallery_scale, a float32 tensor of shape "
                             f"({gallery.shape[0]},) on {gallery.device} (row = int8 values * scale); got {got}")
    elif gallery_scale is not None:
        raise ValueError(f"{fn}: gallery_scale is only for int8 galleries, got a {gallery.dtype} gallery")
    if not bool(torch.isfinite(queries).all()):
        raise ValueError(f"{fn}: queries contain NaN or inf; drop or fix those rows first")
    if scale is not None:
        try:
            scale = float(scale)  # also takes CLIP's 0-d logit_scale tensor
        except (TypeError, ValueError, RuntimeError):  # a string, a list, a tensor of several values
            raise TypeError(f"{fn}: scale must be a number or a 0-d tensor, got {type(scale).__name__}") from None
        if scale != scale or scale in (float("inf"), float("-inf")):
            raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return scale


def _prepared_queries(queries, scale, normalize):
    """[Q, D] float32 contiguous: L2-normalised (a zero query stays zero) and scaled, so that the
    kernels' top-k of q . g is the top-k of the scaled scores whatever the sign of `scale`."""
    q = queries.float()
    if normalize:
        q = torch.nn.functional.normalize(q, dim=-1)
    if scale is not None:
        q = q * scale
    return q.contiguous()


def _cpu_views(q, gallery, gallery_scale):
    """numpy views for mmfast._C (no copies): 16-bit galleries travel as int16 bit patterns."""
    g = gallery.detach()
    if g.stride(1) != 1:
        g = g.contiguous()  # the kernels need unit stride along D (any row stride is fine)
    g = g.view(torch.int16) if g.dtype in (torch.float16, torch.bfloat16) else g
    s = None if gallery_scale is None else gallery_scale.detach().contiguous().numpy()
    return q.detach().numpy(), g.numpy(), _GALLERY_KINDS[gallery.dtype], s


def _triton(op: str):
    """kernels/triton/<op>.py, imported on first CUDA use (it needs triton)."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.triton.{op}")
    except ImportError as err:
        raise ImportError(f"{op} on CUDA tensors needs triton: pip install 'mmfast[gpu]'") from err


def similarity_prefilter(gallery, *, chunk=65536):
    """The int8 "shadow" copy of a float16 / bfloat16 gallery for ``similarity_topk(prefilter=...)``.

    Returns ``(codes [N, D] int8, code_scale [N] float32, code_err [N] float32)``: row i is about
    ``codes[i] * code_scale[i]`` (symmetric per-row quantisation), and ``code_err[i]`` bounds, rounded
    up, ``|gallery[i] - codes[i] * code_scale[i]|_2 + (D + 2) * 2**-24 * |gallery[i]|_2`` (the second
    term covers the fp32 rounding of an exact rescoring). The search relies on that bound for its
    exactness, so build the tuple here rather than by hand. +50% memory over the 16-bit gallery.
    A row holding NaN/inf gets code_err = inf (always rescored).

    Example
    -------
    >>> pre = similarity_prefilter(gallery)            # once, when the gallery is built
    >>> scores, ids = similarity_topk(queries, gallery, k=10, prefilter=pre)
    """
    _require_tensor("similarity_prefilter", "gallery", gallery)
    if gallery.dim() != 2 or gallery.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"similarity_prefilter: gallery must be a 2-D float16 or bfloat16 tensor, got "
                        f"{gallery.dtype} of shape {tuple(gallery.shape)}; other dtypes gain nothing from it")
    n, d = gallery.shape
    if d == 0:
        raise ValueError(f"similarity_prefilter: gallery rows are empty (shape {tuple(gallery.shape)}); "
                         "embeddings need a dimension >= 1")
    codes = torch.empty(n, d, dtype=torch.int8, device=gallery.device)
    code_scale = torch.empty(n, dtype=torch.float32, device=gallery.device)
    code_err = torch.empty(n, dtype=torch.float32, device=gallery.device)
    for a in range(0, n, chunk):  # float64 temporaries stay chunk x D
        g = gallery[a:a + chunk].double()                                   # exact copy of the 16-bit values
        finite = torch.isfinite(g).all(dim=1)
        g = torch.where(finite[:, None], g, 0.0)
        amax = g.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127, 1.0).float()                 # the scale the kernel sees
        c = torch.round(g / s.double()[:, None]).clamp_(-127, 127)
        err = (g - c * s.double()[:, None]).norm(dim=1) + (d + 2) * 2.0 ** -24 * g.norm(dim=1)
        err = (err * (1 + 1e-6)).float()
        err = torch.nextafter(err, torch.full_like(err, float("inf")))     # round up past float32 rounding
        codes[a:a + chunk] = c.to(torch.int8)
        code_scale[a:a + chunk] = s
        code_err[a:a + chunk] = torch.where(finite, err, float("inf"))
    return codes, code_scale, code_err


def _check_prefilter(fn, gallery, prefilter):
    """Validate similarity_topk's prefilter tuple against the gallery; returns it."""
    n = gallery.shape[0]
    fix = "build it with mmfast.kernels.similarity_prefilter(gallery)"
    if gallery.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{fn}: prefilter is only for float16 / bfloat16 galleries, got a {gallery.dtype} "
                         "gallery; search it without prefilter")
    if not isinstance(prefilter, tuple) or len(prefilter) != 3 or \
            not all(isinstance(t, torch.Tensor) for t in prefilter):
        raise TypeError(f"{fn}: prefilter must be a tuple (codes, code_scale, code_err) of tensors, got "
                        f"{type(prefilter).__name__}; {fix}")
    codes, cs, ce = prefilter
    want = ((codes, tuple(gallery.shape), torch.int8), (cs, (n,), torch.float32), (ce, (n,), torch.float32))
    for t, shape, dtype in want:
        if tuple(t.shape) != shape or t.dtype != dtype or t.device != gallery.device:
            raise ValueError(f"{fn}: prefilter must be (codes int8 {tuple(gallery.shape)}, code_scale float32 "
                             f"({n},), code_err float32 ({n},)) on {gallery.device}, got "
                             f"{[(str(x.dtype), tuple(x.shape), str(x.device)) for x in prefilter]}; {fix}")
    return prefilter


def similarity_topk(queries, gallery, k, *, scale=None, normalize_queries=True, gallery_scale=None,
                    prefilter=None):
    """Exact top-k cosine similarity of each query against a gallery, without the [Q, N] matrix.

    Parameters
    ----------
    queries : Tensor [Q, D], float32 / float16 / bfloat16. L2-normalised here (unless
        ``normalize_queries=False``); a zero query scores 0 against every row. NaN/inf -> ValueError.
    gallery : Tensor [N, D], float32 / float16 / bfloat16, or int8 with ``gallery_scale``; rows are
        expected to be unit-norm already (``mmfast.SimilarityIndex`` stores them so). Same device.
        A row holding NaN scores -inf (ranks last).
    k : int, 1 <= k <= N.
    scale : optional float (e.g. CLIP's ``logit_scale.exp()``) multiplying every score.
    gallery_scale : Tensor [N] float32, int8 galleries only: row i is ``gallery[i] * gallery_scale[i]``.
    prefilter : optional ``similarity_prefilter(gallery)`` tuple, float16 / bfloat16 galleries only.
        On CPU with more than 8 queries, the int8 copy is scanned with VNNI integer dot products and
        only rows whose error bound reaches the current k-th best are rescored from ``gallery``: the
        result is identical to the search without it (same scores; same ids up to exact ties), just
        faster. Elsewhere (CUDA, the reference, <= 8 queries: memory-bound) it is ignored.

    Returns
    -------
    (scores [Q, k] float32, ids [Q, k] int64), best first; ties go to the smaller id.

    Example
    -------
    >>> scores, ids = similarity_topk(text_emb, image_emb.half(), k=5, scale=100.0)
    """
    scale = _check_similarity("similarity_topk", queries, gallery, scale, gallery_scale)
    if prefilter is not None:
        _check_prefilter("similarity_topk", gallery, prefilter)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"similarity_topk: k must be an int in [1, {gallery.shape[0]}] (the gallery "
                         f"size), got {k!r}; lower k or add more vectors")
    if queries.shape[0] == 0:
        return (torch.empty(0, k, dtype=torch.float32, device=gallery.device),
                torch.empty(0, k, dtype=torch.int64, device=gallery.device))
    backend = backend_for(gallery)
    if backend == "ref":
        return ref.similarity_topk_ref(queries, gallery, k, scale=scale, normalize_queries=normalize_queries,
                                       gallery_scale=gallery_scale)
    q = _prepared_queries(queries, scale, normalize_queries)
    if backend == "triton":
        return _triton("similarity").similarity_topk(q, gallery, k, gallery_scale=gallery_scale)
    scores = torch.empty(q.shape[0], k, dtype=torch.float32)
    ids = torch.empty(q.shape[0], k, dtype=torch.int64)
    qn, gn, kind, sn = _cpu_views(q, gallery, gallery_scale)
    if prefilter is None:
        _C.similarity_topk(qn, gn, kind, sn, k, scores.numpy(), ids.numpy())
    else:
        codes, cs, ce = (t.detach() for t in prefilter)
        codes = codes if codes.stride(1) == 1 else codes.contiguous()
        _C.similarity_topk_prefilter(qn, gn, kind, codes.numpy(), cs.contiguous().numpy(),
                                     ce.contiguous().numpy(), k, scores.numpy(), ids.numpy())
    return scores, ids


def similarity(queries, gallery, *, scale=None, gallery_scale=None):
    """Fused normalize(queries) @ gallery.T * scale -> [Q, N] float32, for small N (zero-shot
    classification: N images x L label embeddings). Same inputs and rules as `similarity_topk`.

    Example
    -------
    >>> probs = similarity(image_emb, label_emb, scale=100.0).softmax(dim=-1)
    """
    scale = _check_similarity("similarity", queries, gallery, scale, gallery_scale)
    if queries.shape[0] == 0:
        return torch.empty(0, gallery.shape[0], dtype=torch.float32, device=gallery.device)
    backend = backend_for(gallery)
    if backend == "ref":
        return ref.similarity_ref(queries, gallery, scale=scale, gallery_scale=gallery_scale)
    q = _prepared_queries(queries, scale, True)
    if backend == "triton":
        return _triton("similarity").similarity(q, gallery, gallery_scale=gallery_scale)
    out = torch.empty(q.shape[0], gallery.shape[0], dtype=torch.float32)
    qn, gn, kind, sn = _cpu_views(q, gallery, gallery_scale)
    _C.similarity(qn, gn, kind, sn, out.numpy())
    return out


# ---- nearest codebook vector (fused argmin_k ||x - e_k||^2) --------------------------------------
_CODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_nearest_code(x, codebook, codebook_sqnorm):
    fn = "nearest_code"
    for name, t in (("x", x), ("codebook", codebook)):
        _require_tensor(fn, name, t)
    if codebook.dim() != 2:
        raise ValueError(f"{fn}: codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}; "
                         "pass the embedding weight itself (e.g. quantize.embedding.weight)")
    K, D = codebook.shape
    if K == 0 or D == 0:
        raise ValueError(f"{fn}: codebook is empty (shape {tuple(codebook.shape)}); it needs at least "
                         "one code of dimension >= 1")
    if K > 2**31 - 1:
        raise ValueError(f"{fn}: codebook has {K} codes; at most 2**31 - 1 are supported")
    if x.dim() == 0 or x.shape[-1] != D:
        raise ValueError(f"{fn}: x must be [..., D] with D={D} (the codebook's), got shape "
                         f"{tuple(x.shape)}; a VQGAN latent [B, D, H, W] goes in as "
                         "z.permute(0, 2, 3, 1)")
    for name, t in (("x", x), ("codebook", codebook)):
        if t.dtype not in _CODE_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}; "
                            f"convert it with {name}.float()")
    if x.dtype != codebook.dtype:
        raise TypeError(f"{fn}: x is {x.dtype} but the codebook is {codebook.dtype}; cast x with "
                        f"x.to({codebook.dtype}) (accumulation is fp32 either way)")
    if x.device != codebook.device:
        raise ValueError(f"{fn}: x is on {x.device} but the codebook is on {codebook.device}; move x "
                         f"with x.to({str(codebook.device)!r})")
    if codebook_sqnorm is not None:
        if not isinstance(codebook_sqnorm, torch.Tensor):
            raise TypeError(f"{fn}: codebook_sqnorm must be a torch.Tensor or None, got "
                            f"{type(codebook_sqnorm).__name__}")
        if codebook_sqnorm.shape != (K,) or codebook_sqnorm.dtype != torch.float32 \
                or codebook_sqnorm.device != codebook.device:
            raise ValueError(f"{fn}: codebook_sqnorm must be a float32 tensor of shape ({K},) on "
                             f"{codebook.device}, got {codebook_sqnorm.dtype} {tuple(codebook_sqnorm.shape)} "
                             f"on {codebook_sqnorm.device}; compute it once with "
                             "codebook.float().pow(2).sum(1)")


def nearest_code(x, codebook, *, codebook_sqnorm=None, return_distance=False):
    """Index of the nearest codebook vector of every row of x (VQ-VAE / VQGAN quantization),
    without the [M, K] distance matrix.

    ``ids[...] = argmin_k ||x[..., :] - codebook[k]||^2``, computed as a running arg-max of
    ``x . e_k - ||e_k||^2 / 2`` with fp32 accumulation for every storage dtype.

    Parameters
    ----------
    x : Tensor [..., D], float32 / float16 / bfloat16 (e.g. a VQGAN latent as [B, H, W, D]).
    codebook : Tensor [K, D], same dtype and device as x.
    codebook_sqnorm : optional Tensor [K] float32, ``||e_k||^2``; a VQ model computes it once
        instead of on every call (``codebook.float().pow(2).sum(1)``).
    return_distance : also return ``||x - codebook[ids]||^2`` (float32, computed directly).

    Returns
    -------
    ids : Tensor x.shape[:-1], int64. Ties go to the lowest index. A row whose squared distance
        to its chosen code is not finite (a NaN or Inf in the row, or fp32 overflow) gets id -1
        (an embedding lookup with it raises instead of silently using code 0); codes holding
        NaN/Inf never win. Empty x (M = 0) gives an empty result.
    dist : Tensor x.shape[:-1], float32 (NaN where ids is -1); only with ``return_distance``.

    Example
    -------
    >>> ids = nearest_code(z.permute(0, 2, 3, 1), vq.embedding.weight)   # [B, H, W]
    >>> z_q = vq.embedding(ids).permute(0, 3, 1, 2)
    """
    _check_nearest_code(x, codebook, codebook_sqnorm)
    backend = backend_for(codebook)
    if backend == "ref":
        return ref.nearest_code_ref(x, codebook, codebook_sqnorm=codebook_sqnorm,
                                    return_distance=return_distance)
    D = codebook.shape[1]
    x2 = x.detach().reshape(-1, D)                                           # (M, D)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()  # the kernels need unit stride along D
    e = codebook.detach()
    e = e if e.stride(1) == 1 else e.contiguous()
    sq = None if codebook_sqnorm is None else codebook_sqnorm.detach().contiguous()
    if backend == "triton":
        ids, dist = _triton("codebook").nearest_code(x2, e, sq, return_distance)
    else:
        ids = torch.empty(x2.shape[0], dtype=torch.int64)
        dist = torch.empty(x2.shape[0], dtype=torch.float32) if return_distance else None
        if x2.shape[0]:
            # numpy views, no copies: 16-bit storage travels as int16 bit patterns
            as16 = x2.dtype != torch.float32
            xn = (x2.view(torch.int16) if as16 else x2).numpy()
            en = (e.view(torch.int16) if as16 else e).numpy()
            _C.nearest_code(xn, en, None if sq is None else sq.numpy(), ids.numpy(),
                            None if dist is None else dist.numpy(), str(x2.dtype).removeprefix("torch."))
    ids = ids.reshape(x.shape[:-1])
    return (ids, dist.reshape(x.shape[:-1])) if return_distance else ids


# ---- decode attention (one new query per row against a static KV cache) --------------------------
_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ATTN_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _check_decode_attention(q, k_cache, v_cache, lengths, scale, check_lengths):
    """Validate at the boundary; returns the softmax scale as a float."""
    fn = "decode_attention"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("lengths", lengths)):
        _require_tensor(fn, name, t)
    if q.dim() != 3:
        raise ValueError(f"{fn}: q must be 3-D [B, H, D] (one new token per row), got shape "
                         f"{tuple(q.shape)}; squeeze the query-length axis: q[:, :, 0] of a [B, H, 1, D] query")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D [B, H, T, D], got shape {tuple(t.shape)}; "
                             "allocate the cache once at its final length T")
    B, H, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must "
                         "have the same shape [B, H, T, D]")
    if (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != (B, H, D):
        raise ValueError(f"{fn}: q is [B, H, D] = {tuple(q.shape)} but the caches are [B, H, T, D] = "
                         f"{tuple(k_cache.shape)}; B, H and D must match (repeat grouped K/V heads first)")
    if D == 0 or k_cache.shape[2] == 0:
        raise ValueError(f"{fn}: k_cache and v_cache: head dim D and cache length T must be >= 1, got shape "
                         f"{tuple(k_cache.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in _ATTN_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}; "
                            f"convert it with {name}.to(torch.bfloat16) or .float()")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"{fn}: q, k_cache and v_cache must share one dtype, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}; cast q with q.to(k_cache.dtype)")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{fn}: lengths must be an int32 or int64 tensor, got {lengths.dtype}; "
                        "build it with torch.tensor(..., dtype=torch.int32)")
    if lengths.shape != (B,):
        raise ValueError(f"{fn}: lengths must be 1-D [B] = ({B},), one valid length per row, got shape "
                         f"{tuple(lengths.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("lengths", lengths)):
        if t.device != q.device:
            raise ValueError(f"{fn}: q is on {q.device} but {name} is on {t.device}; move it with "
                             f"{name}.to({str(q.device)!r})")
    if check_lengths and B:
        T = k_cache.shape[2]
        lo, hi = torch.aminmax(lengths)  # a host sync on CUDA: see check_lengths
        if int(lo) < 1 or int(hi) > T:
            b = int(((lengths < 1) | (lengths > T)).nonzero()[0, 0])
            n = int(lengths[b])
            fix = ("a length of 0 attends to nothing: write the new token's k/v into the cache first, "
                   "then attend with lengths = position + 1") if n < 1 else \
                f"allocate the cache at the final length (T >= {n}) or stop decoding at T"
            raise ValueError(f"{fn}: lengths must lie in [1, T={T}] (row b attends to cache positions "
                             f"[0, lengths[b])), got lengths[{b}] = {n}; {fix}")
    try:
        scale = D ** -0.5 if scale is None else float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{fn}: scale must be a number or None (D**-0.5), got {type(scale).__name__}") from None
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{fn}: scale must be finite, got {scale}; leave it None for D**-0.5")
    return scale


def _unit_d(t):
    """t itself (detached) when its last dim has unit stride (any other strides: a view of a bigger
    cache buffer is fine), else a contiguous copy (slow: a whole-cache copy per call)."""
    t = t.detach() if t.requires_grad else t
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _decode_attention_cpu(q, k, v, lengths, scale):
    """mmfast._C's kernel: faster than torch's SDPA at every DALL-E size measured (see the top of
    kernels/cpu/decode_attention.cpp). numpy views, no copies: 16-bit storage as int16 bit patterns."""
    if not hasattr(_C, "decode_attention"):  # pragma: no cover - a _C built before this op existed
        return ref.decode_attention_ref(q, k, v, lengths, scale=scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    if q.dtype == torch.float32:
        _C.decode_attention(q.numpy(), k.numpy(), v.numpy(), lengths.contiguous().numpy(), scale, out.numpy(),
                            "float32")
    else:
        i16 = torch.int16
        _C.decode_attention(q.view(i16).numpy(), k.view(i16).numpy(), v.view(i16).numpy(),
                            lengths.contiguous().numpy(), scale, out.view(i16).numpy(), _ATTN_NAMES[q.dtype])
    return out


def decode_attention(q, k_cache, v_cache, lengths, *, scale=None, check_lengths=True):
    """Attention of one new query per (row, head) over a static KV cache (KV-cached decoding).

    ``out[b, h] = softmax(scale * q[b, h] . k_cache[b, h, :L].T) @ v_cache[b, h, :L]`` with
    ``L = lengths[b]``: cache positions at or after ``lengths[b]`` are never read.

    Parameters
    ----------
    q : Tensor [B, H, D], float32 / float16 / bfloat16.
    k_cache, v_cache : Tensor [B, H, T, D], q's dtype and device; allocated once at the final length T.
        Any strides (e.g. a slice of a bigger [layers, B, H, T, D] buffer) as long as the last dim
        has unit stride; otherwise they are copied on every call.
    lengths : Tensor [B], int32 / int64, same device: row b attends to positions [0, lengths[b]),
        1 <= lengths[b] <= T.
    scale : optional float, default D**-0.5.
    check_lengths : check 1 <= lengths <= T here (default). On CUDA that reads the lengths back to
        the host, a sync per call: a decode loop passes False once its lengths are known good. Unchecked,
        a length outside [1, T] acts as clamped to [0, T], and a length of 0 gives a zero row (no NaN).

    Returns
    -------
    Tensor [B, H, D] in q's dtype; softmax and accumulation are fp32 for every dtype.

    Example
    -------
    >>> k_cache[:, :, t], v_cache[:, :, t] = k, v          # [B, H, D] each, the new token
    >>> out = decode_attention(q, k_cache, v_cache, lengths)  # lengths = t + 1 per row
    """
    scale = _check_decode_attention(q, k_cache, v_cache, lengths, scale, check_lengths)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return torch.empty_like(q)
    backend = backend_for(q)
    if backend == "ref":
        return ref.decode_attention_ref(q, k_cache, v_cache, lengths, scale=scale)
    q, k, v = _unit_d(q), _unit_d(k_cache), _unit_d(v_cache)
    if backend == "triton":
        return _triton("decode_attention").decode_attention(q, k, v, lengths, scale)
    if torch.compiler.is_compiling():  # the numpy views below would break torch.compile's graph
        return torch.ops.mmfast.decode_attention(q, k, v, lengths, scale)
    return _decode_attention_cpu(q, k, v, lengths, scale)


# The C++ kernel as a torch.library op, for torch.compile only: one node in the graph instead of a
# graph break at every call (eager calls skip the op's dispatch overhead and call the kernel directly).
@torch.library.custom_op("mmfast::decode_attention", mutates_args=(), device_types="cpu")
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                         scale: float) -> torch.Tensor:
    return _decode_attention_cpu(_unit_d(q), _unit_d(k_cache), _unit_d(v_cache), lengths, scale)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, lengths, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ---- group norm + SiLU (fused; fp32 statistics, 16-bit or fp32 storage) ---------------------------
_GN_KINDS = {torch.float32: "float32", torch.bfloat16: "bfloat16"}  # what the C++ kernel stores


def _check_group_norm(x, weight, bias, groups, out_dtype, inplace):
    fn = "group_norm_silu"
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        _require_tensor(fn, name, t)
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")
    C = x.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or C % groups:
        raise ValueError(f"{fn}: groups must be a positive int dividing the {C} channels, got {groups!r}")
    if x.numel() and C // groups * x.shape[2] * x.shape[3] < 2:  # torch's group_norm refuses it too
        raise ValueError(f"{fn}: x of shape {tuple(x.shape)} with groups={groups} has one value per group; "
                         "its variance is undefined, use fewer groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,) or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"{fn}: {name} must be a float tensor of shape ({C},) on {x.device} (one value "
                             f"per channel), got {t.dtype} {tuple(t.shape)} on {t.device}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if inplace and out_dtype != x.dtype:
        raise ValueError(f"{fn}: inplace=True writes into x, so out_dtype must be x's {x.dtype}, got {out_dtype}")
    return out_dtype


def group_norm_silu(x, weight, bias, *, groups=32, eps=1e-6, silu=True, out_dtype=None, inplace=False):
    """``silu(group_norm(x, groups, weight, bias, eps))`` fused: fp32 statistics, one rounding.

    Parameters
    ----------
    x : Tensor [B, C, H, W], float32 / bfloat16 (float16 and other layouts take the reference).
        Fastest channels-last (``x.contiguous(memory_format=torch.channels_last)``) or contiguous.
    weight, bias : Tensor [C], the GroupNorm affine (used in fp32).
    silu : False gives the bare GroupNorm (a VQGAN attention block's norm).
    out_dtype : output dtype, default x.dtype; bf16 in, fp32 out reads 16-bit x and writes fp32 with
        no fp32 copy of x (a VQGAN decoder's last norm).
    inplace : write the result into x (out_dtype must be x.dtype) and return x.

    Returns
    -------
    Tensor [B, C, H, W] in out_dtype and x's memory format.

    Example
    -------
    >>> h = group_norm_silu(x, norm.weight, norm.bias, groups=32, eps=norm.eps)   # then conv(h)
    """
    out_dtype = _check_group_norm(x, weight, bias, groups, out_dtype, inplace)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad) \
            and x.dtype == out_dtype and x.dtype in (torch.float32, torch.bfloat16) \
            and weight.dtype == bias.dtype == torch.float32 and x.is_contiguous():
        # training (tools/train_demo.py trains mmfast's VQGAN, bf16-autocast where the CPU has native
        # bf16): torch's own differentiable ops in x's dtype (group_norm keeps fp32 statistics and
        # fp32 affine for a bf16 x), a new tensor (its backward reads x); autocast would otherwise
        # upcast a bf16 x to fp32 and back. ~2.8x faster than the reference's fp32 detour measured.
        with torch.autocast(x.device.type, enabled=False):
            y = torch.nn.functional.group_norm(x, groups, weight, bias, eps)
            return torch.nn.functional.silu(y) if silu else y
    B, C, H, W = x.shape
    cl = x.is_contiguous(memory_format=torch.channels_last)
    if backend_for(x) != "cpu" or x.dtype not in _GN_KINDS or out_dtype not in _GN_KINDS or \
            not (cl or x.is_contiguous()) or (torch.is_grad_enabled() and x.requires_grad):
        y = ref.group_norm_silu_ref(x, weight, bias, groups=groups, eps=eps, silu=silu, out_dtype=out_dtype)
        # under autograd, group_norm's backward reads x: writing into it would break training
        # (tools/train_demo.py trains mmfast's VQGAN), so a differentiable call returns a new tensor
        return x.copy_(y) if inplace and not (torch.is_grad_enabled() and x.requires_grad) else y
    out = x if inplace else torch.empty(x.shape, dtype=out_dtype, device=x.device,
                                        memory_format=torch.channels_last if cl else torch.contiguous_format)

    def view(t):  # numpy view [B, HW, C] (channels-last) or [B, C, HW]; 16-bit as int16 bits
        t = t.detach()
        t = t.permute(0, 2, 3, 1).reshape(B, H * W, C) if cl else t.reshape(B, C, H * W)
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()

    w, b = (t.detach().float().contiguous().numpy() for t in (weight, bias))
    _C.group_norm_silu(view(x), view(out), w, b, groups, float(eps), bool(silu), cl, _GN_KINDS[x.dtype],
                       _GN_KINDS[out_dtype])
    return out
