"""TensorRT: what is checkable without the library is checked (ONNX validity, profiles, the plan cache
key, the clear errors); building and running engines needs TensorRT and a GPU, and skips without them."""
import importlib.util
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from mmfast.export.graph import check_onnx, onnx_digest, signature
from mmfast.export.tensorrt import (build_plan, clip_profiles, import_tensorrt, optimization_profiles,
                                    out_of_profile, plan_key, vq_profiles)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()),
                               reason="TensorRT is not installable on this machine (and it needs an NVIDIA GPU)")
no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-library errors cannot show")


def _graph(path, inputs, dtype=TensorProto.FLOAT, weight=None):
    """A one-node ONNX (Identity of the first input, + an initializer) with the given input dims."""
    ins = [helper.make_tensor_value_info(n, dtype, dims) for n, dims in inputs]
    out = helper.make_tensor_value_info("y", dtype, inputs[0][1])
    inits = [weight] if weight is not None else []
    g = helper.make_graph([helper.make_node("Identity", [inputs[0][0]], ["y"])], "g", ins, [out], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# ---- the exported graphs ---------------------------------------------------------------------------
def test_clip_onnx_passes_checker_with_shape_inference_and_has_symbolic_batch(clip_onnx):
    for part, path in clip_onnx.items():
        sig = check_onnx(path)
        for t in sig.inputs + sig.outputs:
            assert isinstance(t.dims[0], str), f"{part}: {t.name} has a frozen batch axis {t.dims}"
    assert [t.name for t in signature(clip_onnx["text"]).inputs] == ["ids", "pool"]


def test_profiles_cover_the_batch_range_of_each_part(clip_onnx, tiny_clip):
    cfg = tiny_clip.cfg
    S, ctx = cfg.vision.image_size, cfg.text.context_length
    prof = clip_profiles(clip_onnx, cfg, max_batch=8, opt_batch=4)
    assert prof["image"] == {"pixels": ((1, 3, S, S), (4, 3, S, S), (8, 3, S, S))}
    assert prof["text"] == {"ids": ((1, 1), (4, ctx), (8, ctx)), "pool": ((1,), (4,), (8,))}
    for b in range(1, 9):
        assert out_of_profile(prof["image"]["pixels"], (b, 3, S, S)) is None
        assert out_of_profile(prof["text"]["pool"], (b,)) is None
        for T in (1, 2, ctx // 2, ctx):
            assert out_of_profile(prof["text"]["ids"], (b, T)) is None
    assert "axis 0 is 9" in out_of_profile(prof["image"]["pixels"], (9, 3, S, S))
    assert "axis 0 is 0" in out_of_profile(prof["text"]["pool"], (0,))
    assert "axis 1 is 78" in out_of_profile(prof["text"]["ids"], (2, ctx + 1))
    assert "dims" in out_of_profile(prof["image"]["pixels"], (2, 3, S))


@pytest.fixture(scope="module")
def tiny_vq():
    from mmfast.vqgan import VQGAN, VQConfig
    torch.manual_seed(0)
    cfg = VQConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                   z_channels=16, embed_dim=8, n_embed=97)
    return VQGAN(cfg).eval()


def test_vq_profiles_cover_sides_up_to_the_training_resolution(tmp_path, tiny_vq):
    from mmfast.export.graph import onnx_config
    from mmfast.export.onnx import export_vq
    paths = export_vq(tiny_vq, tmp_path)
    for p in paths.values():
        check_onnx(p)
    assert onnx_config(paths["decoder"])["resolution"] == 32
    prof = vq_profiles(paths, 32, tiny_vq.cfg.factor, max_batch=3)
    assert prof == {"encoder": {"pixels": ((1, 3, 4, 4), (3, 3, 32, 32), (3, 3, 32, 32))},
                    "decoder": {"tokens": ((1, 1, 1), (3, 8, 8), (3, 8, 8))}}
    for b, h, w in [(1, 1, 1), (3, 8, 8), (2, 3, 7)]:
        assert out_of_profile(prof["decoder"]["tokens"], (b, h, w)) is None
        assert out_of_profile(prof["encoder"]["pixels"], (b, 3, 4 * h, 4 * w)) is None
    assert "axis 1 is 9" in out_of_profile(prof["decoder"]["tokens"], (1, 9, 8))


def test_profiles_name_what_they_cannot_range(tmp_path):
    p = _graph(tmp_path / "a.onnx", [("x", ["batch", "seq", 4])])
    with pytest.raises(ValueError, match=r"input 'x' axis 1 is symbolic \('seq'\).*dims=\{'seq'"):
        optimization_profiles(p, (1, 2, 4))
    assert optimization_profiles(p, (1, 2, 4), {"seq": (3, 5, 7)}) == {"x": ((1, 3, 4), (2, 5, 4), (4, 7, 4))}
    frozen = _graph(tmp_path / "f.onnx", [("x", [1, 4])])
    with pytest.raises(ValueError, match="froze"):
        optimization_profiles(frozen)
    for bad in [(0, 1, 2), (4, 2, 8), (1, 2), (1.0, 2, 3)]:
        with pytest.raises(ValueError, match="min <= opt <= max"):
            optimization_profiles(p, bad, {"seq": (1, 1, 1)})


# ---- the plan cache key ------------------------------------------------------------------------------
def test_plan_key_changes_with_each_ingredient():
    prof = {"ids": ((1, 1), (8, 77), (32, 77)), "pool": ((1,), (8,), (32,))}
    base = dict(onnx_sha256="a" * 64, tensorrt_version="10.9.0", gpu="sm_90", precision="fp32", profiles=prof)
    key = plan_key(**base)
    assert key == plan_key(**{**base, "profiles": dict(reversed(list(prof.items())))})  # order-free
    changed = {"onnx_sha256": "b" * 64, "tensorrt_version": "11.0.0", "gpu": "sm_89", "precision": "fp16",
               "profiles": {**prof, "ids": ((1, 1), (8, 77), (64, 77))}}
    keys = {plan_key(**{**base, k: v}) for k, v in changed.items()}
    assert len(keys) == len(changed) and key not in keys


def test_onnx_digest_follows_weights_including_external_data(tmp_path, tiny_clip, clip_onnx):
    assert onnx_digest(clip_onnx["image"]) == onnx_digest(clip_onnx["image"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [64], np.arange(64, dtype=np.float32).tobytes(), raw=True)
    p = _graph(tmp_path / "ext.onnx", [("x", ["batch", 4])], weight=w)
    m = onnx.load(str(p))
    onnx.save_model(m, str(p), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    before = onnx_digest(p)
    data = bytearray((tmp_path / "ext.onnx.data").read_bytes())
    data[0] ^= 1
    (tmp_path / "ext.onnx.data").write_bytes(bytes(data))
    assert onnx_digest(p) != before  # the graph file is unchanged: the weights alone changed the key


# ---- clear errors ------------------------------------------------------------------------------------
def test_bad_precision_and_fp16_graph_errors(tmp_path, clip_onnx):
    with pytest.raises(ValueError, match="precision must be one of"):
        build_plan(clip_onnx["image"], tmp_path / "x.plan", {}, precision="int8")
    half = helper.make_tensor("w", TensorProto.FLOAT16, [2], np.ones(2, np.float16).view(np.uint16))
    p = _graph(tmp_path / "h.onnx", [("x", ["batch", 2])], dtype=TensorProto.FLOAT16, weight=half)
    with pytest.raises(ValueError, match="fp16 weights; precision='fp32'"):
        build_plan(p, tmp_path / "h.plan", {"x": ((1, 2), (1, 2), (1, 2))}, precision="fp32")
    with pytest.raises(ValueError, match="mismatched: \\['nope', 'pixels'\\]"):
        build_plan(clip_onnx["image"], tmp_path / "x.plan", {"nope": ((1,), (1,), (1,))})


@no_trt
def test_missing_tensorrt_names_the_extra(tmp_path, tiny_clip, clip_onnx, tiny_vq):
    from mmfast.backends.tensorrt import TrtClip, TrtEngine, TrtVQ
    from mmfast.export.tensorrt import cached_engine, export_clip, export_vq
    prof = clip_profiles(clip_onnx, tiny_clip.cfg, max_batch=4)
    calls = [import_tensorrt, lambda: build_plan(clip_onnx["image"], tmp_path / "i.plan", prof["image"]),
             lambda: cached_engine(clip_onnx["image"], tmp_path, prof["image"]),
             lambda: export_clip(tiny_clip, tmp_path), lambda: TrtEngine(None), lambda: TrtClip(tiny_clip),
             lambda: export_vq(tiny_vq, tmp_path), lambda: TrtVQ(tiny_vq)]
    for call in calls:
        with pytest.raises(ImportError, match=r"pip install 'mmfast\[tensorrt\]'"):
            call()
    assert not list(tmp_path.glob("*.plan"))


# ---- with TensorRT (skipped here) ------------------------------------------------------------------
@needs_trt
@pytest.mark.parametrize("batch", [1, 5])
def test_trt_clip_matches_torch(tmp_path, tiny_clip, batch):
    from mmfast.backends.tensorrt import TrtClip
    from mmfast.clip.tokenizer import ClipTokenizer
    model = tiny_clip.cuda()
    trt_clip = TrtClip(model, cache_dir=tmp_path, max_batch=8)
    px = torch.randn(batch, 3, 32, 32, device="cuda")
    ids = ClipTokenizer.default()(["a cat", "a photo of a dog on the moon", "", "x y z", "tea"][:batch]).cuda()
    with torch.no_grad():
        torch.testing.assert_close(trt_clip.encode_image(px), model.encode_image(px), atol=1e-4, rtol=0)
        torch.testing.assert_close(trt_clip.encode_text(ids), model.encode_text(ids), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="axis 0 is 9"):
        trt_clip.engines["image"](pixels=torch.randn(9, 3, 32, 32, device="cuda"))


@needs_trt
@pytest.mark.parametrize("batch", [1, 5])
def test_trt_vq_matches_torch(tmp_path, tiny_vq, batch):
    from mmfast.backends.tensorrt import TrtVQ
    model = tiny_vq.cuda()
    trt_vq = TrtVQ(model, cache_dir=tmp_path, max_batch=4)
    px = torch.rand(batch, 3, 32, 24, device="cuda") * 2 - 1
    tokens = torch.randint(0, 97, (batch, 8, 6), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(trt_vq.encode_latents(px), model.encode_latents(px), atol=1e-4, rtol=0)
        # [0, 1] pixels within 1e-3: the model range is [-1, 1]
        torch.testing.assert_close(trt_vq.decode(tokens), model.decode(tokens), atol=2e-3, rtol=0)


@needs_trt
def test_damaged_cached_plan_is_rebuilt_with_a_warning(tmp_path, tiny_clip, clip_onnx):
    from mmfast.export.tensorrt import cached_engine
    prof = clip_profiles(clip_onnx, tiny_clip.cfg, max_batch=2)["image"]
    _, plan = cached_engine(clip_onnx["image"], tmp_path, prof)
    assert cached_engine(clip_onnx["image"], tmp_path, prof)[1] == plan  # a cache hit: same file
    plan.write_bytes(b"not a plan from this GPU")
    with pytest.warns(UserWarning, match="does not deserialize.*rebuilding"):
        engine, again = cached_engine(clip_onnx["image"], tmp_path, prof)
    assert again == plan and engine is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_engine(clip_onnx["image"], tmp_path, prof)
