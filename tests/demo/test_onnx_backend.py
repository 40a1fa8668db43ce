"""The demo models on ONNX Runtime agree with PyTorch (exports checked and cached in a temp folder)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import mmfast  # noqa: E402
from mmfast.demo import data, evaluate  # noqa: E402
from mmfast.vqgan.runtime import psnr  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MMFAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mmfast-cache"))


def test_clip(demo):
    clip = demo[0]
    ort = mmfast.load_clip("demo", device="cpu", dtype="fp32", backend="onnxruntime")
    s = data.sample(64, seed=7, split="heldout")
    texts = data.labels("en") + data.labels("ru") + data.captions(s, "mix", seed=7)
    for a, b in ((clip.encode_images(s.images.numpy()), ort.encode_images(s.images.numpy())),
                 (clip.encode_texts(texts), ort.encode_texts(texts))):
        assert F.cosine_similarity(a, b).min() > 0.9999
    for lang in ("en", "ru"):
        assert torch.equal(evaluate.predict(clip, s.images, lang), evaluate.predict(ort, s.images, lang))


def test_vq(demo):
    vq = demo[1]
    ort = mmfast.load_vq("demo", device="cpu", dtype="fp32", backend="onnxruntime")
    px = data.sample(32, seed=8, split="heldout").pixels()
    tokens = vq.encode_pixels(px)
    assert (ort.encode_pixels(px) == tokens).float().mean() >= 0.99     # ties may flip a code
    assert psnr(ort.decode_pixels(tokens), vq.decode_pixels(tokens)) > 50


def test_generator(demo):
    clip, vq, gen = demo
    ort = mmfast.load_generator("demo", device="cpu", dtype="fp32", backend="onnxruntime", vqgan=vq)
    prompts = [p for p, _, _ in data.heldout_prompts("en")]
    want = gen.generate_tokens(prompts, n=2, seed=0, **evaluate.SAMPLING)
    got = ort.generate_tokens(prompts, n=2, seed=0, **evaluate.SAMPLING)
    assert (got == want).float().mean() >= 0.95
    assert evaluate.generation_accuracy(ort, clip, split="seen") >= 0.95
    assert evaluate.generation_accuracy(ort, clip) == pytest.approx(evaluate.generation_accuracy(gen, clip), abs=0.05)
