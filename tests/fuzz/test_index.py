"""Fuzz SimilarityIndex: construction, add, search, save and load.

Each case builds an index from drawn arguments (dims, dtypes, NaN / zero / integer / 1-D / 3-D rows,
numpy or torch, ids of every kind), searches it (k in and out of range, hostile queries) against a
brute-force float64 reference, saves it (to a file, a folder, a missing folder, a non-path) and loads
it back or loads a mutated copy of the file.
"""
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmfast import SimilarityIndex
from tests.fuzz.mutate import mutated
from tests.fuzz.oracle import run_case

DTYPES = ["fp32", "fp16", "bf16", "int8"]
# |score - reference| allowed per storage dtype (unit vectors, so absolute): the rows are rounded once
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2, "int8": 2e-2}


@st.composite
def matrices(draw, dim: int, name: str):
    """Mostly well-formed [n, dim] rows; sometimes NaN / zero / integer / 1-D / wrong-width / exotic."""
    n = draw(st.integers(0, 40))
    kind = draw(st.sampled_from(["ok"] * 6 + ["nan", "inf", "zero", "int", "1d", "3d", "width", "bool", "complex",
                                              "list", "f64", "f16", "object"]))
    seed = draw(st.integers(0, 2 ** 16))
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    if kind in ("nan", "inf", "zero") and n:
        x[draw(st.integers(0, n - 1))] = {"nan": np.nan, "inf": np.inf, "zero": 0.0}[kind]
    elif kind == "int":
        x = (x * 10).astype(np.int64)
    elif kind == "1d":
        x = x.reshape(-1)
    elif kind == "3d":
        x = x[None]
    elif kind == "width":
        x = np.zeros((n, dim + draw(st.sampled_from([-1, 1, 7]))), np.float32)
    elif kind == "bool":
        x = x > 0
    elif kind == "complex":
        x = x.astype(np.complex64)
    elif kind == "list":
        return x.tolist()
    elif kind == "f64":
        x = x.astype(np.float64)
    elif kind == "f16":
        x = x.astype(np.float16)
    elif kind == "object":
        x = x.astype(object)
    return x if draw(st.booleans()) or kind == "object" else torch.from_numpy(np.ascontiguousarray(x))


def _rows(x) -> np.ndarray:
    return np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


def _reference_search(stored: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    g = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-300)
    return q @ g.T  # [Q, N] exact cosine similarities


def _check_search(dtype, stored, ids, queries, k):
    def check(result):
        scores, got = result
        sims = _reference_search(stored, ids, _rows(queries), k)
        assert scores.shape == (sims.shape[0], k) and got.shape == (sims.shape[0], k), "shape"
        tol = TOL[dtype]
        pos = {int(i): j for j, i in enumerate(ids)}  # ids are unique here (consecutive)
        for r in range(sims.shape[0]):
            best = np.sort(sims[r])[::-1][:k]
            assert np.all(np.abs(scores[r].numpy() - best) <= tol), f"row {r}: scores {scores[r]} vs {best}"
            chosen = np.array([sims[r, pos[int(i)]] for i in got[r]])  # ties may flip ids: check their scores
            assert np.all(np.abs(chosen - best) <= 2 * tol), f"row {r}: ids {got[r]} are not the top {k}"
    return check


@given(data=st.data())
def test_index_add_search(data):
    dim = data.draw(st.sampled_from([1, 2, 3, 8, 17, 64]))
    dtype = data.draw(st.sampled_from(DTYPES + ["fp64", None, 3]))
    prefilter = data.draw(st.sampled_from([None, None, "int8", "fp16"]))
    bad_dim = data.draw(st.sampled_from([None] * 8 + [0, -3, 2.5, True, "8"]))
    ctor = run_case("SimilarityIndex()", lambda: SimilarityIndex(dim if bad_dim is None else bad_dim, dtype,
                                                                  prefilter=prefilter),
                    names=["dim", "dtype", "prefilter"])
    index = ctor[1] if ctor[0] == "ok" else SimilarityIndex(dim, "fp32")  # refused: go on with a plain one
    dtype = index.dtype
    x = data.draw(matrices(dim, "vectors"))
    ids = data.draw(st.sampled_from([None] * 6 + ["floats", "short", "strings", "huge", "negative", "bool"]))
    n = len(x) if hasattr(x, "__len__") else 0
    ids = {None: None, "floats": np.arange(n) + 0.5, "short": list(range(max(n - 1, 0))), "strings": ["a"] * n,
           "huge": [2 ** 64] * n, "negative": list(range(-n, 0)), "bool": [True] * n}[ids]
    added = run_case("SimilarityIndex.add", lambda: index.add(x, ids=ids), names=["vectors", "ids"])
    stored = _rows(x) if added[0] == "ok" and n else np.zeros((0, dim))
    assert len(index) == len(stored), "add kept rows of a refused call"
    q = data.draw(matrices(dim, "queries"))
    k = data.draw(st.one_of(st.integers(1, max(len(index), 1)), st.integers(1, max(len(index), 1)),
                            st.integers(-2, 45), st.sampled_from([None, 2.0, True, "3"])))
    ok_inputs = (len(stored) and isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= len(stored))
    check = None
    if ok_inputs and added[0] == "ok":
        stored_ids = np.arange(len(stored)) if ids is None else np.asarray(ids)
        if len(set(stored_ids.tolist())) == len(stored_ids):
            check = _check_search(dtype, stored, stored_ids, q, k)
    run_case("SimilarityIndex.search", lambda: index.search(q, k), names=["queries", "k", "empty"], check=check)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_index")
    files = {}
    for dtype, pre in [("fp16", None), ("bf16", "int8"), ("int8", None), ("fp32", None)]:
        ix = SimilarityIndex(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dtype, prefilter=pre)
        path = d / f"{dtype}-{pre}.safetensors"
        ix.save(path)
        files[path.name] = (ix, path.read_bytes())
    return d, files


@given(data=st.data())
def test_index_save_load(saved, data):
    d, files = saved
    name = data.draw(st.sampled_from(sorted(files)))
    index, original = files[name]
    target = data.draw(st.sampled_from(["file", "file", "folder", "missing_folder", "int", "bytes_path"]))
    path = {"file": d / "out.safetensors", "folder": d, "missing_folder": d / "nope" / "x.safetensors",
            "int": 3, "bytes_path": os.fsencode(d / "b.safetensors")}[target]
    run_case("SimilarityIndex.save", lambda: index.save(path), names=["path", "save", str(path)])
    assert not [p for p in os.listdir(d) if ".tmp-" in p], "save left a temporary file"
    blob = data.draw(mutated(original)) if data.draw(st.booleans()) else original
    path = d / "in.safetensors"
    path.write_bytes(blob)
    mmap = data.draw(st.booleans())
    q = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))

    def check(loaded):
        if blob == original:  # the file save wrote: the same index back
            assert len(loaded) == len(index) and loaded.dtype == index.dtype and loaded.prefilter == index.prefilter
            s1, i1 = loaded.search(q, 5)
            s2, i2 = index.search(q, 5)
            assert torch.equal(s1, s2) and torch.equal(i1, i2), "a loaded index answers differently"
        else:  # a mutated file that still parses: it must at least be searchable or refuse clearly
            run_case("SimilarityIndex.search (loaded)", lambda: loaded.search(q, min(5, len(loaded)) or 1),
                     names=["k", "empty", "queries"])

    run_case("SimilarityIndex.load", lambda: SimilarityIndex.load(path, mmap=mmap), names=[str(path), path.name],
             check=check)
