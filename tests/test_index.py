"""SimilarityIndex: exact search against brute force, ids, growth, files, threads, bad input."""
import sys
import threading

import numpy as np
import pytest
import torch

from mmfast.index import SimilarityIndex
from mmfast.kernels import ref

DTYPES = ["fp32", "fp16", "bf16", "int8"]


def embeddings(n, d=32, seed=0):
    """Unnormalised float rows, like the output of a CLIP encoder before normalisation."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3 + 0.1


def brute_force(index, queries, k):
    """The reference top-k over the index's own stored (dequantised) rows."""
    n = len(index)
    gs = index._scale[:n] if index.dtype == "int8" else None
    scores, rows = ref.similarity_topk_ref(queries, index._vectors[:n], k, gallery_scale=gs)
    return scores, index._ids[:n][rows]


@pytest.mark.parametrize("dtype", DTYPES)
def test_search_is_exact_over_stored_rows(dtype):
    x = embeddings(1500)
    index = SimilarityIndex(32, dtype=dtype)
    index.add(x[:1000])
    index.add(x[1000:].numpy())                        # numpy goes in too
    assert len(index) == 1500
    queries = embeddings(9, seed=1)
    scores, ids = index.search(queries, 10)
    want_scores, _ = brute_force(index, queries, 10)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (9, 10)
    # Each row finds itself first (cosine ~1 within the storage dtype's rounding).
    s, i = index.search(x[:50], 1)
    assert i.flatten().tolist() == list(range(50))
    assert float((s - 1).abs().max()) < {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2, "int8": 1e-2}[dtype]


def test_stored_rows_are_normalised_and_close_to_fp32():
    x = embeddings(200)
    unit = torch.nn.functional.normalize(x, dim=1)
    for dtype, tol in [("fp32", 1e-6), ("fp16", 1e-3), ("bf16", 8e-3), ("int8", 8e-3)]:
        index = SimilarityIndex(x, dtype=dtype)       # a tensor as first argument is added
        rows = index._vectors[:200].float()
        if dtype == "int8":
            rows = rows * index._scale[:200, None]
        assert float((rows - unit).abs().max()) < tol, dtype


def test_user_ids_and_default_ids():
    index = SimilarityIndex(32)
    x = embeddings(30)
    index.add(x[:10], ids=np.arange(100, 110))
    index.add(x[10:20])                                 # continues after the largest id: 110..119
    index.add(x[20:], ids=[7] * 10)                     # ids are returned as given
    _, ids = index.search(x[[0, 15, 25]], 1)
    assert ids.flatten().tolist() == [100, 115, 7]


def test_growth_is_amortised():
    index = SimilarityIndex(8, dtype="fp16")
    buffers = set()
    for i in range(3000):
        index.add(torch.randn(1, 8) + 0.01)
        buffers.add(index._vectors.data_ptr())
    assert len(index) == 3000
    assert len(buffers) <= 4  # 1024 -> 2048 -> 4096: doubling, not one copy per add


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(tmp_path, dtype, mmap):
    x = embeddings(700)
    index = SimilarityIndex(32, dtype=dtype)
    index.add(x, ids=torch.arange(700) * 3)
    path = tmp_path / "gallery.safetensors"
    index.save(path)
    loaded = SimilarityIndex.load(path, mmap=mmap)
    assert (len(loaded), loaded.dim, loaded.dtype) == (700, 32, dtype)
    queries = embeddings(4, seed=2)
    a, b = index.search(queries, 5), loaded.search(queries, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    loaded.add(x[:3])                                   # copies out of the mapping first
    assert len(loaded) == 703 and loaded.search(x[:1], 1)[1].item() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_mmap_load_reads_nothing_up_front(tmp_path):
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    index = SimilarityIndex(256, dtype="fp16")
    index.add(torch.randn(200_000, 256) + 0.01)       # ~100 MB of rows
    index.save(tmp_path / "big.safetensors")
    del index
    before = rss()
    loaded = SimilarityIndex.load(tmp_path / "big.safetensors", mmap=True)
    assert rss() - before < 30e6                        # not read eagerly
    assert loaded.search(torch.randn(1, 256), 3)[1].shape == (1, 3)


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="not an mmfast SimilarityIndex"):
        SimilarityIndex.load(tmp_path / "w.safetensors")


def test_concurrent_search_and_add():
    index = SimilarityIndex(32, dtype="fp16")
    x = embeddings(4000)
    index.add(x[:1000])
    errors = []

    def searcher(seed):
        try:
            for _ in range(20):
                q = embeddings(3, seed=seed)
                scores, ids = index.search(q, 5)
                # Every answer is valid for the snapshot it saw: ids exist, scores are their scores.
                rows = index._vectors[ids.flatten()].float().reshape(3, 5, 32)   # id == row here
                true = torch.einsum("qkd,qd->qk", rows, torch.nn.functional.normalize(q, dim=1))
                torch.testing.assert_close(scores, true, atol=1e-3, rtol=1e-3)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def adder():
        for i in range(1000, 4000, 100):
            index.add(x[i:i + 100])

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)] + [threading.Thread(target=adder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(index) == 4000


@pytest.mark.parametrize("make,call,err,words", [
    (lambda: SimilarityIndex(32), lambda i: i.search(embeddings(1), 1), ValueError, "empty"),
    (lambda: SimilarityIndex(embeddings(5)), lambda i: i.search(embeddings(1), 6), ValueError, "holds 5"),
    (lambda: SimilarityIndex(embeddings(5)), lambda i: i.search(embeddings(1), 0), ValueError, "k must"),
    (lambda: SimilarityIndex(embeddings(5)), lambda i: i.search(torch.randn(1, 31), 1), ValueError, "32"),
    (lambda: SimilarityIndex(embeddings(5)), lambda i: i.search(torch.randn(32), 1), ValueError, r"x\[None\]"),
    (lambda: SimilarityIndex(embeddings(5)), lambda i: i.search(torch.ones(1, 32, dtype=torch.int64), 1),
     TypeError, "floating"),
    (lambda: SimilarityIndex(embeddings(5)), lambda i: i.search(torch.full((1, 32), float("nan")), 1),
     ValueError, "NaN"),
    (lambda: SimilarityIndex(32), lambda i: i.add(torch.zeros(2, 32)), ValueError, "zero"),
    (lambda: SimilarityIndex(32), lambda i: i.add(torch.full((1, 32), float("nan"))), ValueError, "NaN"),
    (lambda: SimilarityIndex(32), lambda i: i.add(embeddings(3), ids=[1, 2]), ValueError, "3 integers"),
    (lambda: SimilarityIndex(32), lambda i: i.add([[0.0] * 32]), TypeError, "numpy"),
    (lambda: None, lambda i: SimilarityIndex(32, dtype="float16"), ValueError, "fp16"),
    (lambda: None, lambda i: SimilarityIndex(0), ValueError, "positive"),
])
def test_bad_input(make, call, err, words):
    index = make()
    with pytest.raises(err, match=words):
        call(index)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_int8_prefilter_gives_the_plain_results(tmp_path, dtype):
    x = embeddings(1100, d=40)
    x[700] = x[3]                                       # duplicates: ties must resolve the same way
    plain, pre = SimilarityIndex(40, dtype=dtype), SimilarityIndex(40, dtype=dtype, prefilter="int8")
    for index in (plain, pre):
        index.add(x[:600])
        index.add(x[600:])                              # growth carries the int8 copy along
    assert "prefilter='int8'" in repr(pre)
    for q_count in (1, 13, 40):
        queries = embeddings(q_count, d=40, seed=q_count)
        queries[0] = x[3]
        for k in (1, 10, 1100):
            a, b = plain.search(queries, k), pre.search(queries, k)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    path = tmp_path / "pre.safetensors"
    pre.save(path)
    for mmap in (True, False):
        loaded = SimilarityIndex.load(path, mmap=mmap)
        assert loaded.prefilter == "int8"
        queries = embeddings(20, d=40, seed=9)
        a, b = pre.search(queries, 5), loaded.search(queries, 5)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        loaded.add(x[:3])
        assert len(loaded) == 1103 and loaded._pre[0].shape[0] >= 1103


@pytest.mark.parametrize("kwargs", [{"dtype": "int8", "prefilter": "int8"}, {"dtype": "fp32", "prefilter": "int8"},
                                    {"dtype": "fp16", "prefilter": "int4"}])
def test_prefilter_bad_options(kwargs):
    with pytest.raises(ValueError, match="prefilter"):
        SimilarityIndex(8, **kwargs)
