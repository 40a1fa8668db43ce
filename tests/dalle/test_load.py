"""min-dalle's file layouts, config inference, and the errors for files that do not fit."""
import shutil
from pathlib import Path

import pytest
import torch

from mmfast.dalle import dalle_preset, load_generator
from mmfast.dalle.config import DalleConfig
from mmfast.dalle.load import build_models, infer_config, load_dalle_checkpoint
from mmfast.dalle.model import DalleDecoder, DalleEncoder

FILES = ("encoder.pt", "decoder.pt", "vocab.json", "merges.txt")


def _copy_model(src: Path, dst: Path, **replace) -> Path:
    dst.mkdir(parents=True)
    for f in FILES:
        shutil.copy(src / f, dst / f)
    for name, sd in replace.items():
        torch.save(sd, dst / f"{name}.pt")
    return dst


@pytest.mark.parametrize("name", ["dalle-mini", "dalle-mega", "dalle-tiny"])
def test_config_inferred_from_shapes(name):
    cfg = dalle_preset(name)
    with torch.device("meta"):
        enc, dec = DalleEncoder(cfg).state_dict(), DalleDecoder(cfg).state_dict()
    assert infer_config(enc, dec, Path("encoder.pt"), Path("decoder.pt")) == cfg


def test_presets_and_config_checks():
    with pytest.raises(ValueError, match="dalle-mega, dalle-mini, dalle-tiny"):
        dalle_preset("dalle-giga")
    with pytest.raises(ValueError, match="multiple of heads"):
        DalleConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="start_token"):
        DalleConfig(start_token=20000)


def test_layouts(tiny, tmp_path):
    model_dir = tiny[0]
    root = model_dir.parent
    ckpt = load_dalle_checkpoint(root)
    assert ckpt.config == dalle_preset("dalle-tiny") and ckpt.detoker is None
    assert load_dalle_checkpoint(model_dir).config == ckpt.config
    # min-dalle's models_root with both models and the VQGAN beside them
    both = tmp_path / "pretrained"
    _copy_model(model_dir, both / "dalle_bart_mini")
    _copy_model(model_dir, both / "dalle_bart_mega")
    (both / "vqgan").mkdir()
    (both / "vqgan" / "detoker.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="variant='mini' or variant='mega'"):
        load_dalle_checkpoint(both)
    mega = load_dalle_checkpoint(both, variant="mega")
    assert mega.vocab.parent.name == "dalle_bart_mega" and mega.detoker == both / "vqgan" / "detoker.pt"
    assert load_dalle_checkpoint(both / "dalle_bart_mini").detoker == both / "vqgan" / "detoker.pt"
    assert load_generator(both, variant="mini", device="cpu", vqgan=None).detoker_path == both / "vqgan" / "detoker.pt"
    with pytest.raises(ValueError, match="variant must be"):
        load_dalle_checkpoint(both, variant="large")


def test_missing_files(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dalle_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dalle_bart_mini"):
        load_dalle_checkpoint(tmp_path)
    d = _copy_model(tiny[0], tmp_path / "m")
    (d / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
        load_dalle_checkpoint(d)
    only_mini = tmp_path / "root"
    _copy_model(tiny[0], only_mini / "dalle_bart_mini")
    with pytest.raises(FileNotFoundError, match="no dalle_bart_mega/"):
        load_dalle_checkpoint(only_mini, variant="mega")


def test_swapped_files_are_named(tiny, tmp_path):
    _, enc, dec, *_ = tiny
    d = _copy_model(tiny[0], tmp_path / "swapped", encoder=dec.state_dict(), decoder=enc.state_dict())
    with pytest.raises(ValueError, match="encoder.pt' is a decoder file"):
        load_dalle_checkpoint(d)
    d = _copy_model(tiny[0], tmp_path / "two_encoders", decoder=enc.state_dict())
    with pytest.raises(ValueError, match="decoder.pt' is an encoder file"):
        load_dalle_checkpoint(d)


def test_shape_mismatch_names_key_and_shapes(tiny, tmp_path):
    _, enc, dec, *_ = tiny
    sd = dict(dec.state_dict())
    sd["layers.1.glu.fc0.weight"] = torch.zeros(7, 128)
    with pytest.raises(ValueError, match=r"layers\.1\.glu\.fc0\.weight has shape \(7, 128\) but .* needs \(200, 128\)"):
        build_models(load_dalle_checkpoint(_copy_model(tiny[0], tmp_path / "shape", decoder=sd)))
    sd = dict(dec.state_dict())
    del sd["layers.0.encoder_attn_layer_norm.bias"]
    with pytest.raises(ValueError, match=r"lacks 'layers\.0\.encoder_attn_layer_norm\.bias'"):
        build_models(load_dalle_checkpoint(_copy_model(tiny[0], tmp_path / "missing", decoder=sd)))
    sd = {**enc.state_dict(), "pose_tokens": torch.zeros(2, 64)}
    with pytest.warns(UserWarning, match="ignoring 1 keys"):
        build_models(load_dalle_checkpoint(_copy_model(tiny[0], tmp_path / "extra", encoder=sd)))
    sd = dict(dec.state_dict())
    sd["lm_head.weight"] = torch.zeros(16385, 64)
    with pytest.raises(ValueError, match="widths differ"):
        load_dalle_checkpoint(_copy_model(tiny[0], tmp_path / "width", decoder=sd))
