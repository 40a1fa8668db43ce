# Type stub for mmfast._C (kernels/cpu/*.cpp). Each op documents its functions in its section.

# ---- similarity (kernels/cpu/similarity.cpp) ------------------------------------------------------
import numpy as np

def similarity_topk(queries: np.ndarray, gallery: np.ndarray, kind: str, gallery_scale: np.ndarray | None,
                    k: int, scores: np.ndarray, ids: np.ndarray) -> None:
    """Exact top-k of queries . gallery^T, best first (ties to the smaller id, NaN scores as -inf),
    written into scores (float32 [Q, k]) and ids (int64 [Q, k]), both C-contiguous. queries: float32
    [Q, D] C-contiguous, already normalised and scaled. gallery: [N, D] with unit stride along D (any
    row stride): float32, or int16 bit views of fp16/bf16, or int8; kind names the real type
    ("fp32" | "fp16" | "bf16" | "int8"). gallery_scale: float32 [N] for int8 (row = values * scale),
    else None. Releases the GIL. Validation with helpful messages lives in mmfast.kernels."""

def similarity_topk_prefilter(queries: np.ndarray, gallery: np.ndarray, kind: str, codes: np.ndarray,
                              code_scale: np.ndarray, code_err: np.ndarray, k: int, scores: np.ndarray,
                              ids: np.ndarray) -> None:
    """similarity_topk of a 16-bit gallery (kind "fp16" | "bf16", int16 bit view), with the same result,
    prefiltered by its int8 copy: codes int8 [N, D] (unit stride along D), code_scale float32 [N],
    code_err float32 [N] >= |gallery[i] - codes[i] * code_scale[i]|_2 + (D + 2) * 2^-24 * |gallery[i]|_2
    (mmfast.kernels.similarity_prefilter builds all three). Uses VNNI for Q > 8, else the plain scan."""

def similarity(queries: np.ndarray, gallery: np.ndarray, kind: str, gallery_scale: np.ndarray | None,
               out: np.ndarray) -> None:
    """out (float32 [Q, N], C-contiguous) = queries . gallery^T; arguments as in similarity_topk."""

# ---- nearest codebook vector (kernels/cpu/codebook.cpp) -------------------------------------------
import numpy as np

def nearest_code(x: np.ndarray, codebook: np.ndarray, sqnorm: np.ndarray | None, ids: np.ndarray,
                 dist: np.ndarray | None, dtype: str) -> None:
    """ids[m] = argmin_k |x[m] - codebook[k]|^2, written into ids (int64 [M], contiguous) and, if
    given, the squared distance into dist (float32 [M]). x: [M, D], codebook: [K, D], rows of unit
    stride; float32 arrays, or int16 views of float16/bfloat16 storage with dtype naming the real
    type ("float32" | "float16" | "bfloat16"). sqnorm: float32 [K] |e_k|^2 or None. Releases the
    GIL. Validation with helpful messages lives in mmfast.kernels.nearest_code."""

def nearest_code_temp_bytes(M: int, K: int, D: int, dtype: str) -> int:
    """Bytes of temporaries nearest_code allocates for [M, D] x [K, D] (outputs excluded)."""

# ---- decode attention (kernels/cpu/decode_attention.cpp) ------------------------------------------
import numpy as np

def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray, scale: float,
                     out: np.ndarray, dtype: str) -> None:
    """out[b, h] = softmax(scale * q[b, h] . k[b, h, :L].T) @ v[b, h, :L] with L = lengths[b] clamped to
    [0, T] (L = 0: zeros), written into out ([B, H, D], C-contiguous, q's storage). q: [B, H, D]; k, v:
    [B, H, T, D]; any strides with unit stride along D; float32 arrays, or int16 views of float16 /
    bfloat16 storage with dtype naming the real type ("float32" | "float16" | "bfloat16"). lengths:
    contiguous int32 or int64 [B]. fp32 math. Releases the GIL. Validation with helpful messages lives
    in mmfast.kernels.decode_attention."""

# ---- group norm + SiLU (kernels/cpu/group_norm.cpp) -----------------------------------------------
import numpy as np

def group_norm_silu(x: np.ndarray, out: np.ndarray, gamma: np.ndarray, beta: np.ndarray, groups: int,
                    eps: float, silu: bool, channels_last: bool, in_dtype: str, out_dtype: str) -> None:
    """out = silu(group_norm(x)) (silu=False: the bare GroupNorm), fp32 statistics. x, out: C-contiguous
    3-D arrays of one shape, [B, HW, C] when channels_last else [B, C, HW]; float32 arrays, or int16
    views of bfloat16 storage, in_dtype / out_dtype naming the real types ("float32" | "bfloat16");
    out may be x itself (same dtype). gamma, beta: float32 [C]. Releases the GIL. Validation with
    helpful messages lives in mmfast.kernels.group_norm_silu."""
