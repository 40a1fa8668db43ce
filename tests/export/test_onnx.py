"""ONNX export + ONNX Runtime backend: parity per part at batch 1 and 5, graph checks, the runtimes'
backend="onnxruntime" / "auto", the cached optimized graph, bad input, CLI.
(DALL·E's encoder, step and generation: tests/dalle/test_onnx_backend.py)"""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from mmfast.backends.onnxruntime import OrtSession  # noqa: E402
from mmfast.clip.runtime import Clip  # noqa: E402
from mmfast.export.onnx import export, export_clip, export_vq  # noqa: E402
from mmfast.export.onnx_common import check_graph, check_parity, ort_session  # noqa: E402
from mmfast.vqgan import VQ, VQGAN, VQConfig  # noqa: E402
from mmfast.vqgan.runtime import psnr  # noqa: E402

TINY_VQ = VQConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                   z_channels=16, embed_dim=8, n_embed=97)


@pytest.fixture(autouse=True)
def _small(monkeypatch, tmp_path_factory):
    # tiny models: one thread each for torch and ORT; exports and probes cached in a test folder
    monkeypatch.setenv("MMFAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mmfast-cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _vq_model(cfg=TINY_VQ):
    torch.manual_seed(0)
    m = VQGAN(cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def vq_onnx(tmp_path_factory):
    torch.set_num_threads(1)
    return export_vq(VQ(_vq_model(), device="cpu", dtype="fp32"), tmp_path_factory.mktemp("vq_onnx"))


def _ids(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49000, (B, 12), generator=g)
    pool = torch.randint(3, 12, (B,), generator=g)
    ids[torch.arange(B), pool] = 49407                                       # EOT: the argmax pools there
    T = int(pool.max()) + 1
    return ids[:, :T], pool


@pytest.mark.parametrize("B", [1, 5])
def test_clip_towers_match_torch(tiny_clip, clip_onnx, B):
    px = torch.randn(B, 3, 32, 32)
    ids, pool = _ids(B)
    with torch.no_grad():
        want_i, want_t = tiny_clip.encode_image(px), tiny_clip.encode_text(ids)
    got_i = ort_session(clip_onnx["image"]).run(None, {"pixels": px.numpy()})[0]
    got_t = ort_session(clip_onnx["text"]).run(None, {"ids": ids.numpy(), "pool": pool.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got_i), want_i, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got_t), want_t, atol=1e-4, rtol=0)


@pytest.mark.parametrize("B", [1, 5])
def test_vq_parts_match_torch(vq_onnx, B):
    ref = VQ(_vq_model(), device="cpu", dtype="fp32")
    ids = torch.randint(0, 97, (B, 3, 5))
    got = torch.from_numpy(ort_session(vq_onnx["decoder"]).run(None, {"tokens": ids.numpy()})[0])
    want = ref.decode_pixels(ids)                                            # [0, 1]
    torch.testing.assert_close(((got.clamp(-1, 1) + 1) / 2), want, atol=1e-3, rtol=0)
    px = torch.rand(B, 3, 12, 20) * 2 - 1                                  # model range, non-square
    lat = torch.from_numpy(ort_session(vq_onnx["encoder"]).run(None, {"pixels": px.numpy()})[0])
    with torch.no_grad():
        want_lat = ref.model.encode_latents(px.contiguous(memory_format=torch.channels_last)).float()
    torch.testing.assert_close(lat, want_lat, atol=1e-4, rtol=1e-4)
    # tokens via the codebook op: the chosen code's distance is the minimum (ties may flip ids)
    z = lat.permute(0, 2, 3, 1).reshape(-1, 8)
    e = ref.model.quantize.embedding.weight
    ids = ref.model.quantize.codes(lat).reshape(-1)
    d = torch.cdist(z, e) ** 2
    torch.testing.assert_close(d.gather(1, ids[:, None])[:, 0], d.min(1).values, atol=1e-4, rtol=1e-5)


def test_every_graph_checks_and_keeps_symbolic_axes(clip_onnx, vq_onnx, tmp_path):
    fp16 = export_vq(_vq_model(), tmp_path, parts=("decoder",), fp16=True)      # parity-checked on export
    fp16.update(export_clip(Clip(_tiny_clip_copy(), device="cpu", dtype="fp32"), tmp_path, parts=("text",), fp16=True))
    for path in [*clip_onnx.values(), *vq_onnx.values(), *fp16.values()]:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["mmfast.opset"] == "17" and meta["mmfast.dtype"] == ("fp16" if "fp16" in path.name else "fp32")
        for i in model.graph.input:
            assert i.type.tensor_type.shape.dim[0].dim_param, (path.name, i.name)   # batch: symbolic
    graph = onnx.load(str(vq_onnx["decoder"])).graph
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["tokens"] == ["batch", "grid_h", "grid_w"]


def _tiny_clip_copy():
    from tests.export.conftest import CFG
    from mmfast.clip.model import CLIP
    torch.manual_seed(3)
    m = CLIP(CFG).eval()
    for name, p in m.named_parameters():
        if name != "logit_scale":
            p.data.normal_(0, 0.2)
    return m


def test_frozen_axis_and_parity_failures_raise(tmp_path):
    lin = torch.nn.Linear(4, 3)
    path = tmp_path / "frozen.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                      # the exporter's deprecation notes
        torch.onnx.export(lin, (torch.randn(2, 4),), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    with pytest.raises(RuntimeError, match="axis 0 .*frozen to 2"):
        check_graph(path, {"x": {0: "batch"}})
    with pytest.raises(RuntimeError, match="worst difference"):
        check_parity(path, {"x": np.ones((2, 4), np.float32)}, {"y": np.zeros((2, 3), np.float32) + 99}, 1e-4, "test")


def test_bad_input(tmp_path, tiny_clip):
    with pytest.raises(ValueError, match="unknown part.*valid parts: encoder, decoder"):
        export_vq(_vq_model(), tmp_path, parts=("encoder", "quantizer"))
    with pytest.raises(ValueError, match="no encoder"):
        export_vq(_vq_model(TINY_VQ.replace(has_encoder=False)), tmp_path, parts=("encoder",))
    with pytest.raises(ValueError, match="unknown part"):
        export_clip(tiny_clip, tmp_path, parts=("audio",))
    with pytest.raises(ValueError, match="fp32 weights are gone"):
        export_vq(VQ(_vq_model(), device="cpu", dtype="bf16"), tmp_path)
    with pytest.raises(ValueError, match="unknown family"):
        export(tiny_clip, tmp_path, family="gpt")
    with pytest.raises(TypeError, match="expected a checkpoint path"):
        export_clip(42, tmp_path)
    # dtypes ONNX Runtime cannot run here: named, with the way out
    with pytest.raises(ValueError, match="bf16 has no ONNX Runtime CPU kernels"):
        VQ(_vq_model(), device="cpu", dtype="bf16", backend="onnxruntime")
    with pytest.raises(ValueError, match="runs CLIP on CPU in fp32 or int8"):
        Clip(tiny_clip, device="cpu", dtype="bf16", backend="onnxruntime")
    with pytest.raises(ValueError, match="backend='tensorrt' runs the VQGAN on an NVIDIA GPU"):
        VQ(_vq_model(), device="cpu", backend="tensorrt")


def test_optimized_graph_cache_hit_stale_foreign_corrupt(vq_onnx, tmp_path):
    import shutil
    src = tmp_path / "vq_decoder.onnx"
    shutil.copy(vq_onnx["decoder"], src)
    ids = torch.randint(0, 97, (2, 3, 4))
    out = torch.empty(2, 3, 12, 16)
    want = OrtSession(src, cache_dir=None).run({"tokens": ids}, {"pixels": torch.empty(2, 3, 12, 16)})["pixels"]
    assert OrtSession(src).cache_status == "built"
    s = OrtSession(src)
    assert s.cache_status == "hit"
    torch.testing.assert_close(s.run({"tokens": ids}, {"pixels": out})["pixels"], want, atol=0, rtol=0)
    meta = tmp_path / "ort_cache" / "vq_decoder.opt.json"
    key = json.loads(meta.read_text())
    meta.write_text(json.dumps({**key, "onnxruntime": "0.0.1"}))                 # foreign: another ORT
    with pytest.warns(UserWarning, match="stale .*another onnxruntime.*rebuilding"):
        assert OrtSession(src).cache_status == "rebuilt"
    assert json.loads(meta.read_text()) == key
    meta.write_text(json.dumps({**key, "source_sha256": "0" * 64}))             # stale: the model changed
    with pytest.warns(UserWarning, match="model changed since.*rebuilding"):
        OrtSession(src)
    (tmp_path / "ort_cache" / "vq_decoder.opt.onnx").write_bytes(b"not a model")  # corrupt, key intact
    with pytest.warns(UserWarning, match="does not load.*rebuilding"):
        s = OrtSession(src)
    torch.testing.assert_close(s.run({"tokens": ids}, {"pixels": out})["pixels"], want, atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert OrtSession(src).cache_status == "hit"


def test_vq_onnxruntime_and_auto_backends():
    ref = VQ(_vq_model(), device="cpu", dtype="fp32")
    ort = VQ(_vq_model(), device="cpu", backend="onnxruntime")
    assert "decoder onnxruntime fp32" in repr(ort)
    ids = torch.randint(0, 97, (5, 3, 4))
    assert psnr(ort.decode_pixels(ids), ref.decode_pixels(ids)) > 60
    px = torch.rand(5, 3, 16, 8)
    assert (ort.encode_pixels(px) == ref.encode_pixels(px)).float().mean() > 0.98   # ties aside
    auto = VQ(_vq_model(), device="cpu", backend="auto")
    for part in ("encoder", "decoder"):
        i = auto.info[part]
        assert i["backend"] in ("torch", "onnxruntime") and "fastest of" in i["why"]
        assert set(i["times_ms"]) == {"torch", "onnxruntime fp32"}
    assert auto.info["decoder"]["fidelity"]["onnxruntime fp32"] >= 40
    assert psnr(auto.decode_pixels(ids), ref.decode_pixels(ids)) >= 40
    again = VQ(_vq_model(), device="cpu", backend="auto")                       # the cached measurement
    assert again.info["decoder"]["why"].startswith("cached measurement")
    assert again.info["decoder"]["backend"] == auto.info["decoder"]["backend"]


def test_clip_auto_backend(tiny_clip):
    ref = Clip(tiny_clip, device="cpu", dtype="fp32")
    auto = Clip(tiny_clip, device="cpu", backend="auto")
    assert auto.backend.startswith("auto: image ") and set(auto.info) == {"image", "text"}
    for i in auto.info.values():
        assert "fastest of" in i["why"] and min(i["fidelity"].values()) <= 1.0
    x = torch.randn(3, 3, 32, 32)
    assert F.cosine_similarity(auto.encode_images(x), ref.encode_images(x)).min() >= 0.999
    texts = ["a cat", "", "a diagram of a transformer"]
    assert F.cosine_similarity(auto.encode_texts(texts), ref.encode_texts(texts)).min() >= 0.999


def test_cli_export_onnx(tmp_path, capsys):
    from mmfast.cli import main
    vq = _vq_model()
    torch.save({"state_dict": vq.state_dict()}, tmp_path / "last.ckpt")
    main(["export", "onnx", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "out"), "--parts", "decoder"])
    assert (tmp_path / "out" / "vq_decoder.onnx").is_file()
    assert "vq_decoder.onnx" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown part"):
        main(["export", "onnx", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "o2"), "--parts", "middle"])


def test_auto_mixes_engines_per_part_from_a_cached_measurement(tiny_clip):
    """A cached measurement is used as is (no probe): here one part on each engine."""
    from mmfast.backends import auto
    from mmfast.backends.onnxruntime import weights_sha256

    cpu = torch.device("cpu")
    m = _vq_model()
    choice = {"encoder": {"choice": "torch", "why": "test"}, "decoder": {"choice": "onnxruntime fp32", "why": "test"}}
    auto._store(auto._key("vq", weights_sha256(m), "fp32", cpu), choice)
    vq, ref = VQ(m, device="cpu", dtype="fp32", backend="auto"), VQ(_vq_model(), device="cpu", dtype="fp32")
    assert vq.info["decoder"]["backend"] == "onnxruntime" and vq.info["encoder"]["backend"] == "torch"
    assert vq.info["decoder"]["why"] == "cached measurement: test"
    px, ids = torch.rand(2, 3, 16, 16), torch.randint(0, 97, (2, 4, 4))
    assert torch.equal(vq.encode_pixels(px), ref.encode_pixels(px))                 # torch encoder: exact
    assert psnr(vq.decode_pixels(ids), ref.decode_pixels(ids)) > 60
    choice = {p: {"choice": c, "why": "test", "torch_dtype": "fp32"} for p, c in
              (("image", "onnxruntime int8"), ("text", "torch"))}
    auto._store(auto._key("clip", weights_sha256(tiny_clip), "fp32", cpu), choice)
    clip, ref = Clip(tiny_clip, device="cpu", dtype="fp32", backend="auto"), Clip(tiny_clip, device="cpu", dtype="fp32")
    assert clip.backend == "auto: image onnxruntime int8, text torch fp32"
    texts = ["a cat", "a dog"]
    torch.testing.assert_close(clip.encode_texts(texts), ref.encode_texts(texts), atol=0, rtol=0)
    x = torch.randn(2, 3, 32, 32)
    assert F.cosine_similarity(clip.encode_images(x), ref.encode_images(x)).min() > 0.99
