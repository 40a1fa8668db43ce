"""The loaders' default backend: $MMFAST_BACKEND, else "auto" (measured per part); TensorRT's wiring
and the refusals that need no GPU; "auto" without ONNX Runtime installed."""
import pytest
import torch

from mmfast import load_clip
from mmfast.backends import auto
from mmfast.backends.auto import resolve_backend


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("MMFAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mmfast-cache"))


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    assert resolve_backend(None) == "auto"
    assert resolve_backend("onnxruntime") == "onnxruntime"
    monkeypatch.setenv("MMFAST_BACKEND", "torch")
    assert resolve_backend(None) == "torch"
    assert resolve_backend("auto") == "auto"                  # an explicit argument wins over the variable
    monkeypatch.setenv("MMFAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"\$MMFAST_BACKEND='cuda'.*unset it"):
        resolve_backend(None)
    with pytest.raises(ValueError, match=r"backend='trt' is not supported.*'tensorrt'"):
        resolve_backend("trt")


def test_load_clip_defaults_to_auto(monkeypatch, tiny_clip_dir):
    monkeypatch.delenv("MMFAST_BACKEND", raising=False)
    clip = load_clip(tiny_clip_dir, device="cpu")
    assert clip.backend.startswith("auto: image ")
    assert all("fastest of" in i["why"] or i["why"].startswith("cached measurement") for i in clip.info.values())
    monkeypatch.setenv("MMFAST_BACKEND", "torch")
    assert load_clip(tiny_clip_dir, device="cpu").backend == "torch"


def test_auto_without_onnxruntime_runs_torch_and_says_why(monkeypatch, tiny_clip_dir):
    monkeypatch.setattr(auto, "ort_missing", lambda: "ONNX Runtime is not installed (pip install 'mmfast[onnx]')")
    clip = load_clip(tiny_clip_dir, device="cpu", backend="auto")
    assert {i["backend"] for i in clip.info.values()} == {"torch"}
    assert "mmfast[onnx]" in clip.info["image"]["why"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_tensorrt_backend_needs_a_gpu(tiny_clip_dir, tmp_path):
    from mmfast import load_generator, load_vq
    with pytest.raises(ValueError, match=r"backend='tensorrt' runs CLIP on an NVIDIA GPU.*device='cpu'"):
        load_clip(tiny_clip_dir, device="cpu", backend="tensorrt")
    from mmfast.vqgan import VQGAN, VQConfig
    cfg = VQConfig(resolution=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                   embed_dim=8, n_embed=16)
    torch.save({"state_dict": VQGAN(cfg).state_dict()}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"backend='tensorrt' runs the VQGAN on an NVIDIA GPU"):
        load_vq(tmp_path / "last.ckpt", device="cpu", backend="tensorrt")
    with pytest.raises(ValueError, match=r"backend='tensorrt' is not offered for the generator"):
        from mmfast.dalle.generate import Generator
        Generator(None, None, None, device="cpu", backend="tensorrt")
    assert load_generator  # imported for the public name


def test_tensorrt_dtype_is_checked_before_tensorrt_is_needed():
    with pytest.raises(ValueError, match=r"dtype='int8' cannot run CLIP on TensorRT"):
        auto._tensorrt_precision("CLIP", "int8", torch.device("cuda"))


def test_auto_routes_a_tower_by_batch_when_the_winner_depends_on_it(tiny_clip):
    """A measurement where torch wins small batches and ONNX Runtime large ones: calls go by batch."""
    import torch.nn.functional as F

    from mmfast.backends.onnxruntime import OrtClip, weights_sha256
    from mmfast.clip.runtime import Clip

    large = {"choice": "onnxruntime fp32", "from_batch": 4, "times_ms": {}, "why": "test"}
    choice = {"image": {"choice": "torch", "why": "test", "torch_dtype": "fp32", "large": large},
              "text": {"choice": "torch", "why": "test", "torch_dtype": "fp32"}}
    auto._store(auto._key("clip", weights_sha256(tiny_clip), "fp32", torch.device("cpu")), choice)
    clip = Clip(tiny_clip, device="cpu", dtype="fp32", backend="auto")
    ref = Clip(tiny_clip, device="cpu", dtype="fp32")
    assert clip.info["image"]["large_batch"]["backend"] == "onnxruntime"
    route = clip.model._route
    assert not isinstance(route(clip.model.image, 3)[1], OrtClip)
    assert isinstance(route(clip.model.image, 4)[1], OrtClip)
    for n in (1, 3, 4, 9):
        x = torch.randn(n, 3, 32, 32)
        assert F.cosine_similarity(clip.encode_images(x), ref.encode_images(x)).min() > 0.9999
    assert torch.equal(clip.encode_texts(["a cat", "a dog"]), ref.encode_texts(["a cat", "a dog"]))
