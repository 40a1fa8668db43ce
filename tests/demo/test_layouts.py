"""The demo files are the real families' layouts: transformers reads the CLIP folder as a CLIPModel
(same embeddings, same token ids), and the generator folder's config.json names its VQGAN."""
import pytest
import torch
import torch.nn.functional as F

from mmfast.dalle.load import load_dalle_checkpoint
from mmfast.demo import data, weights_path

TEXTS = ["red circle", "красный круг", "круг красного цвета", "a small yellow star on the left",
         "зелёная звёздочка справа", "зеленая звездочка справа"]


def test_transformers_reads_the_clip_folder(demo):
    transformers = pytest.importorskip("transformers")
    path = weights_path("clip")
    model = transformers.CLIPModel.from_pretrained(path).float().eval()   # the files hold fp16
    tok = transformers.CLIPTokenizer.from_pretrained(path)
    clip = demo[0]
    ids = tok(TEXTS, padding="max_length", max_length=32, return_tensors="pt").input_ids
    assert torch.equal(ids, clip.tokenizer(TEXTS))
    images = data.sample(8, seed=3, split="heldout").images
    with torch.no_grad():
        img = model.get_image_features(pixel_values=clip.preprocess(images.numpy()))
        txt = model.get_text_features(input_ids=ids)
    img, txt = (getattr(t, "pooler_output", t) for t in (img, txt))
    torch.testing.assert_close(F.normalize(img, dim=-1), clip.encode_images(images.numpy()), atol=1e-4, rtol=0)
    torch.testing.assert_close(F.normalize(txt, dim=-1), clip.encode_texts(TEXTS), atol=1e-4, rtol=0)


def test_generator_folder_names_its_vqgan():
    ckpt = load_dalle_checkpoint(weights_path("generator"))
    assert ckpt.detoker == weights_path("vq").resolve()
    assert ckpt.config.codebook_size == ckpt.config.start_token == ckpt.config.image_vocab


@pytest.mark.parametrize("change, error, match", [
    ({"layers": 3}, ValueError, "unknown keys"),
    ({"start_token": 10 ** 6}, ValueError, "does not fit the weights"),
    ({"heads": "4"}, ValueError, "heads must be an int"),
    ({"vqgan": "../nowhere"}, FileNotFoundError, "nowhere"),
])
def test_generator_config_json_errors(tmp_path, change, error, match):
    import json
    import shutil
    src = weights_path("generator")
    shutil.copytree(src, tmp_path / "generator")
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "generator" / "config.json").write_text(json.dumps({**cfg, **change}))
    if "vqgan" not in change:
        shutil.copytree(weights_path("vq"), tmp_path / "vq")
    with pytest.raises(error, match=match):
        load_dalle_checkpoint(tmp_path / "generator")
