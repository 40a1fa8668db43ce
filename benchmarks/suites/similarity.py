"""similarity_topk: exact top-10 cosine search of Q queries over a 1M x 512 gallery.

Providers, timed round-robin in one process: mmfast (C++ kernel) with fp16 / bf16 / int8 / fp32
storage, fp16 / bf16 with the int8 shadow prefilter (`similarity_prefilter`: VNNI scan of an
int8 copy, candidates rescored from the 16-bit rows; same results as plain fp16 / bf16), faiss-cpu IndexFlatIP (fp32), and torch normalize + matmul + topk (fp32, in 128K-row chunks
so the [Q, N] matrix never exceeds 128 MB). Each mmfast row carries its recall@10 against the exact
fp32 answer (torch's, over 256 queries) and the bytes its gallery occupies (GB/s = gallery_GB / p50;
the harness's GB_per_s column is for an fp16 gallery). A first case times torch.sum over 1 GB: a
floor for this machine's read bandwidth, measured in the same run (it under-reads the roof: mmfast
fp32 at Q=1 streams faster than it).

Run: `flock /tmp/mmfast_bench.lock python -m benchmarks.run similarity [--quick]`
"""
from __future__ import annotations

import torch

from benchmarks.harness import Case, Provider
from mmfast import kernels
from mmfast.kernels import ref

K = 10
DIM = 512


def torch_topk(queries, gallery, k, chunk=131072):
    """The plain-PyTorch way: normalise, matmul per chunk of rows, keep a running top-k."""
    q = torch.nn.functional.normalize(queries, dim=1)
    best_s = best_i = None
    for start in range(0, gallery.shape[0], chunk):
        s, i = (q @ gallery[start:start + chunk].T).topk(k, dim=1)
        if best_s is not None:
            s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
            s, order = s.topk(k, dim=1)
            i = i.gather(1, order)
        else:
            i = i + start
        best_s, best_i = s, i
    return best_s, best_i


def recall(found, exact):
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact))
    return hits / exact.numel()


def cases(args):
    import faiss

    n = 20_000 if args.quick else 1_000_000
    gen = torch.Generator().manual_seed(0)
    # The fp32 gallery lives once, inside faiss; torch and mmfast fp32 read it through a view.
    flat = faiss.IndexFlatIP(DIM)
    for start in range(0, n, 100_000):  # in slices: no second 2 GB temporary
        flat.add(torch.nn.functional.normalize(torch.randn(min(100_000, n - start), DIM, generator=gen), dim=1).numpy())
    g32 = torch.from_numpy(faiss.rev_swig_ptr(flat.get_xb(), n * DIM).reshape(n, DIM))
    g8_scale = g32.abs().amax(1) / 127
    stores = {  # storage dtype -> (gallery, gallery_scale)
        "fp16": (g32.half(), None), "bf16": (g32.bfloat16(), None),
        "int8": (torch.round(g32 / g8_scale[:, None]).to(torch.int8), g8_scale), "fp32": (g32, None),
    }

    # name -> (gallery, prefilter tuple): the same results as stores[gallery dtype], +50% memory.
    prefiltered = {f"{name}+int8 prefilter": (stores[name][0], kernels.similarity_prefilter(stores[name][0]))
                   for name in ("fp16", "bf16")}

    roof = torch.ones(256 * 1024 * 1024)  # 1 GB of fp32: streamed once per call
    yield Case(op="memory read (roof)", shape="1 GB fp32", baseline="torch.sum",
               providers=[Provider("torch.sum", lambda: roof.sum(), dtype="fp32")], bytes=roof.numel() * 4)
    del roof

    probe = torch.randn(256, DIM, generator=gen)
    _, exact = torch_topk(probe, g32, K)
    quality = {}
    for name, (g, s) in stores.items():
        found = kernels.similarity_topk(probe, g, K, gallery_scale=s)[1]
        gallery_bytes = g.numel() * g.element_size() + (0 if s is None else s.numel() * 4)
        quality[name] = {"recall@10": recall(found, exact), "gallery_GB": gallery_bytes / 1e9}
    for name, (g, pre) in prefiltered.items():
        found = kernels.similarity_topk(probe, g, K, prefilter=pre)[1]
        gallery_bytes = g.numel() * g.element_size() + sum(t.numel() * t.element_size() for t in pre)
        quality[name] = {"recall@10": recall(found, exact), "gallery_GB": gallery_bytes / 1e9}

    for q_count in (1, 16, 256):
        queries = torch.randn(q_count, DIM, generator=gen)
        providers = [
            Provider(f"mmfast {name}", (lambda g=g, s=s: kernels.similarity_topk(queries, g, K, gallery_scale=s)),
                     dtype=name, quality=quality[name])
            for name, (g, s) in stores.items()
        ]
        providers += [
            Provider(f"mmfast {name}", (lambda g=g, pre=pre: kernels.similarity_topk(queries, g, K, prefilter=pre)),
                     dtype=name.split("+")[0], quality=quality[name])
            for name, (g, pre) in prefiltered.items()
        ]

        def faiss_search():
            q = queries.numpy().copy()
            faiss.normalize_L2(q)
            return flat.search(q, K)
        providers.append(Provider("faiss IndexFlatIP", faiss_search, dtype="fp32",
                                  quality={"gallery_GB": n * DIM * 4 / 1e9}))
        providers.append(Provider("torch matmul+topk", lambda: torch_topk(queries, g32, K), dtype="fp32",
                                  quality={"gallery_GB": n * DIM * 4 / 1e9}))
        nbytes, flops = ref.similarity_cost(q_count, n, DIM, K, gallery_bytes=2)
        yield Case(op="similarity_topk", shape=f"Q={q_count} N={n} D={DIM} k={K}", providers=providers,
                   baseline="torch matmul+topk", items=q_count, bytes=nbytes, flops=flops,
                   extra={"threads": torch.get_num_threads()})
