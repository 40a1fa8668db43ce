"""mmfast.vqgan.load: taming Lightning checkpoints (with their yaml, or inferred), pickled callback
objects kept inert, code in pickles refused, ru-dalle's Gumbel layout, min-dalle's detoker.pt, and
errors that name the key and both shapes."""
import argparse
import builtins
import importlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from torch import nn

from mmfast.vqgan.config import VQConfig, vq_preset
from mmfast.vqgan.load import config_from_yaml, infer_config, load_into, load_vq_checkpoint
from mmfast.vqgan.model import VQGAN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Tiny taming architectures: two levels, attention on the second (at resolution 256: side 128).
TINY = VQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), z_channels=32,
                embed_dim=16, n_embed=64)
TINY_GUMBEL = TINY.replace(embed_dim=32, n_embed=48, quantizer="gumbel")  # taming's GumbelVQ needs embed_dim == z


def ddconfig(cfg: VQConfig) -> dict:
    return dict(double_z=False, z_channels=cfg.z_channels, resolution=cfg.resolution, in_channels=cfg.in_channels,
                out_ch=cfg.out_ch, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)


def taming_model(cfg: VQConfig, seed: int = 0) -> nn.Module:
    """taming's VQModel / GumbelVQ at inference, from taming's own modules (the quantizer by hand:
    taming 0.0.1 has no GumbelQuantize); every parameter random, GroupNorm affine included."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    torch.manual_seed(seed)
    m = nn.Module()
    m.encoder, m.decoder = Encoder(**ddconfig(cfg)), Decoder(**ddconfig(cfg))
    if cfg.quantizer == "vq":
        m.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, beta=0.25)
    else:
        m.quantize = nn.Module()
        m.quantize.proj = nn.Conv2d(cfg.z_channels, cfg.n_embed, 1)
        m.quantize.embed = nn.Embedding(cfg.n_embed, cfg.embed_dim)
    m.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
    m.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def lightning_ckpt(sd: dict, callback_cls=None, hparams=None) -> dict:
    """What taming's Lightning run saves: weights with the training loss, callback state keyed by the
    callback class (PL 1.x) and instances, optimizer state, hyper-parameter objects."""
    loss = {"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
            "loss.perceptual_loss.net.slice1.0.weight": torch.randn(8, 3, 3, 3),
            "loss.logvar": torch.zeros(())}
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
            "state_dict": {**sd, **loss},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                                  "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9)}]}],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": hparams if hparams is not None else {
                "args": argparse.Namespace(base_learning_rate=4.5e-6, seed=np.int64(23), resume=""),
                "lr": np.float64(4.5e-6), "dtype": np.dtype("float32"), "scales": np.arange(3.0)}}
    if callback_cls is not None:
        ckpt["callbacks"] = {callback_cls: {"best_model_score": torch.tensor(0.25), "best_model_path": "x.ckpt"},
                             "ModelCheckpoint{'monitor': 'val/rec_loss'}": callback_cls()}
    return ckpt


def taming_yaml(cfg: VQConfig, target: str) -> str:
    return yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": {
        "embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "monitor": "val/rec_loss", "ddconfig": ddconfig(cfg),
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 250001, "codebook_weight": 1.0}}}},
        "data": {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4}}})


CALLBACK_SOURCE = '''
import os
SENTINEL = {sentinel!r}


class ModelCheckpoint:
    """Stands in for pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint."""

    def __init__(self):
        self.monitor, self.best_model_path, self.save_top_k = "val/rec_loss", "x.ckpt", 1

    def __setstate__(self, state):  # an unsafe loader would run this
        open(SENTINEL, "w").close()
        self.__dict__.update(state)
'''


@pytest.fixture
def callback_module(tmp_path):
    """A module that exists while the checkpoint is saved, and is gone (unimportable) when it is loaded."""
    name = "mmfast_test_fake_lightning_callbacks"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(CALLBACK_SOURCE.format(sentinel=str(tmp_path / "callback_ran")))
    sys.path.insert(0, str(tmp_path / "mods"))
    module = importlib.import_module(name)

    def forget():
        sys.modules.pop(name, None)
        if str(tmp_path / "mods") in sys.path:
            sys.path.remove(str(tmp_path / "mods"))
        shutil.rmtree(tmp_path / "mods", ignore_errors=True)

    module.forget = forget
    yield module
    forget()


@pytest.fixture
def no_import_of(monkeypatch):
    """Record every import the loader attempts; the test asserts the named modules were never asked for."""
    asked = []
    real = builtins.__import__

    def spy(name, *args, **kwargs):
        asked.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    return asked


def assert_same_weights(ours: dict, ref: dict):
    assert sorted(ours) == sorted(ref)
    for k, v in ref.items():
        assert ours[k].shape == v.shape and torch.equal(ours[k], v), k


# ---------------------------------------------------------------- taming Lightning checkpoints

@pytest.mark.parametrize("zipped", [True, False])
def test_lightning_ckpt_with_callback_objects_loads(tmp_path, callback_module, no_import_of, zipped):
    ref = taming_model(TINY)
    run = tmp_path / "logs" / "2021-04-01T10-00-00_tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    path = run / "checkpoints" / "last.ckpt"
    torch.save(lightning_ckpt(ref.state_dict(), callback_module.ModelCheckpoint), path,
               _use_new_zipfile_serialization=zipped)
    callback_module.forget()
    with pytest.raises(Exception, match="Unsupported global|weights_only"):
        torch.load(path, weights_only=True)  # what this test is about: torch's safe loader refuses the file
    # a resumed run has several project yamls: the latest one is the run's config
    (run / "configs" / "2021-03-01T09-00-00-project.yaml").write_text(
        taming_yaml(TINY.replace(n_embed=32), "taming.models.vqgan.VQModel"))
    (run / "configs" / "2021-04-01T10-00-00-project.yaml").write_text(taming_yaml(TINY, "taming.models.vqgan.VQModel"))

    del no_import_of[:]
    cfg, sd = load_vq_checkpoint(path)
    assert "mmfast_test_fake_lightning_callbacks" not in no_import_of + list(sys.modules)
    assert not (tmp_path / "callback_ran").exists()
    assert cfg == TINY
    assert_same_weights(sd, ref.state_dict())  # loss.* dropped, nothing else
    # the folder of the run loads the same way
    assert load_vq_checkpoint(run)[0] == TINY

    # the loaded model is taming's: latents, tokens and decoded pixels
    model = VQGAN(cfg)
    load_into(model, sd, str(path))
    model.eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        h = ref.quant_conv(ref.encoder(x))
        torch.testing.assert_close(model.encode_latents(x), h, atol=1e-4, rtol=1e-4)
        ids = torch.randint(0, cfg.n_embed, (2, 3, 4))
        z = ref.quantize.embedding(ids).permute(0, 3, 1, 2)
        torch.testing.assert_close(model.decode(ids), ref.decoder(ref.post_quant_conv(z)), atol=1e-4, rtol=1e-4)


def test_config_inferred_without_yaml_equals_the_true_one(tmp_path, callback_module):
    for true in (TINY, TINY.replace(ch=64, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=(64,),
                                    in_channels=1, out_ch=1, z_channels=64, embed_dim=8),
                 TINY_GUMBEL, TINY.replace(attn_resolutions=())):
        path = tmp_path / f"{true.ch}-{true.quantizer}-{len(true.attn_resolutions)}.ckpt"
        torch.save(lightning_ckpt(taming_model(true).state_dict(), callback_module.ModelCheckpoint), path)
        cfg, _ = load_vq_checkpoint(path)
        assert cfg == true


@pytest.mark.parametrize("layout", ["release", "stem", "passed"])
def test_config_found_beside_the_ckpt(tmp_path, layout):
    ref = taming_model(TINY)
    text = taming_yaml(TINY, "taming.models.vqgan.VQModel")
    if layout == "release":  # vqgan_imagenet_f16_16384.zip: ckpts/last.ckpt + configs/model.yaml
        (tmp_path / "ckpts").mkdir()
        (tmp_path / "configs").mkdir()
        path = tmp_path / "ckpts" / "last.ckpt"
        (tmp_path / "configs" / "model.yaml").write_text(text)
    elif layout == "stem":  # VQGAN+CLIP notebooks: vqgan_imagenet_f16_16384.{ckpt,yaml}
        path = tmp_path / "vqgan_imagenet_f16_16384.ckpt"
        (tmp_path / "vqgan_imagenet_f16_16384.yaml").write_text(text)
    else:
        path = tmp_path / "last.ckpt"
        (tmp_path / "elsewhere.yaml").write_text(text)
    torch.save(lightning_ckpt(ref.state_dict()), path)
    # a different resolution than inference would assume shows the yaml was used
    cfg = TINY.replace(resolution=512, attn_resolutions=(256,))
    text = text.replace("resolution: 256", "resolution: 512").replace("- 128", "- 256")
    for p in tmp_path.rglob("*.yaml"):
        p.write_text(text)
    kwargs = {"config": tmp_path / "elsewhere.yaml"} if layout == "passed" else {}
    got, _ = load_vq_checkpoint(path, **kwargs)
    assert got == cfg
    if layout == "release":
        assert load_vq_checkpoint(tmp_path)[0] == cfg


def test_yaml_that_disagrees_with_the_tensors(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(lightning_ckpt(taming_model(TINY).state_dict()), path)
    (tmp_path / "model.yaml").write_text(taming_yaml(TINY.replace(n_embed=128), "taming.models.vqgan.VQModel"))
    with pytest.raises(ValueError, match=r"last\.ckpt' does not fit the config \('.*model\.yaml'\): quantize\."
                                         r"embedding\.weight has shape \(64, 16\) in the checkpoint but \(128, 16\)"):
        load_vq_checkpoint(path)
    (tmp_path / "model.yaml").write_text(taming_yaml(TINY, "taming.models.cond_transformer.Net2NetTransformer"))
    with pytest.raises(ValueError, match="Net2NetTransformer.*not a VQGAN"):
        load_vq_checkpoint(path)
    (tmp_path / "model.yaml").write_text("model:\n  params: {embed_dim: 4}\n")
    with pytest.raises(ValueError, match="no model.params.ddconfig"):
        load_vq_checkpoint(path)


# ---------------------------------------------------------------- code in pickles never runs

class RunsCode:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(tmp_path):
    sentinel = tmp_path / "pwned"
    (tmp_path / "mods").mkdir(exist_ok=True)
    (tmp_path / "mods" / "mmfast_test_payload.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    touch = f"open({str(sentinel)!r}, 'w').close()"
    return sentinel, {
        "posix.system": RunsCode(os.system, f"touch {sentinel}"),
        "builtins.eval": RunsCode(builtins.eval, touch),
        "builtins.exec": RunsCode(builtins.exec, touch),
        "subprocess.Popen": RunsCode(subprocess.Popen, ["touch", str(sentinel)]),
        "importlib.import_module": RunsCode(importlib.import_module, "mmfast_test_payload"),
        # nested: the outer call's argument is itself a call
        "posix.system ": RunsCode(os.system, RunsCode(builtins.eval, f"'touch {sentinel}'")),
        "builtins.exec ": RunsCode(builtins.exec, RunsCode(builtins.eval, repr(touch))),
    }


@pytest.mark.parametrize("which", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                   "importlib.import_module", "posix.system ", "builtins.exec "])
@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_lightning_ckpt_is_refused(tmp_path, monkeypatch, which, zipped):
    sentinel, found = payloads(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))  # the payload module would be importable
    ckpt = lightning_ckpt(taming_model(TINY).state_dict())
    ckpt["hyper_parameters"]["args"].callback = found[which]  # deep inside an otherwise inert object
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match=rf"refused to load .*last\.ckpt.*wants {which.strip()}, which can run code"):
        load_vq_checkpoint(path)
    assert not sentinel.exists()
    assert "mmfast_test_payload" not in sys.modules


# ---------------------------------------------------------------- ru-dalle's Gumbel f8

def gumbel_state_dict(cfg: VQConfig) -> dict:
    """taming GumbelVQ names, the quantizer tensors made by hand in their shapes."""
    ref = taming_model(cfg.replace(quantizer="vq"))
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("quantize.")}
    g = torch.Generator().manual_seed(1)
    sd["quantize.proj.weight"] = torch.randn(cfg.n_embed, cfg.z_channels, 1, 1, generator=g) * 0.1
    sd["quantize.proj.bias"] = torch.randn(cfg.n_embed, generator=g) * 0.1
    sd["quantize.embed.weight"] = torch.randn(cfg.n_embed, cfg.embed_dim, generator=g)
    return sd


def test_rudalle_gumbel_layout(tmp_path):
    sd = gumbel_state_dict(TINY_GUMBEL)
    path = tmp_path / "vqgan.gumbelf8-sber.model.ckpt"
    torch.save(lightning_ckpt(sd), path)
    cfg, got = load_vq_checkpoint(path)  # no yaml: inferred
    assert cfg == TINY_GUMBEL and cfg.quantizer == "gumbel"
    assert_same_weights(got, sd)
    (tmp_path / "vqgan.gumbelf8-sber.config.yml").write_text(taming_yaml(TINY_GUMBEL, "taming.models.vqgan.GumbelVQ"))
    assert load_vq_checkpoint(path)[0] == TINY_GUMBEL
    assert load_vq_checkpoint(tmp_path)[0] == TINY_GUMBEL

    # tokens are the argmax of quantize.proj's logits (no Gumbel noise), codes come from quantize.embed
    model = VQGAN(cfg)
    load_into(model, got, str(path))
    model.eval()
    from taming.modules.diffusionmodules.model import Encoder

    enc = Encoder(**ddconfig(cfg)).eval()
    enc.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        h = torch.nn.functional.conv2d(enc(x), sd["quant_conv.weight"], sd["quant_conv.bias"])
        logits = torch.nn.functional.conv2d(h, sd["quantize.proj.weight"], sd["quantize.proj.bias"])
        assert torch.equal(model.encode(x), logits.argmax(1))
        ids = torch.randint(0, cfg.n_embed, (1, 2, 2))
        torch.testing.assert_close(model.quantize.lookup(ids), sd["quantize.embed.weight"][ids].permute(0, 3, 1, 2))


def test_gumbel_file_as_vq_and_the_reverse(tmp_path):
    gumbel, vq = tmp_path / "gumbel.ckpt", tmp_path / "vq.ckpt"
    torch.save(lightning_ckpt(gumbel_state_dict(TINY_GUMBEL)), gumbel)
    torch.save(lightning_ckpt(taming_model(TINY).state_dict()), vq)
    with pytest.raises(ValueError, match=r"has a Gumbel quantizer \(quantize\.proj\.weight\) but config says "
                                         r"quantizer='vq' \(preset 'vqgan-f16-16384'\)"):
        load_vq_checkpoint(gumbel, name="vqgan-f16-16384")
    with pytest.raises(ValueError, match=r"has a VQ quantizer \(quantize\.embedding\.weight\) but config says "
                                         r"quantizer='gumbel' \(preset 'gumbel-f8-8192'\)"):
        load_vq_checkpoint(vq, name="gumbel-f8-8192")
    (tmp_path / "gumbel.yaml").write_text(taming_yaml(TINY_GUMBEL, "taming.models.vqgan.GumbelVQ"))
    with pytest.raises(ValueError, match=r"VQ quantizer .* quantizer='gumbel' \('.*gumbel\.yaml'\)"):
        load_vq_checkpoint(vq, config=tmp_path / "gumbel.yaml")
    with pytest.raises(ValueError, match="Gumbel quantizer"):
        load_into(VQGAN(TINY), load_vq_checkpoint(gumbel)[1], "gumbel.ckpt")


# ---------------------------------------------------------------- min-dalle's detoker.pt

@pytest.fixture(scope="module")
def detokenizer():
    from min_dalle.models.vqgan_detokenizer import VQGanDetokenizer

    torch.manual_seed(0)
    m = VQGanDetokenizer().eval()  # fixed size: f16, 16384 codes of 256 (about 40M parameters)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def test_min_dalle_detoker_matches_min_dalle(tmp_path, detokenizer):
    root = tmp_path / "pretrained"
    (root / "vqgan").mkdir(parents=True)
    torch.save(detokenizer.state_dict(), root / "vqgan" / "detoker.pt")
    cfg, sd = load_vq_checkpoint(root / "vqgan" / "detoker.pt")
    assert cfg == vq_preset("min-dalle-f16-16384")
    assert cfg.norm_eps == 1e-5 and cfg.output_range == (0.0, 1.0) and not cfg.has_encoder
    for where in (root, root / "vqgan"):  # min-dalle's models root, and the folder holding detoker.pt
        assert load_vq_checkpoint(where)[0] == cfg
    torch.testing.assert_close(sd["quantize.embedding.weight"], detokenizer.embedding.weight, rtol=0, atol=0)

    model = VQGAN(cfg)
    load_into(model, sd, "detoker.pt")
    model.eval()
    ids = torch.randint(0, 16384, (1, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = detokenizer(False, ids.flatten(1))                   # (256, 256, 3), clip(0, 1) * 255
        ours = (model.decode(ids).clip(0.0, 1.0) * 255)[0].permute(1, 2, 0)
    assert 0.2 < ((theirs > 0) & (theirs < 255)).float().mean() < 0.98  # not saturated: the clip hides little
    torch.testing.assert_close(ours / 255, theirs / 255, atol=1e-4, rtol=0)

    # the same weights in our names, as safetensors, with the preset's name
    safetensors.torch.save_file(model.state_dict(), tmp_path / "detoker.safetensors")
    cfg2, sd2 = load_vq_checkpoint(tmp_path / "detoker.safetensors", name="min-dalle-f16-16384")
    assert cfg2 == cfg
    assert_same_weights(sd2, sd)
    with pytest.raises(ValueError,
                       match=r"has no encoder \(decoder only.*has_encoder=True \(preset 'vqgan-f16-16384'\)"):
        load_vq_checkpoint(tmp_path / "detoker.safetensors", name="vqgan-f16-16384")


# ---------------------------------------------------------------- bad input

def test_checkpoint_for_another_config_names_key_and_shapes(tmp_path):
    sd = taming_model(TINY).state_dict()
    safetensors.torch.save_file(sd, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=r"config \(preset 'vqgan-f16-1024'\): encoder\.conv_in\.weight has shape "
                                         r"\(32, 3, 3, 3\) in the checkpoint but \(128, 3, 3, 3\) in the config"):
        load_vq_checkpoint(tmp_path / "w.safetensors", name="vqgan-f16-1024")
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight has shape \(64, 16\) .* but \(65, 16\)"):
        load_vq_checkpoint(tmp_path / "w.safetensors", config=TINY.replace(n_embed=65))
    with pytest.raises(ValueError, match=r"w\.safetensors.*decoder\.conv_out\.weight has shape \(3, 32, 3, 3\) in the "
                                         r"checkpoint but \(1, 32, 3, 3\) in the config \(1 more keys differ\)"):
        load_into(VQGAN(TINY.replace(out_ch=1)), sd, str(tmp_path / "w.safetensors"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = taming_model(TINY).state_dict()
    del sd["decoder.up.1.block.0.conv1.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"missing keys \['decoder\.up\.1\.block\.0\.conv1\.bias'\], "
                                         r"unexpected keys \['decoder\.extra\.weight'\]"):
        load_vq_checkpoint(tmp_path / "w.pt", config=TINY)


def test_not_a_checkpoint_and_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_vq_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "notes.ckpt").write_text("these are not weights\n")
    with pytest.raises(ValueError, match=r"notes\.ckpt' is not a checkpoint"):
        load_vq_checkpoint(tmp_path / "notes.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no VQGAN weights"):
        load_vq_checkpoint(tmp_path / "empty")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a VQGAN state dict"):
        load_vq_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="unknown VQ preset 'f16'.*vqgan-f16-16384"):
        load_vq_checkpoint(tmp_path / "other.pt", name="f16")
    with pytest.raises(ValueError, match="not both"):
        load_vq_checkpoint(tmp_path / "other.pt", name="vqgan-f16-16384", config=TINY)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_vq_checkpoint(tmp_path / "other.pt", config=tmp_path / "missing.yaml")


def test_yaml_reader_and_inference_helpers(tmp_path):
    (tmp_path / "rudalle.yml").write_text(taming_yaml(vq_preset("gumbel-f8-8192"), "taming.models.vqgan.GumbelVQ"))
    assert config_from_yaml(tmp_path / "rudalle.yml") == vq_preset("gumbel-f8-8192")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml' is not a readable YAML"):
        config_from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "kl.yaml").write_text(taming_yaml(TINY, "taming.models.vqgan.VQModel").replace(
        "double_z: false", "double_z: true"))
    with pytest.raises(ValueError, match="double_z"):
        config_from_yaml(tmp_path / "kl.yaml")
    with torch.device("meta"):  # the presets' shapes, without allocating them
        for name in ("vqgan-f16-16384", "vqgan-f16-1024", "gumbel-f8-8192", "min-dalle-f16-16384"):
            preset = vq_preset(name)
            inferred = infer_config(VQGAN(preset).state_dict())
            assert inferred == preset.replace(norm_eps=inferred.norm_eps, output_range=inferred.output_range), name
