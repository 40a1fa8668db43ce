"""mmfast.io: every format round-trips; TorchScript is read without running it;
pickles that try to run code and corrupt files fail with a clear error."""
import os
import pickle
import re
import zipfile

import pytest
import safetensors.torch
import torch
from torch import nn

from mmfast.io import read_json, read_state_dict, read_torchscript

# torch.jit is deprecated upstream, but OpenAI's CLIP weights ship as TorchScript archives.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")]


def assert_same_state(ours: dict, ref: dict):
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert torch.equal(ours[k], v), k


def state(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"visual.conv1.weight": torch.randn(8, 3, 4, 4, generator=g),
            "visual.proj": torch.randn(8, 4, generator=g).half(),
            "logit_scale": torch.tensor(4.6),
            "bn.num_batches_tracked": torch.tensor(7)}


# ---------------------------------------------------------------- plain formats

def test_safetensors_round_trip(tmp_path):
    sd = state()
    safetensors.torch.save_file(sd, tmp_path / "w.safetensors")
    assert_same_state(dict(sorted(read_state_dict(tmp_path / "w.safetensors").items())), dict(sorted(sd.items())))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
@pytest.mark.parametrize("zipped", [True, False])
def test_torch_save_round_trip(tmp_path, suffix, zipped):
    sd = state()
    path = tmp_path / f"w{suffix}"
    torch.save(sd, path, _use_new_zipfile_serialization=zipped)
    assert_same_state(read_state_dict(path), sd)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 10},          # Lightning / taming
    lambda sd: {"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}},  # open_clip
    lambda sd: {"model": sd, "args": {"lr": 0.1}},
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},                # torch.compile'd module
])
def test_wrappers_are_removed(tmp_path, wrap):
    sd = state()
    torch.save(wrap(sd), tmp_path / "w.pt")
    assert_same_state(read_state_dict(tmp_path / "w.pt"), sd)


# ---------------------------------------------------------------- TorchScript

class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(x)


class Visual(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 4, 4, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(Block(width), Block(width))
        self.bn = nn.BatchNorm1d(width)
        self.register_buffer("input_resolution", torch.tensor(8))  # an int as a 0-d buffer, as OpenAI's

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(2, 0, 1) + self.class_embedding
        return self.bn(self.transformer.resblocks(x)[0])


class TinyClip(nn.Module):
    """Named like OpenAI CLIP's JIT release; part of it in fp16, as that release is."""

    def __init__(self):
        super().__init__()
        self.visual = Visual()
        self.token_embedding = nn.Embedding(10, 16).half()
        self.positional_embedding = nn.Parameter(torch.randn(4, 16))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.register_buffer("context_length", torch.tensor(4))
        self.input_resolution_hint = 8  # a plain int attribute: not state

    def forward(self, image, text):
        t = self.token_embedding(text).float() + self.positional_embedding
        return self.visual(image) @ t.mean(0, keepdim=True).t() * self.logit_scale.exp()


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    m = TinyClip().eval()
    m.visual.bn.running_mean.normal_()
    m.visual.bn.num_batches_tracked += 3
    return m


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_gives_the_module_state_dict(tmp_path, tiny_clip, monkeypatch, how):
    example = (torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3, 4]))
    jit = torch.jit.trace(tiny_clip, example) if how == "trace" else torch.jit.script(tiny_clip)
    path = tmp_path / "ViT-B-32.pt"  # torch.jit.save names the zip prefix after the file stem
    torch.jit.save(jit, path)
    assert zipfile.ZipFile(path).namelist()[0].startswith("ViT-B-32/")
    expected = tiny_clip.state_dict()

    def no_code(*args, **kwargs):
        raise AssertionError("the archive must not be loaded through torch.jit / torch.load")

    monkeypatch.setattr(torch.jit, "load", no_code)
    monkeypatch.setattr(torch, "load", no_code)
    tensors, attributes = read_torchscript(path)
    assert_same_state(tensors, expected)
    assert_same_state(read_state_dict(path), expected)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in tensors
    if how == "script":  # scripting keeps plain attributes; tracing turns them into constants
        assert attributes["input_resolution_hint"] == 8
        assert attributes["visual.transformer.resblocks.0.attn.num_heads"] == 2


def test_torchscript_other_prefix_and_compressed_records(tmp_path, tiny_clip):
    src = tmp_path / "orig.pt"
    torch.jit.save(torch.jit.script(tiny_clip), src)
    # Rewrite it the way another writer might: prefix "archive/", deflated records (no mmap).
    dst = tmp_path / "model.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr("archive/" + info.filename.split("/", 1)[1], zin.read(info))
    assert_same_state(read_state_dict(dst), tiny_clip.state_dict())
    # Without the __parameters__ / __buffers__ lists every tensor attribute counts as state.
    bare = tmp_path / "bare.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bare, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(".py"):
                data = b"\n".join(ln for ln in data.split(b"\n") if b"__parameters__" not in ln
                                   and b"__buffers__" not in ln)
            zout.writestr(info, data)
    assert_same_state(read_state_dict(bare), tiny_clip.state_dict())


def test_torchscript_open_clip_model(tmp_path):
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    # ViT-B-32-quickgelu's architecture and parameter names, at a size that scripts in a second.
    model = CLIP(embed_dim=16, quick_gelu=True,
                 vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=2)).eval()
    path = tmp_path / "open_clip.pt"
    torch.jit.save(torch.jit.script(model), path)
    tensors = read_state_dict(path)
    expected = model.state_dict()
    # TorchScript does not record which buffers are non-persistent: attn_mask comes along, as it
    # does in torch.jit.load(path).state_dict().
    assert set(tensors) - set(expected) == {"attn_mask"}
    assert_same_state({k: tensors[k] for k in expected}, expected)
    assert set(tensors) == set(torch.jit.load(path).state_dict())


# ---------------------------------------------------------------- code in pickles never runs

class RunsCode:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def payloads(sentinel):
    import builtins

    return [RunsCode(os.system, f"touch {sentinel}"),
            RunsCode(builtins.exec, f"open({str(sentinel)!r}, 'w').close()")]


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_torch_pickle_is_refused(tmp_path, which, zipped):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": payloads(sentinel)[which]}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match=r"refused to load .*evil\.pt.*(system|exec)"):
        read_state_dict(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("which", [0, 1])
def test_malicious_torchscript_is_refused(tmp_path, tiny_clip, which):
    sentinel = tmp_path / "pwned"
    src, path = tmp_path / "good.pt", tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(tiny_clip), src)
    evil = pickle.dumps({"visual": payloads(sentinel)[which]}, protocol=2)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, evil if info.filename.endswith("/data.pkl") else zin.read(info))
    with pytest.raises(ValueError, match=r"refused to load .*evil\.pt.*(system|exec).*never runs code"):
        read_torchscript(path)
    with pytest.raises(ValueError, match="refused"):
        read_state_dict(path)
    assert not sentinel.exists()


# ---------------------------------------------------------------- objects weights_only refuses, kept inert

class Unimportable:
    """Its module is hidden while loading: nothing may import it to rebuild it."""

    def __init__(self):
        self.best = torch.tensor(0.5)

    def __setstate__(self, state):  # a real unpickler would run this
        raise AssertionError("the pickled object's code ran")


class Color(__import__("enum").Enum):
    RED = 1


def lightning_like(sd: dict) -> dict:
    import argparse
    import collections
    import datetime
    import pathlib

    import numpy as np

    weights = collections.OrderedDict(sd)
    weights._metadata = {"": {"version": 1}}  # what Module.state_dict() carries
    return {"state_dict": weights, "epoch": 3,
            "callbacks": {Unimportable: {"best_model_score": torch.tensor(0.1)}, "ckpt": Unimportable()},
            "hyper_parameters": {"args": argparse.Namespace(lr=np.float64(1e-3), seed=np.int64(3)),
                                 "dtype": np.dtype("f4"), "array": np.arange(4.0),
                                 "counts": collections.defaultdict(list, a=[1]), "set": {1, 2},
                                 "frozen": frozenset({3}), "enum": Color.RED, "path": pathlib.Path("/tmp/x"),
                                 "when": datetime.datetime(2021, 1, 1), "device": torch.device("cpu"),
                                 "torch_dtype": torch.float16, "bytes": b"\x00\xff", "ba": bytearray(b"ab"),
                                 "complex": 1 + 2j, "size": torch.Size([2, 3])},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}]}


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("zipped", [True, False])
def test_objects_weights_only_refuses_load_inert(tmp_path, monkeypatch, zipped, protocol):
    sd = state()
    path = tmp_path / "last.ckpt"
    torch.save(lightning_like(sd), path, _use_new_zipfile_serialization=zipped, pickle_protocol=protocol)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    imported = []
    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__
    monkeypatch.setattr("builtins.__import__",
                        lambda name, *a, **k: imported.append(name) or real_import(name, *a, **k))
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(pickle.UnpicklingError("refused")))
    assert_same_state(read_state_dict(path), sd)
    assert __name__ not in imported and "argparse" not in imported and "numpy" not in imported


def with_data_pkl(tmp_path, data: bytes):
    """A torch.save zip whose data.pkl is `data` (hand-written opcodes no pickler emits)."""
    src, path = tmp_path / "good.pt", tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2)}, src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith("/data.pkl") else zin.read(info))
    return path


def short(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()


HOSTILE = {
    # a call of the result of a call: factory()("x")
    "call of a call": (b"\x80\x02cmylib\nfactory\n)R(X\x01\x00\x00\x00xtR.", "calls an instance of mylib.factory"),
    # BUILD on an allowed callable (would set attributes of a real function or class)
    "BUILD on a class": (b"\x80\x02ccollections\nOrderedDict\n}X\x01\x00\x00\x00aK\x01sb.",
                         "sets the state of collections.OrderedDict"),
    "BUILD __defaults__": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b.",
                           "sets the state of torch._utils._rebuild_tensor_v2"),
    "BUILD of a dunder on an OrderedDict": (b"\x80\x02ccollections\nOrderedDict\n)R}X\x09\x00\x00\x00__class__Nsb.",
                                            "sets the state of a OrderedDict"),
    "SETITEM on a class": (b"\x80\x02ccollections\nOrderedDict\nX\x01\x00\x00\x00aK\x01s.",
                           "adds items to collections.OrderedDict"),
    "EXT1": (b"\x80\x02\x82\x01.", "extension code 1"),
    "STACK_GLOBAL": (b"\x80\x04" + short("posix") + short("system") + b"\x93" + short("id") + b"\x85R.",
                     "posix.system"),
    "dotted name": (b"\x80\x04" + short("numpy") + short("testing._private.utils.runstring") + b"\x93.",
                    "numpy.testing._private.utils.runstring"),
    "INST (protocol 0)": (b"(S'touch /tmp/x'\nios\nsystem\n.", "os.system"),
    "copyreg on a real class": (b"\x80\x02ccopy_reg\n_reconstructor\nccollections\nOrderedDict\n"
                                b"c__builtin__\nobject\nN\x87R.",
                                "reconstructs collections.OrderedDict through copyreg"),
    "getattr": (b"\x80\x02c__builtin__\ngetattr\n.", "builtins.getattr"),
    "torch function": (b"\x80\x02ctorch.serialization\nload\n.", "torch.serialization.load"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_opcodes_are_refused(tmp_path, case):
    from mmfast.io import _unpickle_torch_file  # the reader read_state_dict falls back to

    data, why = HOSTILE[case]
    path = with_data_pkl(tmp_path, data)
    with pytest.raises(ValueError, match=rf"refused to load .*evil\.pt.*{re.escape(why)}"):
        _unpickle_torch_file(path)
    with pytest.raises(ValueError):  # weights_only first, then the fallback: never a result
        read_state_dict(path)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (None,)


def test_malformed_tensor_records(tmp_path):
    # a tensor that reaches past its storage: torch would grow the storage; here the file is corrupt
    from mmfast.io import _unpickle_torch_file

    torch.save({"w": torch.zeros(4), "x": Unimportable()}, tmp_path / "good.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "good.pt").read_bytes()
    i = data.index(b"\x4b\x04\x85")  # the size tuple (4,) right after the storage reference
    (tmp_path / "big.pt").write_bytes(data[:i] + b"\x4b\x05\x85" + data[i + 3:])
    with pytest.raises(ValueError, match=r"big\.pt' could not be read.*past the end of its storage"):
        _unpickle_torch_file(tmp_path / "big.pt")
    (tmp_path / "short.pt").write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"short\.pt' could not be read.*truncated"):
        read_state_dict(tmp_path / "short.pt")


# ---------------------------------------------------------------- missing and corrupt files

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="is a directory"):
        read_state_dict(tmp_path)


def test_corrupt_files(tmp_path, tiny_clip):
    random_bytes = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                 dtype=torch.uint8).numpy().tobytes()
    cases = {
        "random.pt": (random_bytes, "is not a checkpoint: it starts with"),
        "random_pickle.pt": (b"\x80\x02" + random_bytes, "could not be read .*expected a torch.save"),
        "random.safetensors": (random_bytes, "safetensors"),
        "notes.pt": (b"hello, these are not weights\n", "is not a checkpoint"),
        "notes.safetensors": (b"hello, these are not weights\n", "safetensors"),
        "readme.zip": (None, "without exactly one <prefix>/data.pkl"),
    }
    sd = state()
    torch.save(sd, tmp_path / "full.pt")
    safetensors.torch.save_file(sd, tmp_path / "full.safetensors")
    torch.jit.save(torch.jit.script(tiny_clip), tmp_path / "script.pt")
    for name, expect in [("full.pt", "truncated or corrupt zip"), ("full.safetensors", "safetensors"),
                         ("script.pt", "truncated or corrupt zip")]:
        data = (tmp_path / name).read_bytes()
        cases["half_" + name] = (data[: len(data) // 2], expect)
    for name, (data, expect) in cases.items():
        path = tmp_path / name
        if data is None:
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("readme.txt", "hi")
        else:
            path.write_bytes(data)
        with pytest.raises(ValueError, match=expect) as info:
            read_state_dict(path)
        assert name in str(info.value)


def test_read_json(tmp_path):
    (tmp_path / "ok.json").write_text('{"embed_dim": 512, "vision_cfg": {"image_size": 224}}')
    assert read_json(tmp_path / "ok.json")["vision_cfg"]["image_size"] == 224
    (tmp_path / "bad.json").write_text('{"embed_dim": 512,\n "vision_cfg": }')
    with pytest.raises(ValueError, match=r"bad\.json' is not valid JSON: .* line 2"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"bin\.json"):
        read_json(tmp_path / "bin.json")
