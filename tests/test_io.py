"""mmfast.io: every format round-trips; TorchScript is read without running it;
pickles that try to run code and corrupt files fail with a clear error."""
import os
import pickle
import zipfile

import pytest
import safetensors.torch
import torch
from torch import nn

from mmfast.io import read_json, read_state_dict, read_torchscript

# torch.jit is deprecated upstream, but OpenAI's CLIP weights ship as TorchScript archives.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")]


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
