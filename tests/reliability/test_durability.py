"""Saves are atomic: a process killed with SIGKILL in the middle of a save leaves the old file intact
and no stray files (mmfast._atomic); a failed write changes nothing; readers never see half a file."""
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mmfast import _atomic
from mmfast._atomic import atomic_path, atomic_write, replace_dir, staging_dir, sweep
from mmfast.index import SimilarityIndex

ROOT = Path(__file__).resolve().parents[2]

# A child that starts a save and stalls after its first bytes (wherever the save writes them), so that
# the test can look at the folder mid-save and then kill it.
_INDEX_CHILD = """
import sys, time
import torch
from mmfast import _atomic, index as ix
_atomic._UNNAMED = sys.argv[2] == "1"
real = ix._write_safetensors
class Stall:
    def __init__(self, f): self.f = f
    def write(self, b):
        self.f.write(b); self.f.flush(); print("writing", flush=True); time.sleep(600)
ix._write_safetensors = lambda f, tensors, meta: real(Stall(f), tensors, meta)
ix.SimilarityIndex(torch.randn(5000, 16) + 0.1).save(sys.argv[1])
"""

_ONNX_CHILD = """
import sys, time
import onnx
from tests.reliability.test_durability import export_linear
def stalled(model, f, *args, **kwargs):
    with open(f, "wb") as out:
        out.write(b"half a graph")
    print("writing", flush=True)
    time.sleep(600)
onnx.save_model = stalled
export_linear(sys.argv[1], seed=1)
"""


def _kill_mid_save(code: str, *args) -> list[str]:
    """Run `code` until it prints "writing"; return the folder listing at that moment, then SIGKILL it."""
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 120)
        line = p.stdout.readline() if ready else ""
        assert line == "writing\n", f"the child did not reach the save: {line!r}\n{p.stderr.read() if not ready else ''}"
        listing = sorted(os.listdir(Path(args[0]).parent))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL
    return listing


def _index(seed=0, n=300):
    return SimilarityIndex(torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)) + 0.1)


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temp"])
def test_index_save_killed_midway_keeps_the_old_file(tmp_path, unnamed):
    if unnamed and not _atomic._UNNAMED:
        pytest.skip("no O_TMPFILE on this platform")
    path = tmp_path / "gallery.safetensors"
    old = _index()
    old.save(path)
    before = path.read_bytes()
    during = _kill_mid_save(_INDEX_CHILD, path, int(unnamed))
    assert path.read_bytes() == before
    q = torch.randn(3, 16)
    got, want = SimilarityIndex.load(path).search(q, 4), old.search(q, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if unnamed:  # the new contents never had a name: nothing to clean up
        assert during == os.listdir(tmp_path) == ["gallery.safetensors"]
    else:  # a hidden temporary file, named for its target and dead writer; the next save removes it
        stray = [n for n in os.listdir(tmp_path) if n != "gallery.safetensors"]
        assert len(stray) == 1 and stray[0].startswith(".gallery.safetensors.tmp-") and _atomic._TMP.match(stray[0])
        _index(1).save(path)
        assert os.listdir(tmp_path) == ["gallery.safetensors"]
        assert len(SimilarityIndex.load(path)) == 300


def export_linear(path, seed: int):
    """A one-layer graph through mmfast's ONNX export path (trace, stamp, check, atomic move)."""
    from mmfast.export.onnx_common import export_graph
    torch.manual_seed(seed)
    return export_graph(torch.nn.Linear(8, 4), (torch.randn(2, 8),), Path(path), inputs={"x": {0: "batch"}},
                        outputs={"y": {0: "batch"}}, meta={"seed": seed})


def test_onnx_export_killed_midway_keeps_the_old_graph(tmp_path):
    pytest.importorskip("onnx")
    path = tmp_path / "linear.onnx"
    export_linear(path, seed=0)
    before = path.read_bytes()
    during = _kill_mid_save(_ONNX_CHILD, path)
    assert path.read_bytes() == before
    # the child's staging folder is the only other entry, hidden; the next export into the folder removes it
    stray = [n for n in during if n != "linear.onnx"]
    assert len(stray) == 1 and stray[0].startswith(".linear.onnx.tmp-") and sorted(os.listdir(tmp_path)) == during
    export_linear(path, seed=2)
    assert os.listdir(tmp_path) == ["linear.onnx"] and path.read_bytes() != before


def test_failed_writes_change_nothing(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, json.dumps({"v": 1}))
    for unnamed in (True, False):
        _atomic._UNNAMED, was = unnamed and hasattr(os, "O_TMPFILE"), _atomic._UNNAMED
        try:
            with pytest.raises(ZeroDivisionError):
                atomic_write(path, lambda f: (f.write(b'{"v": 2'), 1 / 0))
            with pytest.raises(ZeroDivisionError), atomic_path(path) as tmp:
                Path(tmp).write_text('{"v": 3')
                1 / 0
            with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_path(path):
                pass
        finally:
            _atomic._UNNAMED = was
        assert json.loads(path.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["a.json"]
    with pytest.raises(IsADirectoryError, match="folder"):
        atomic_write(tmp_path, b"x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "no" / "a.json", b"x")


def test_readers_never_see_half_a_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, json.dumps(list(range(20000))))
    done, errors = threading.Event(), []

    def reader():
        while not done.is_set():
            try:
                assert len(json.loads(path.read_text())) in (20000, 30000)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))
                return

    def writer(n):
        for _ in range(30):
            atomic_write(path, json.dumps(list(range(n))))

    threads = [threading.Thread(target=reader)] + [threading.Thread(target=writer, args=(n,)) for n in (20000, 30000)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    done.set()
    threads[0].join()
    assert not errors, errors[:3]
    assert os.listdir(tmp_path) == ["state.json"]


def test_folders_are_swapped_whole_and_leftovers_swept(tmp_path):
    (tmp_path / "model" / "1").mkdir(parents=True)
    (tmp_path / "model" / "1" / "w").write_text("old")
    with staging_dir(tmp_path, "model") as stage:
        new = stage / "model"
        (new / "1").mkdir(parents=True)
        (new / "1" / "w").write_text("new")
        (new / "config").write_text("c")
        replace_dir(new, tmp_path / "model")
    assert sorted(os.listdir(tmp_path)) == ["model"] and (tmp_path / "model" / "1" / "w").read_text() == "new"
    assert sorted(os.listdir(tmp_path / "model")) == ["1", "config"]
    # leftovers of a dead process here go; those of a live one (this process, pid 1), of another host, and
    # other files stay
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host, other = _atomic._HOST, "ffff" if _atomic._HOST != "ffff" else "eeee"
    names = [f".model.tmp-{dead}-{host}0badc0", f".x.onnx.tmp-{dead}-{host}0badc0.onnx",
             f".x.tmp-{os.getpid()}-{host}0badc0", f".x.tmp-1-{host}0badc0", f".x.tmp-{dead}-{other}0badc0",
             ".hidden", "x.tmp-1"]
    for n in names:
        (tmp_path / n).mkdir() if "model" in n else (tmp_path / n).write_text("")
    assert sorted(p.name for p in sweep(tmp_path)) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(["model"] + names[2:])
