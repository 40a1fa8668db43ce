"""Triton: split-KV decode attention, one query per (row, head) against a static KV cache.

Decoding is memory-bound: each step reads the valid part of K and V once (2*L*D elements per
(row, head)) for 4*L*D FLOPs, so the kernel's job is to spread that read over the whole GPU. With
B*H of 32..512 rows there are too few (row, head) pairs to fill 132 SMs, so pass 1 also splits each
row's valid positions [0, L) into NUM_SPLITS chunks (flash-decoding): program (bh, s) walks its
chunk in BLOCK_T tiles with an online softmax and writes a partial (max m, sum l, unnormalised
acc[D]) in fp32. Pass 2 merges the splits of a row: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.

Chunks follow the row's length, not T, so every split gets an equal share of the work at every
step; a split whose chunk starts at or past L (short rows, or more splits than tiles) is empty:
it writes m = -inf, l = 0, acc = 0 and contributes nothing. A row of length 0 (only possible with
check_lengths=False) gives zeros, not NaN.

No tl.dot: one query per row makes q.k a [BLOCK_T, D] multiply-and-row-sum and p.v a column sum,
which keeps the kernel free of tl.dot's minimum shapes (>= 16 on the GPU) for any D, and costs
nothing in a kernel bound by the cache read. 16-bit K/V are converted to fp32 on load (the
interpreter's bf16 arithmetic is broken, triton #11584, and fp32 math is what we promise anyway).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr,           # q: (B, H, D), k/v: (B, H, T, D), lengths: (B,)
    part_ptr, out_ptr,                      # part: (B*H, NUM_SPLITS, D + 2) fp32; out: (B, H, D)
    H, T, D, qk_scale,                      # qk_scale = scale * log2(e): the softmax runs in base 2
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    NUM_SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DIRECT: tl.constexpr,                   # NUM_SPLITS == 1: normalise and write out here, no pass 2
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    length = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int32), 0), T)   # clamped: memory-safe
    # this split's chunk of [0, length), in whole tiles
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_T) * BLOCK_T
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + dd, mask=d_ok, other=0.0).to(tl.float32)
    q = q * qk_scale
    k_row = k_ptr + b * stride_kb + h * stride_kh
    v_row = v_ptr + b * stride_vb + h * stride_vh
    m = tl.full([1], float("-inf"), tl.float32)          # running max (base-2 logits)
    l = tl.zeros([1], tl.float32)                         # running sum of 2^(s - m)
    acc = tl.zeros([BLOCK_D], tl.float32)                 # running sum of 2^(s - m) * v
    for t0 in range(start, end, BLOCK_T):                 # every tile holds >= 1 valid position
        tt = t0 + tl.arange(0, BLOCK_T)
        t_ok = tt < end
        ok = t_ok[:, None] & d_ok[None, :]
        toff = tt.to(tl.int64)[:, None]
        k = tl.load(k_row + toff * stride_kt + dd[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.sum(q[None, :] * k, axis=1)                                   # (BLOCK_T,)
        s = tl.where(t_ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))                             # finite: a valid position
        alpha = tl.exp2(m - m_new)                                           # 0 on the first tile
        p = tl.exp2(s - m_new)                                               # 0 where masked
        v = tl.load(v_row + toff * stride_vt + dd[None, :], mask=ok, other=0.0).to(tl.float32)
        l = l * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    if DIRECT:
        out = acc / tl.where(l > 0, l, 1.0)                                  # empty row -> zeros
        tl.store(out_ptr + bh * D + dd, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:
        part = part_ptr + (bh * NUM_SPLITS + split).to(tl.int64) * (D + 2)
        tl.store(part + dd, acc, mask=d_ok)
        one = tl.arange(0, 1)
        tl.store(part + D + one, m)
        tl.store(part + D + 1 + one, l)


@triton.jit
def _decode_attention_merge_kernel(
    part_ptr, out_ptr, D,                   # part: (B*H, NUM_SPLITS, D + 2) fp32; out: (B*H, D)
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    ss = tl.arange(0, BLOCK_S)
    s_ok = ss < NUM_SPLITS
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    part = part_ptr + (bh * NUM_SPLITS + ss).to(tl.int64)[:, None] * (D + 2)   # (BLOCK_S, 1)
    m = tl.load(part + D, mask=s_ok[:, None], other=float("-inf"))              # (BLOCK_S, 1)
    l = tl.load(part + D + 1, mask=s_ok[:, None], other=0.0)
    acc = tl.load(part + dd[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    big = tl.max(m, axis=0)                                                     # (1,)
    big = tl.where(big > float("-inf"), big, 0.0)         # every split empty: weights 0, not NaN
    w = tl.exp2(m - big[None, :])                         # an empty split (m = -inf) weighs 0
    den = tl.sum(w * l, axis=0)
    out = tl.sum(w * acc, axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + bh * D + dd, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_attention(q, k, v, lengths, scale, num_splits=None):
    """Launch the kernels. q: (B, H, D); k, v: (B, H, T, D) with unit stride along D (any other
    strides); lengths: (B,) int32/int64; scale: float. Returns (B, H, D) in q's dtype. Inputs are
    validated by mmfast.kernels.decode_attention; here they are only asserted. num_splits: chunks
    per row (default: enough programs to fill the GPU; 1 under the interpreter)."""
    B, H, D = q.shape
    T = k.shape[2]
    assert k.shape == v.shape == (B, H, T, D) and lengths.shape == (B,)
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert D == 1 or (q.stride(2) == 1 and k.stride(3) == 1 and v.stride(3) == 1)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B * H == 0:
        return out
    block_d = triton.next_power_of_2(D)
    # a [BLOCK_T, BLOCK_D] fp32 tile of K and one of V live in registers: ~8K elements per tile
    block_t = max(16, min(128, 8192 // block_d, triton.next_power_of_2(T)))
    if num_splits is None:
        if q.is_cuda:  # a function of the shapes only (not of lengths): capturable in a CUDA graph
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            num_splits = max(1, min(triton.cdiv(2 * sms, B * H), triton.cdiv(T, block_t)))
        else:          # the interpreter: few, big programs
            num_splits = 1
    assert num_splits >= 1
    part = torch.empty(B * H, num_splits, D + 2, dtype=torch.float32, device=q.device) \
        if num_splits > 1 else out  # dummy when DIRECT, never touched
    num_warps = 4 if block_t * block_d <= 4096 else 8
    _decode_attention_kernel[(B * H, num_splits)](
        q, k, v, lengths, part, out,
        H, T, D, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        NUM_SPLITS=num_splits, BLOCK_T=block_t, BLOCK_D=block_d, DIRECT=num_splits == 1,
        num_warps=num_warps,
    )
    if num_splits > 1:
        _decode_attention_merge_kernel[(B * H,)](
            part, out, D, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d, num_warps=4,
        )
    return out
