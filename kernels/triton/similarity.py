"""Triton (CUDA): fused similarity + exact top-k over a gallery, never the [Q, N] score matrix.

Grid (query blocks, gallery splits). Program (i, s) scores BLOCK_Q queries against split s of the
gallery, one [BLOCK_Q, BLOCK_N] tile at a time (tl.dot over D in BLOCK_D chunks), and keeps a
running top-K_PAD per query in registers (an unsorted set). Scores travel as packed int64 keys: the fp32 bits, made
order-preserving, in the high word and ~row in the low word, so one integer top-k sorts by score
and breaks ties towards the smaller id. Each split writes K_PAD keys per query; the launcher merges
and sorts the [Q, splits * K_PAD] candidates with one torch.topk (the small second stage).

Reads the gallery once (N * D * bytes) and writes Q * splits * K_PAD * 8 bytes; 2 * Q * N * D FLOPs.
Queries arrive normalised and scaled (kernels/__init__.py). Under TRITON_INTERPRET=1 (the tests) the
same kernel runs on CPU tensors; there, bf16 math is broken, so 16-bit tiles are widened to fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_MIN_KEY = tl.constexpr(-(2**63))  # below every real key (-inf scores included): marks padding


@triton.jit
def _similarity_topk_kernel(q_ptr, g_ptr, gs_ptr, keys_ptr, Q, N, D, stride_g, rows_per_split,
                            BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            K_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_F16: tl.constexpr,
                            IEEE: tl.constexpr, DENSE: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = pid_s * rows_per_split
    row1 = tl.minimum(row0 + rows_per_split, N)
    offs_k = tl.arange(0, K_PAD)
    best = tl.full([BLOCK_Q, K_PAD], _MIN_KEY, tl.int64)                  # running top-K_PAD keys
    for n0 in range(row0, row1, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            qt = tl.load(q_ptr + offs_q[:, None] * D + dd[None, :],
                         mask=(offs_q[:, None] < Q) & (dd[None, :] < D), other=0.0)       # [BQ, BD]
            gt = tl.load(g_ptr + offs_n[None, :].to(tl.int64) * stride_g + dd[:, None],
                         mask=(offs_n[None, :] < row1) & (dd[:, None] < D), other=0)     # [BD, BN]
            if DOT_F16:  # fp16 / int8 galleries: both exact in fp16, tensor cores at full rate
                acc += tl.dot(qt.to(tl.float16), gt.to(tl.float16))
            elif IEEE:   # fp32 galleries: full fp32 products (tf32 would round them like fp16)
                acc += tl.dot(qt, gt.to(tl.float32), input_precision="ieee")
            else:        # bf16 galleries: widened to fp32 (bf16 is exact in tf32)
                acc += tl.dot(qt, gt.to(tl.float32))
        if HAS_SCALE:    # int8 rows: values * per-row scale
            acc *= tl.load(gs_ptr + offs_n, mask=offs_n < row1, other=0.0)[None, :]
        if DENSE:        # similarity(): the scores themselves, one tile per program
            tl.store(keys_ptr + offs_q[:, None].to(tl.int64) * N + offs_n[None, :], acc,
                     mask=(offs_q[:, None] < Q) & (offs_n[None, :] < row1))
        else:
            acc = tl.where(acc != acc, float("-inf"), acc) + 0.0   # NaN ranks last; -0.0 -> +0.0
            bits = acc.to(tl.int32, bitcast=True)
            bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)     # integer order == float order
            low = 0xFFFFFFFF - offs_n.to(tl.int64)                 # smaller row -> larger key
            key = (bits.to(tl.int64) << 32) | low[None, :]
            key = tl.where(offs_n[None, :] < row1, key, _MIN_KEY)
            # Move the tile's keys that beat a query's current K_PAD-th best into `best` (an
            # unsorted set), one per query per step: a step is a few reductions, and after the
            # first tiles most tiles need none. No sorting network: tl.topk's bitonic sort crawls
            # under the interpreter, and the launcher's torch.topk sorts the survivors anyway.
            kth = tl.min(best, axis=1)                                 # [BQ]
            m = tl.max(key, axis=1)                                    # [BQ]
            while tl.max((m > kth).to(tl.int32), axis=0) > 0:
                slot = tl.argmin(best, axis=1)                         # the current K_PAD-th best
                put = (offs_k[None, :] == slot[:, None]) & (m > kth)[:, None]
                best = tl.where(put, m[:, None], best)
                key = tl.where(key == m[:, None], _MIN_KEY, key)      # keys are unique (row bits)
                kth = tl.min(best, axis=1)
                m = tl.max(key, axis=1)
    if not DENSE:
        out = keys_ptr + (pid_s * Q + offs_q[:, None]).to(tl.int64) * K_PAD + offs_k[None, :]
        tl.store(out, best, mask=offs_q[:, None] < Q)


def _blocks(D, k, n_rows, gallery):
    """Block sizes: every tl.dot dimension >= 16 (the GPU's minimum for 16-bit inputs; the
    interpreter would accept less), powers of two."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    k_pad = max(2, triton.next_power_of_2(k))
    block_d = max(16, min(triton.next_power_of_2(D), 256 if interpret else 64))
    block_n = 256 if interpret else 128
    block_q = 16
    assert min(block_q, block_n, block_d) >= 16
    if interpret:
        splits = 2  # few programs (the interpreter runs them one by one), but the merge is exercised
    else:
        splits = 4 * torch.cuda.get_device_properties(gallery.device).multi_processor_count
    return block_q, block_n, block_d, k_pad, splits


def _launch(q, gallery, k, gallery_scale, dense):
    assert q.dtype == torch.float32 and q.is_contiguous() and q.shape[1] == gallery.shape[1]
    assert gallery.stride(1) == 1 and q.device == gallery.device
    Q, D = q.shape
    N = gallery.shape[0]
    block_q, block_n, block_d, k_pad, splits = _blocks(D, k, N, gallery)
    q_blocks = triton.cdiv(Q, block_q)
    if dense:
        rows_per_split = block_n
    else:
        splits = max(1, min(triton.cdiv(N, block_n), splits // q_blocks or 1))
        rows_per_split = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    splits = triton.cdiv(N, rows_per_split)
    if dense:
        out = torch.empty(Q, N, dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(splits, Q, k_pad, dtype=torch.int64, device=q.device)
    gs = gallery_scale if gallery_scale is not None else q  # dummy pointer when unused
    _similarity_topk_kernel[(q_blocks, splits)](
        q, gallery, gs, out, Q, N, D, gallery.stride(0), rows_per_split,
        BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d, K_PAD=k_pad,
        HAS_SCALE=gallery_scale is not None, DOT_F16=gallery.dtype in (torch.float16, torch.int8),
        IEEE=gallery.dtype == torch.float32, DENSE=dense)
    return out


def similarity_topk(q, gallery, k, *, gallery_scale=None):
    """Launcher: q [Q, D] float32 (normalised, scaled), gallery [N, D] fp32/fp16/bf16/int8 (+ scale)
    -> (scores [Q, k] float32, ids [Q, k] int64), best first, ties to the smaller id."""
    keys = _launch(q, gallery, k, gallery_scale, dense=False)            # [splits, Q, K_PAD]
    keys = keys.permute(1, 0, 2).reshape(q.shape[0], -1)                 # [Q, splits * K_PAD]
    keys = torch.topk(keys, k, dim=1, sorted=True).values                # second stage: merge
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def similarity(q, gallery, *, gallery_scale=None):
    """Launcher: q [Q, D] float32 (normalised, scaled) . gallery^T -> [Q, N] float32."""
    return _launch(q, gallery, 1, gallery_scale, dense=True)
