"""Threads share one Clip, VQ, Generator and SimilarityIndex: every result equals the same call made
alone, and concurrent add / search / save on one index see consistent snapshots."""
import threading
import time

import torch

from mmfast.index import SimilarityIndex
from tests.reliability import workload


def test_mixed_calls_from_threads_equal_serial_calls(models):
    want = workload.serial_results(models)
    out = workload.run_threads(models, want)
    assert out["calls"] == workload.THREADS * workload.CALLS
    assert not out["failures"], f"{len(out['failures'])} of {out['calls']} calls differ: {out['failures'][:5]}"
    # and the objects still answer as before
    assert torch.equal(models.calls()["Clip.encode_texts"](models.inputs["Clip.encode_texts"][0]),
                       want[("Clip.encode_texts", 0)])


def _batches(n_batches=30, rows=40, dim=16):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(rows, dim, generator=g) for _ in range(n_batches)]


def test_search_sees_a_snapshot_of_whole_adds():
    """SimilarityIndex's documented semantics: a search sees the index after some number m of whole
    adds, never part of one, and m never goes back for a thread (see workload.index_snapshots)."""
    r = workload.index_snapshots(n_adds=30)
    assert not r["errors"], r["errors"][:3]
    assert r["inconsistent"] == 0 and r["went_back"] == 0, r
    assert r["states_seen"] >= 3 and r["answers"] > 30, r  # the searches did overlap the adds
    assert r["final_is_last_state"] and r["size"] == 30 * 40


def test_save_during_adds_writes_a_snapshot(tmp_path):
    batches, dim = _batches(20, 50), 16
    index = SimilarityIndex(dim, dtype="int8")
    index.add(batches[0])
    path, done = tmp_path / "g.safetensors", threading.Event()
    sizes, errors = [], []

    def saver():
        try:
            while not done.is_set():
                index.save(path)
                loaded = SimilarityIndex.load(path, mmap=False)
                n = len(loaded)
                sizes.append(n)
                assert n % 50 == 0 and torch.equal(loaded._vectors[:n], index._vectors[:n])
                assert torch.equal(loaded._ids[:n], torch.arange(n))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    th = threading.Thread(target=saver)
    th.start()
    for b in batches[1:]:
        index.add(b)
        time.sleep(0.002)
    done.set()
    th.join()
    assert not errors, errors[:3]
    assert len(set(sizes)) >= 2 and sizes == sorted(sizes)  # saw the index grow, never shrink
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]
