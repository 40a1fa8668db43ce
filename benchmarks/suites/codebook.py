"""Nearest codebook vector (VQ encode): mmfast.kernels.nearest_code vs the peers, in one process.

M = 16384 rows (64 images x 256 tokens), K codes of dimension D. Peers, all fp32:
taming-transformers' formula (z^2 + e^2 - 2 z e^T, argmin: the baseline), faiss IndexFlatL2
k=1, torch.cdist + argmin, and the bare x @ e.T (the GEMM inside every peer, no argmin: a
lower bound for them). mmfast runs fp32, and bf16 / fp16 storage (fp32 accumulation).
Quality: on 256 sampled rows, the largest excess of the chosen code's fp64 distance (to the
fp32 data) over the true minimum, relative to that minimum: 0 for an exact nearest code.
extra_mem_pct: mmfast's temporaries as a share of the 4*M*K bytes of the distance matrix.
"""
from __future__ import annotations

import torch

from ..harness import Case, Provider


def _quality(fn, x, e, rows):
    """max over sampled rows of (d(chosen) - d(nearest)) / d(nearest), fp64, fp32 data."""
    ids = fn(x[rows]).reshape(-1).long()
    x64, e64 = x[rows].double(), e.double()
    d2 = (x64 * x64).sum(1, keepdim=True) + (e64 * e64).sum(1) - 2 * x64 @ e64.T  # (S, K)
    best = d2.min(1).values
    excess = (d2.gather(1, ids[:, None])[:, 0] - best) / best.clamp_min(1e-30)
    return {"rel_excess_max": float(excess.max())}


def cases(args):
    import faiss

    from mmfast import _C, kernels
    from mmfast.kernels import ref

    M = 1024 if args.quick else 16384
    for K in ([1024] if args.quick else [1024, 8192, 16384]):
        for D in ([4, 64] if args.quick else [4, 64, 256]):
            g = torch.Generator().manual_seed(K + D)
            x, e = torch.randn(M, D, generator=g), torch.randn(K, D, generator=g)
            rows = torch.randperm(M, generator=g)[:256]
            x16 = {dt: (x.to(dt), e.to(dt)) for dt in (torch.bfloat16, torch.float16)}
            index = faiss.IndexFlatL2(D)
            index.add(e.numpy())
            xn = x.numpy()

            fns = {
                ("mmfast", "fp32"): lambda a: kernels.nearest_code(a, e),
                ("mmfast", "bf16"): lambda a: kernels.nearest_code(a.bfloat16(), x16[torch.bfloat16][1]),
                ("mmfast", "fp16"): lambda a: kernels.nearest_code(a.half(), x16[torch.float16][1]),
                ("taming formula", "fp32"): lambda a: ref.nearest_code_taming(a, e),
                ("faiss IndexFlatL2 k=1", "fp32"): lambda a: torch.from_numpy(index.search(a.numpy(), 1)[1]),
                ("torch cdist+argmin", "fp32"): lambda a: torch.cdist(a, e).argmin(1),
            }
            timed = {
                ("mmfast", "fp32"): lambda: kernels.nearest_code(x, e),
                ("mmfast", "bf16"): lambda: kernels.nearest_code(*x16[torch.bfloat16]),
                ("mmfast", "fp16"): lambda: kernels.nearest_code(*x16[torch.float16]),
                ("taming formula", "fp32"): lambda: ref.nearest_code_taming(x, e),
                ("faiss IndexFlatL2 k=1", "fp32"): lambda: index.search(xn, 1),
                ("torch cdist+argmin", "fp32"): lambda: torch.cdist(x, e).argmin(1),
            }
            providers = [Provider(f"{name} {dt}" if name == "mmfast" else name, timed[(name, dt)], dt,
                                  _quality(fn, x, e, rows)) for (name, dt), fn in fns.items()]
            providers.append(Provider("torch x@e.T only (no argmin)", lambda: x @ e.T, "fp32"))
            temp = max(_C.nearest_code_temp_bytes(M, K, D, dt) for dt in ("float32", "bfloat16"))
            yield Case("nearest_code", f"M={M} K={K} D={D}", providers, baseline="taming formula",
                       items=M, bytes=4 * (M * D + K * D) + 8 * M, flops=2.0 * M * K * D,
                       extra={"extra_mem_pct": round(100 * temp / (4 * M * K), 3)})
            del x16, index
