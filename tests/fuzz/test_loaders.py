"""Fuzz the checkpoint readers and loaders: read_state_dict, load_clip, load_vq, load_generator.

Every case writes one hostile file (a truncated / bit-flipped / overwritten copy of a real checkpoint,
a safetensors header that lies, a pickle that reaches for os.system / eval / subprocess / importlib,
nested reducers, random bytes) into a copy of a tiny model's folder, calls the loader, and restores
the file. A load that succeeds must hold what a reference reader (safetensors / torch.load with
weights_only=True) finds in the same bytes; code in a pickle must never run.
"""
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

import mmfast
from mmfast.io import read_state_dict
from tests.fuzz import models as M
from tests.fuzz.mutate import lying_safetensors_header, mutated, payload_objects, pickle_bytes
from tests.fuzz.oracle import COUNTS, run_case


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("steps", torch.tensor(7))

    def forward(self, x):
        return self.lin(x) + self.steps


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The originals: name -> bytes, plus the folders the loaders read."""
    d = tmp_path_factory.mktemp("fuzz_loaders")
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3), "b": torch.arange(5), "h": torch.randn(2, 2).half()}
    out = {}
    buf = d / "x"
    safetensors.torch.save_file(sd, buf)
    out["safetensors"] = buf.read_bytes()
    torch.save(sd, buf)
    out["zip"] = buf.read_bytes()
    torch.save({"state_dict": sd, "epoch": 1}, buf, _use_new_zipfile_serialization=False)
    out["legacy"] = buf.read_bytes()
    torch.jit.save(torch.jit.script(Tiny()), buf)
    out["torchscript"] = buf.read_bytes()
    clip_dir = M.write_clip_dir(d / "clip", M.tiny_clip())
    vq_ckpt = M.write_vq_run(d / "vq", M.tiny_vq())
    dalle_dir = M.write_dalle_dir(d / "dalle", *M.tiny_dalle())
    return Quiet(bytes=out, sd=sd, dir=d, clip=clip_dir, vq=vq_ckpt, dalle=dalle_dir)


class Quiet(dict):
    """A fixture value hypothesis prints as a name, not as megabytes of bytes."""

    def __repr__(self):
        return "<files>"


@pytest.fixture(autouse=True, scope="module")
def _payload_module(tmp_path_factory):
    """A module a pickle could import, whose import would leave a sentinel: it never must."""
    d = tmp_path_factory.mktemp("payload_mods")
    sentinel = d / "pwned"
    (d / "mmfast_fuzz_payload.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    sys.path.insert(0, str(d))
    yield sentinel
    sys.path.remove(str(d))


def _no_code_ran(entry, sentinel):
    ran = sentinel.exists() or "mmfast_fuzz_payload" in sys.modules
    if ran:
        COUNTS[entry]["crash"] += 1
        sentinel.unlink(missing_ok=True)
        sys.modules.pop("mmfast_fuzz_payload", None)
        raise AssertionError(f"{entry}: a pickle ran code while loading")


def _same(got: dict, want: dict, what: str):
    """Tensors of `got` under `want`'s names and shapes are bit-identical to `want`'s (NaN included)."""
    compared = 0
    for k, v in want.items():
        if k in got and tuple(got[k].shape) == tuple(v.shape) and got[k].dtype == v.dtype:
            g, w = got[k].detach().cpu().contiguous(), v.detach().cpu().contiguous()
            assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), \
                f"{what}: {k} differs from the reference reading of the same bytes"
            compared += 1
    assert compared, f"{what}: no tensor in common with the reference reading"


def _reference_torch(data_path):
    if zipfile.is_zipfile(data_path):
        try:
            with zipfile.ZipFile(data_path) as zf:
                if any("/code/" in n or n.endswith("constants.pkl") for n in zf.namelist()):
                    return None  # TorchScript: torch.load would hand it to torch.jit.load, which runs its code
        except Exception:  # noqa: BLE001
            return None
    try:
        obj = torch.load(data_path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the reference refuses: nothing to compare with
        return None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else None


def _reference_safetensors(path):
    try:
        return safetensors.torch.load_file(path)
    except Exception:  # noqa: BLE001
        return None


@st.composite
def hostile_file(draw, originals: dict, sentinel, tensors):
    """(kind, bytes): a mutated original, a lying safetensors header, a payload pickle, or noise."""
    kind = draw(st.sampled_from(["mutate"] * 6 + ["lying", "payload", "payload", "noise"]))
    if kind == "mutate":
        src = draw(st.sampled_from(sorted(originals)))
        return src, draw(mutated(originals[src]))
    if kind == "lying":
        return "safetensors", lying_safetensors_header(draw, draw(st.binary(max_size=64)))
    if kind == "payload":
        obj = draw(payload_objects(str(sentinel), tensors))
        how = draw(st.sampled_from(["zip", "legacy", "raw"]))
        if how == "raw":
            return "payload", pickle_bytes(obj, draw(st.integers(0, 5)))
        buf = sentinel.parent / "payload.tmp"
        torch.save(obj, buf, _use_new_zipfile_serialization=how == "zip")
        return "payload", buf.read_bytes()
    return "noise", draw(st.binary(max_size=256))


@given(data=st.data())
def test_read_state_dict(files, _payload_module, data):
    originals = files["bytes"]
    kind, blob = data.draw(hostile_file(originals, _payload_module, files["sd"]))
    suffix = data.draw(st.sampled_from([".safetensors", ".pt", ".bin", ".ckpt", ""]))
    path = files["dir"] / f"case{suffix}"
    path.write_bytes(blob)

    def check(sd):
        assert isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
        ref = _reference_safetensors(path) if blob[8:9] == b"{" else _reference_torch(path)
        if ref:  # where the reference refuses what mmfast's placeholder unpickler reads, keys are still checked
            _same(sd, ref, "read_state_dict")

    run_case("read_state_dict", lambda: read_state_dict(path), names=[str(path), path.name], check=check)
    _no_code_ran("read_state_dict", _payload_module)


def _restore(path: Path, data: bytes):
    path.write_bytes(data)


@given(data=st.data())
def test_load_clip(files, _payload_module, data):
    d = files["clip"]
    weights, config = d / "open_clip_model.safetensors", d / "open_clip_config.json"
    originals = {weights: weights.read_bytes(), config: config.read_bytes()}
    target = data.draw(st.sampled_from([weights] * 6 + [config] * 2 + ["bare", "payload", "missing", "empty_dir"]))
    name, call_path = None, d
    if target in originals:
        target.write_bytes(data.draw(mutated(originals[target])))
    elif target in ("bare", "payload"):
        call_path, name = files["dir"] / "bare.bin", data.draw(st.sampled_from(["ViT-B-32", "ViT-B-32-quickgelu"]))
        obj = M.openai_names(M.tiny_clip().state_dict()) if target == "bare" else \
            data.draw(payload_objects(str(_payload_module), files["sd"]))
        torch.save(obj, call_path, _use_new_zipfile_serialization=data.draw(st.booleans()))
    elif target == "missing":
        call_path = files["dir"] / "no_such_clip"
    else:
        call_path = files["dir"] / "empty_clip_dir"
        call_path.mkdir(exist_ok=True)

    def check(clip):
        ref = _reference_safetensors(weights)
        assert ref is not None, "load_clip read a safetensors file that safetensors itself refuses"
        _same(clip.model.state_dict(), {k.replace("in_proj_", "in_proj."): v for k, v in ref.items()}, "load_clip")

    try:
        run_case("load_clip", lambda: mmfast.load_clip(call_path, name=name, device="cpu", dtype="fp32",
                                                       backend="torch"),
                 names=[str(call_path), call_path.name, "open_clip_model.safetensors", "open_clip_config.json"],
                 check=check)
        _no_code_ran("load_clip", _payload_module)
    finally:
        for p, b in originals.items():
            _restore(p, b)


@given(data=st.data())
def test_load_vq(files, _payload_module, data):
    ckpt = files["vq"]
    yaml_path = ckpt.parent.parent / "configs" / "model.yaml"
    originals = {ckpt: ckpt.read_bytes(), yaml_path: yaml_path.read_bytes()}
    target = data.draw(st.sampled_from([ckpt] * 6 + [yaml_path] * 2 + ["payload", "folder"]))
    call_path = ckpt
    if target in originals:
        target.write_bytes(data.draw(mutated(originals[target])))
    elif target == "payload":
        torch.save(data.draw(payload_objects(str(_payload_module), files["sd"])), ckpt,
                   _use_new_zipfile_serialization=data.draw(st.booleans()))
    else:
        call_path = ckpt.parent.parent  # the run folder: load_vq finds ckpts/last.ckpt

    def check(vq):
        ref = _reference_torch(ckpt)
        if ref is not None:
            _same({k: v for k, v in vq.model.state_dict().items() if "upsample" not in k}, ref, "load_vq")

    try:
        run_case("load_vq", lambda: mmfast.load_vq(call_path, device="cpu", dtype="fp32", backend="torch"),
                 names=[str(call_path), "last.ckpt", "model.yaml"], check=check)
        _no_code_ran("load_vq", _payload_module)
    finally:
        for p, b in originals.items():
            _restore(p, b)


@given(data=st.data())
def test_load_generator(files, _payload_module, data):
    d = files["dalle"]
    names = ["encoder.pt", "decoder.pt", "vocab.json", "merges.txt"]
    target = data.draw(st.sampled_from(names[:1] * 4 + names[1:2] * 2 + names[2:3] * 2 + names[3:] + ["payload"]))
    path = d / ("encoder.pt" if target == "payload" else target)
    original = path.read_bytes()
    if target == "payload":
        path.write_bytes(b"")
        torch.save(data.draw(payload_objects(str(_payload_module), files["sd"])), path,
                   _use_new_zipfile_serialization=data.draw(st.booleans()))
    else:
        path.write_bytes(data.draw(mutated(original)))

    def check(gen):
        ref = _reference_torch(d / "encoder.pt")
        if ref is not None:
            _same(gen.encoder.state_dict(), ref, "load_generator")

    try:
        run_case("load_generator", lambda: mmfast.load_generator(d, device="cpu", dtype="fp32", vqgan=None,
                                                                 backend="torch"),
                 names=[str(d), *names], check=check)
        _no_code_ran("load_generator", _payload_module)
    finally:
        _restore(path, original)
