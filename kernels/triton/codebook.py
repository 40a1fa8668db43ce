"""Triton: fused nearest codebook vector, ids = argmin_k ||x - e_k||^2, never an M x K matrix.

argmin_k ||x - e_k||^2 = argmax_k (x.e_k - ||e_k||^2 / 2). Each program holds BLOCK_M rows of x,
walks the codebook in BLOCK_K tiles with `tl.dot`, and keeps a running (max, argmax) per row in
registers; HBM traffic is x once plus the codebook once per program, and nothing M x K is stored.

Precision: the dot accumulates in fp32 for every storage dtype (fp16/bf16 products are exact in
fp32). fp32 inputs would default to TF32 on tensor cores (10-bit mantissa: near-ties between codes
would flip at ~1e-3 relative), so fp32 uses "tf32x3" on sm80+ (three TF32 products, about fp32
accuracy at tensor-core speed) and "ieee" elsewhere. The interpreter (TRITON_INTERPRET=1, CPU
tensors) runs "ieee", and computes bf16 in fp32: its bf16 arithmetic is broken (triton #11584).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nearest_code_kernel(
    x_ptr, e_ptr, sq_ptr, ids_ptr, dist_ptr,  # x: (M, D), e: (K, D), sq: (K,) fp32, ids/dist: (M,)
    M, K, D, stride_xm, stride_ek,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,      # D <= BLOCK_D: x stays in registers for the whole K loop
    HAS_SQNORM: tl.constexpr,      # ||e_k||^2 given by the caller, else computed from the tiles
    UPCAST: tl.constexpr,          # load 16-bit, compute fp32 (the interpreter's bf16 path)
    PRECISION: tl.constexpr,       # tl.dot input_precision for fp32 inputs
    RETURN_DISTANCE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)                       # (BM,)
    row_ok = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm            # (BM, 1)
    dd = tl.arange(0, BLOCK_D)
    if ONE_D_TILE:
        x = tl.load(x_rows + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_id = tl.full([BLOCK_M], -1, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)                             # (BK,)
        code_ok = codes < K
        e_cols = e_ptr + codes.to(tl.int64)[None, :] * stride_ek       # (1, BK)
        s = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        e2 = tl.zeros([BLOCK_K], tl.float32)
        if ONE_D_TILE:
            e = tl.load(e_cols + dd[:, None], mask=code_ok[None, :] & (dd[:, None] < D), other=0.0)
            if UPCAST:
                e = e.to(tl.float32)
            s = tl.dot(x, e, acc=s, input_precision=PRECISION)         # (BM, BD) @ (BD, BK)
            if not HAS_SQNORM:
                ef = e.to(tl.float32)
                e2 = tl.sum(ef * ef, axis=0)
        else:
            for d0 in range(0, D, BLOCK_D):
                d_ok = d0 + dd < D
                xd = tl.load(x_rows + d0 + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                e = tl.load(e_cols + d0 + dd[:, None], mask=code_ok[None, :] & d_ok[:, None], other=0.0)
                if UPCAST:
                    xd = xd.to(tl.float32)
                    e = e.to(tl.float32)
                s = tl.dot(xd, e, acc=s, input_precision=PRECISION)
                if not HAS_SQNORM:
                    ef = e.to(tl.float32)
                    e2 += tl.sum(ef * ef, axis=0)
        if HAS_SQNORM:
            e2 = tl.load(sq_ptr + codes, mask=code_ok, other=0.0)
        # padded codes and codes whose norm is not finite (NaN fails '<') can never win
        neg_half = tl.where(code_ok & (tl.abs(e2) < float("inf")), -0.5 * e2, float("-inf"))
        s = s + neg_half[None, :]
        s = tl.where(s == s, s, float("-inf"))                         # a NaN score never wins
        m, i = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = m > best                       # strict: an earlier tile keeps a tie
        best = tl.where(better, m, best)
        best_id = tl.where(better, i + k0, best_id)
    # ||x - e_best||^2 directly (no cancellation); a row whose distance is not finite (NaN/Inf in
    # x, fp32 overflow) or that never found a finite score gets id -1 and distance NaN
    found = best_id >= 0
    e_best = e_ptr + tl.where(found, best_id, 0).to(tl.int64)[:, None] * stride_ek
    dist = tl.zeros([BLOCK_M], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = (row_ok & found)[:, None] & (d0 + dd[None, :] < D)
        diff = (tl.load(x_rows + d0 + dd[None, :], mask=ok, other=0.0).to(tl.float32)
                - tl.load(e_best + d0 + dd[None, :], mask=ok, other=0.0).to(tl.float32))
        dist += tl.sum(diff * diff, axis=1)
    good = found & (dist < float("inf"))        # NaN fails '<' too
    tl.store(ids_ptr + rows, tl.where(good, best_id, -1).to(tl.int64), mask=row_ok)
    if RETURN_DISTANCE:
        tl.store(dist_ptr + rows, tl.where(good, dist, float("nan")), mask=row_ok)


def nearest_code(x, codebook, codebook_sqnorm=None, return_distance=False):
    """Launch the kernel. x: (M, D), codebook: (K, D), same float dtype and device, unit stride
    along D; codebook_sqnorm: (K,) fp32 or None. Returns ids (M,) int64 and dist (M,) fp32 or
    None. Inputs are validated by mmfast.kernels.nearest_code; here they are only asserted."""
    M, D = x.shape
    K = codebook.shape[0]
    assert codebook.shape[1] == D and (D == 1 or (x.stride(1) == 1 and codebook.stride(1) == 1))
    assert x.dtype == codebook.dtype and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert codebook_sqnorm is None or (codebook_sqnorm.shape == (K,)
                                       and codebook_sqnorm.dtype == torch.float32)
    ids = torch.empty(M, dtype=torch.int64, device=x.device)
    dist = torch.empty(M, dtype=torch.float32, device=x.device) if return_distance else None
    if M == 0:
        return ids, dist
    on_gpu = x.is_cuda
    if x.dtype == torch.float32:
        precision = "tf32x3" if on_gpu and torch.cuda.get_device_capability(x.device)[0] >= 8 else "ieee"
    else:
        precision = "tf32"  # the default; it only applies to fp32 inputs (16-bit: exact products)
    # tl.dot needs every dim >= 16 on the GPU (the interpreter does not check): D is padded up to
    # BLOCK_D >= 16 by masked loads; D beyond BLOCK_D loops over D tiles.
    block_d = max(16, min(triton.next_power_of_2(D), 128 if x.dtype == torch.float32 else 256))
    block_m, block_k = (64, 64) if on_gpu else (64, 128)  # interpreter: few, big programs
    assert block_m >= 16 and block_k >= 16 and block_d >= 16
    sq = codebook_sqnorm.contiguous() if codebook_sqnorm is not None else ids  # dummy, never read
    _nearest_code_kernel[(triton.cdiv(M, block_m),)](
        x, codebook, sq, ids, dist if dist is not None else ids,
        M, K, D, x.stride(0), codebook.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d, ONE_D_TILE=D <= block_d,
        HAS_SQNORM=codebook_sqnorm is not None, UPCAST=not on_gpu and x.dtype == torch.bfloat16,
        PRECISION=precision, RETURN_DISTANCE=return_distance,
        num_warps=8 if block_d > 64 else 4,
    )
    return ids, dist
