"""KV-cached decode attention: mmfast.kernels.decode_attention vs the peers, in one process.

One timed call is a whole decode sweep, as a generator runs it: T = 256 steps over static
[B, H, T, D] caches, step t attending to lengths = t + 1 (the same for every row). Step t uses the
caches of layer t % 12 (12 layers, as in mini's decoder), so that, as in a real generator, a call
finds its cache in DRAM rather than in the L3 the previous call warmed.
DALL-E mini's decoder (H = 16, D = 64) with B = 2n rows (a conditioned and an unconditioned row per
image) for n = 1 and 4 images, and mega's (H = 32) for n = 1; fp32 and bf16 caches. Peers:
  * min-dalle style (the baseline): every step attends over all T positions with a -1e12 bias
    on the unused ones, in the cache dtype (kernels.ref.decode_attention_min_dalle);
  * torch SDPA, mask: F.scaled_dot_product_attention over all T with a boolean mask (a function of
    tensors only, like mmfast; the masks are built before timing, which flatters it a little);
  * torch SDPA, slice: SDPA on k[:, :, :t+1] (needs the length as a host int at every step, i.e.
    a sync on a GPU; fine on a CPU).
GB/s counts what a step must move (decode_attention_cost: the valid K/V positions once, q, out),
so an implementation that reads all T per step shows less than its raw bandwidth. mmfast runs
one thread at these sizes (kernels/cpu/decode_attention.cpp says why), torch its default. Quality: the
largest |error| against the fp32 reference at one mid-sweep step, in the cache's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case, Provider


_LAYERS = 12


def _sweep(fn, lengths):
    def run():
        for L in lengths:
            fn(L)
    return run


def cases(args):
    from mmfast import kernels
    from mmfast.kernels import ref

    T, D = (64, 64) if args.quick else (256, 64)
    shapes = [(1, 16), (4, 16), (1, 32)]                      # (images, heads): mini n=1, n=4; mega n=1
    for n, H in shapes[:1] if args.quick else shapes:
        B = 2 * n
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(n * 100 + H)
            q = torch.randn(B, H, D, generator=g).to(dtype)
            k = torch.randn(_LAYERS, B, H, T, D, generator=g).to(dtype)
            v = torch.randn(_LAYERS, B, H, T, D, generator=g).to(dtype)
            lengths = [torch.full((B,), t + 1, dtype=torch.int64) for t in range(T)]
            masks = [(torch.arange(T) < t + 1).expand(B, 1, 1, T) for t in range(T)]
            q4 = q[:, :, None]                                                  # (B, H, 1, D)
            kv = lambda t: (k[t % _LAYERS], v[t % _LAYERS])                     # noqa: E731

            step = {
                "mmfast": lambda t: kernels.decode_attention(q, *kv(t), lengths[t], check_lengths=False),
                "min-dalle style (all T, -1e12 bias)": lambda t: ref.decode_attention_min_dalle(q, *kv(t), lengths[t]),
                "torch SDPA, mask": lambda t: F.scaled_dot_product_attention(q4, *kv(t), attn_mask=masks[t])[:, :, 0],
                "torch SDPA, slice": lambda t: F.scaled_dot_product_attention(
                    q4, kv(t)[0][:, :, :t + 1], kv(t)[1][:, :, :t + 1])[:, :, 0],
            }
            mid = T // 2
            want = ref.decode_attention_ref(q, *kv(mid), lengths[mid]).float()
            dt = str(dtype).removeprefix("torch.")
            providers = [
                Provider(name, _sweep(fn, range(T)), dt,
                         {"max_abs_err": float((fn(mid).float() - want).abs().max())})
                for name, fn in step.items()
            ]
            nbytes, flops = ref.decode_attention_cost(B, H, D, (T + 1) / 2, cache_bytes=q.element_size())
            yield Case("decode_attention", f"n={n} B={B} H={H} T={T} D={D} sweep L=1..{T}", providers,
                       baseline="min-dalle style (all T, -1e12 bias)", items=T, bytes=T * nbytes,
                       flops=T * flops, extra={"torch_threads": torch.get_num_threads(), "mmfast_threads": 1})
            del k, v
