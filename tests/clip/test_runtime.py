"""CLIP: checkpoints in their owners' formats load into mmfast and match the owners' outputs."""
import json
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mmfast
from mmfast.clip.runtime import Clip
from mmfast.clip.load import load_clip_checkpoint

open_clip = pytest.importorskip("open_clip")
from open_clip.push_to_hf_hub import save_config_for_hf  # noqa: E402

TEXTS = ["a photo of a cat.", "", "кошка на диване 🐱", "A diagram, of <b>the</b> transformer!!",
         "word " * 120]


def _save_open_clip_dir(model, arch, d, fmt="safetensors"):
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(model.state_dict(), d / "open_clip_model.safetensors")
    else:
        torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    save_config_for_hf(model, d / "open_clip_config.json",
                                                 open_clip.get_model_config(arch))
    return d


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    d = _save_open_clip_dir(ref, "ViT-B-32", tmp_path_factory.mktemp("oc") / "vit-b-32")
    return ref, d


@pytest.fixture(scope="module")
def vit_b32_fp32(vit_b32):
    return mmfast.load_clip(vit_b32[1], dtype="fp32")


def _pixels(n, size=224, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_open_clip_vit_b32_matches_fp32(vit_b32, vit_b32_fp32):
    ref, _ = vit_b32
    x = _pixels(3)
    ids = open_clip.tokenize(TEXTS)
    with torch.inference_mode():
        want_i, want_t = ref.encode_image(x), ref.encode_text(ids)
    got_i = vit_b32_fp32.encode_images(x, normalize=False)
    got_t = vit_b32_fp32.encode_texts(TEXTS, normalize=False)
    torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(vit_b32_fp32.encode_texts(TEXTS), F.normalize(want_t, dim=-1), atol=1e-5, rtol=0)


def test_open_clip_bin_and_bare_state_dict(vit_b32, tmp_path):
    ref, _ = vit_b32
    d = _save_open_clip_dir(ref, "ViT-B-32", tmp_path / "bin", fmt="bin")
    cfg, sd = load_clip_checkpoint(d)
    assert cfg.act == "gelu" and cfg.vision.patch_size == 32 and cfg.text.layers == 12
    bare = tmp_path / "bare.safetensors"
    save_file(ref.state_dict(), bare)
    with pytest.raises(ValueError, match="name="):
        load_clip_checkpoint(bare)
    cfg2, sd2 = load_clip_checkpoint(bare, name="ViT-B-32")
    assert cfg2 == cfg and sd2.keys() == sd.keys()


@pytest.mark.parametrize("dtype", ["int8", "auto", "bf16"])
def test_fast_modes_keep_cosine(vit_b32, dtype):
    ref, d = vit_b32
    clip = mmfast.load_clip(d, dtype=dtype)
    x = _pixels(2, seed=1)
    with torch.inference_mode():
        want_i, want_t = ref.encode_image(x), ref.encode_text(open_clip.tokenize(TEXTS))
    assert F.cosine_similarity(clip.encode_images(x), want_i).min() >= 0.999
    assert F.cosine_similarity(clip.encode_texts(TEXTS), want_t).min() >= 0.999


def _tiny_open_clip(quick_gelu=True):
    return open_clip.model.CLIP(
        embed_dim=32, quick_gelu=quick_gelu,
        vision_cfg=dict(image_size=64, patch_size=16, width=64, layers=2),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)).eval()


def test_openai_torchscript_archive(tmp_path):
    torch.manual_seed(1)
    ref = _tiny_open_clip(quick_gelu=True)
    x, ids = _pixels(2, 64), open_clip.tokenize(TEXTS[:2])
    traced = torch.jit.trace(ref, (x, ids), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    clip = mmfast.load_clip(path, dtype="fp32")
    assert clip.config.act == "quick_gelu"
    with torch.inference_mode():
        torch.testing.assert_close(clip.encode_images(x, normalize=False), ref.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(clip.encode_texts(TEXTS[:2], normalize=False), ref.encode_text(ids), atol=1e-5, rtol=0)


def _tiny_hf(tmp_path, eos_token_id=49407):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=eos_token_id, pad_token_id=49407),
        vision_config=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                           image_size=64, patch_size=16),
        projection_dim=24)
    torch.manual_seed(2)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("eos", [49407, 2])
def test_hugging_face_clip_model(tmp_path, eos):
    ref = _tiny_hf(tmp_path, eos)
    clip = mmfast.load_clip(tmp_path, dtype="fp32")
    assert clip.config.text.pool == ("argmax" if eos == 2 else "eos")
    x = _pixels(3, 64)
    ids = clip.tokenizer(TEXTS)
    with torch.inference_mode():
        want_i = ref.get_image_features(pixel_values=x)
        want_t = ref.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
    want_i = getattr(want_i, "pooler_output", want_i)
    want_t = getattr(want_t, "pooler_output", want_t)
    torch.testing.assert_close(clip.encode_images(x, normalize=False), want_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip.encode_texts(TEXTS, normalize=False), want_t, atol=1e-5, rtol=0)


def test_classify_prompt_ensemble(vit_b32_fp32):
    clip = vit_b32_fp32
    labels, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a sketch of a {}."]
    x = _pixels(2, seed=3)
    probs = clip.classify(x, labels, templates=templates)
    img = clip.encode_images(x)
    cls = F.normalize(torch.stack([F.normalize(clip.encode_texts([t.format(lab) for t in templates]), dim=-1)
                                   .mean(0) for lab in labels]), dim=-1)
    want = (clip.logit_scale * img @ cls.T).softmax(-1)
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    sim = clip.similarity(img, ["a photo of a cat."])
    torch.testing.assert_close(sim, img @ clip.encode_texts(["a photo of a cat."]).T, atol=1e-5, rtol=0)


def test_concurrent_calls_agree(vit_b32_fp32):
    clip = vit_b32_fp32
    want = clip.encode_texts(TEXTS)
    results, errors = [], []

    def work():
        try:
            results.append(clip.encode_texts(TEXTS))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for r in results:
        torch.testing.assert_close(r, want, atol=1e-6, rtol=0)


# ---- bad input ------------------------------------------------------------------------------------
def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mmfast.load_clip(tmp_path / "nope")
    with pytest.raises(ValueError, match="open_clip_config.json"):
        mmfast.load_clip(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError):
        mmfast.load_clip(bad, name="ViT-B-32")
    with pytest.raises(ValueError, match="valid presets"):
        load_clip_checkpoint(bad, name="ViT-Z-99")


def test_shape_mismatch_names_key(tmp_path):
    ref = _tiny_open_clip()
    sd = ref.state_dict()
    sd["transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(100, 64)
    d = tmp_path / "m"
    d.mkdir()
    save_file(sd, d / "open_clip_model.safetensors")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {}}))
    with pytest.raises(ValueError, match=r"transformer.resblocks.1.mlp.c_fc.weight.*\(100, 64\).*\(256, 64\)"):
        mmfast.load_clip(d)


def test_bad_task_inputs(vit_b32_fp32, tmp_path):
    clip = vit_b32_fp32
    with pytest.raises(ValueError, match="labels is empty"):
        clip.classify(_pixels(1), [])
    with pytest.raises(TypeError, match="labels"):
        clip.classify(_pixels(1), "cat")
    with pytest.raises(TypeError, match="texts"):
        clip.encode_texts(["ok", 3])
    with pytest.raises(ValueError, match="templates"):
        clip.classify(_pixels(1), ["cat"], templates=["no placeholder"])
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ValueError, match="missing.jpg"):
        clip.encode_images([str(missing)])
    with pytest.raises(ValueError, match="dtype"):
        Clip(clip.model, dtype="int4")
    assert clip.encode_texts(["still works"]).shape == (1, 512)


def test_cli(vit_b32, tmp_path, capsys):
    from PIL import Image

    from mmfast.cli import main
    _, d = vit_b32
    img = tmp_path / "x.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(img)
    main(["classify", str(d), str(img), "--labels", "cat,dog", "--dtype", "fp32", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["image"] == str(img) and len(rows[0]["top"]) == 2
    out = tmp_path / "t.safetensors"
    main(["embed", str(d), "--texts", "a cat", "кошка", "-o", str(out), "--dtype", "fp32"])
    from safetensors.torch import load_file
    assert load_file(out)["embeddings"].shape == (2, 512)
    main(["info"])
    assert "cpu_kernels" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="labels"):
        main(["classify", str(d), str(img), "--labels", " , "])


def test_bare_state_dict_of_another_architecture(tmp_path):
    bare = tmp_path / "tiny.safetensors"
    save_file(_tiny_open_clip().state_dict(), bare)
    with pytest.raises(ValueError, match=r"positional_embedding has shape \(77, 64\) but the architecture needs \(77, 512\)"):
        mmfast.load_clip(bare, name="ViT-B-32")


def test_onnxruntime_backend_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(2)  # its own weights and pixels, whatever ran before (int8's cosine depends on them)
    ref = _tiny_open_clip(quick_gelu=False)
    d = tmp_path / "tiny"
    d.mkdir()
    save_file(ref.state_dict(), d / "open_clip_model.safetensors")
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {}}))
    torch_clip = mmfast.load_clip(d, dtype="fp32")
    ort_clip = mmfast.load_clip(d, backend="onnxruntime", dtype="fp32")
    x = _pixels(3, 64)
    torch.testing.assert_close(ort_clip.encode_images(x), torch_clip.encode_images(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(ort_clip.encode_texts(TEXTS), torch_clip.encode_texts(TEXTS), atol=1e-5, rtol=0)
    ort_int8 = mmfast.load_clip(d, backend="onnxruntime", dtype="int8")
    assert F.cosine_similarity(ort_int8.encode_images(x), torch_clip.encode_images(x)).min() >= 0.999
    assert F.cosine_similarity(ort_int8.encode_texts(TEXTS), torch_clip.encode_texts(TEXTS)).min() >= 0.999
    with pytest.raises(ValueError, match="backend"):
        mmfast.load_clip(d, backend="tensorrt")


@pytest.mark.parametrize("vnni,bf16", [(False, True), (True, True), (False, False)])
def test_auto_mode_on_other_cpus(monkeypatch, vnni, bf16):
    """auto must pick a working mode whatever the CPU offers (probe casts inputs per candidate)."""
    import mmfast.clip.runtime as mclip
    from mmfast.clip.load import _rename_in_proj
    from mmfast.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig
    monkeypatch.setattr(mclip, "has_vnni", lambda: vnni)
    monkeypatch.setattr(mclip, "has_fast_bf16", lambda: bf16)
    ref = _tiny_open_clip(quick_gelu=False)
    cfg = ClipConfig(embed_dim=32, vision=ClipVisionConfig(64, 16, 64, 2, 1, 256),
                     text=ClipTextConfig(width=64, heads=1, layers=2, mlp_dim=256))
    model = mclip.CLIP(cfg)
    model.load_state_dict(_rename_in_proj({k: v for k, v in ref.state_dict().items() if k != "attn_mask"}))
    clip = Clip(model, dtype="auto")
    expected = (["int8"] if vnni else []) + (["bf16"] if bf16 else []) + ["fp32"]
    assert clip.dtype in expected
    x = _pixels(2, 64)
    with torch.inference_mode():
        want = ref.encode_image(x)
    assert F.cosine_similarity(clip.encode_images(x), want).min() >= 0.999
