"""NVIDIA Triton Inference Server repository: every config.pbtxt parses with Triton's own model-config
protobuf and names tensors that exist (in its ONNX graph, or in the models an ensemble chains); the
Python-backend models run under a stub of `triton_python_backend_utils` and give mmfast's results."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from mmfast.clip.runtime import load_clip
from mmfast.export.graph import signature, weight_dtypes
from mmfast.export.triton_server import export_triton_repo, to_pbtxt

TEXTS = ["a photo of a cat", "кошка на диване 🐱", "", "A diagram, of <b>the</b> transformer!!"]
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def _model_config_pb2():
    """tritonclient's generated model_config_pb2, loaded alone: `tritonclient.grpc`'s __init__ wants
    grpcio, the protobuf module only protobuf."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (pip install tritonclient): Triton's model-config protobuf")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pb2():
    return _model_config_pb2()


def parse_configs(repo: Path, pb2) -> dict:
    from google.protobuf import text_format
    configs = {}
    for f in sorted(repo.glob("*/config.pbtxt")):
        cfg = text_format.Parse(f.read_text(), pb2.ModelConfig())
        assert cfg.name == f.parent.name
        configs[cfg.name] = cfg
    return configs


@pytest.fixture(scope="module")
def clip_repo(tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "clip"
    models = export_triton_repo(tiny_clip_dir, out, backends=("onnxruntime", "tensorrt"), max_batch_size=8,
                                queue_delay_us=250, instances=2)
    return out, models


# ---- the stub of Triton's Python backend ---------------------------------------------------------------
class Request:
    def __init__(self, **tensors):
        self.tensors = {k: FakeTensor(k, np.asarray(v)) for k, v in tensors.items()}


class FakeTensor:
    def __init__(self, name, array):
        assert isinstance(array, np.ndarray), f"pb_utils.Tensor({name!r}) needs a numpy array"
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class FakeError:
    def __init__(self, message):
        self.msg = message

    def message(self):
        return self.msg


@pytest.fixture
def pb_utils(monkeypatch):
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse, m.TritonError = FakeTensor, FakeResponse, FakeError
    m.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", m)
    return m


def load_python_model(model_dir: Path, kind: str = "CPU"):
    spec = importlib.util.spec_from_file_location(f"_triton_{model_dir.name}", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"name": model_dir.name}), "model_name": model_dir.name,
                      "model_repository": str(model_dir), "model_version": "1", "model_instance_kind": kind,
                      "model_instance_device_id": "0", "model_instance_name": model_dir.name + "_0"})
    return model


def _strings(*texts):
    return np.array([[t.encode("utf-8")] for t in texts], dtype=object)  # [b, 1] BYTES, as Triton sends


# ---- configs ------------------------------------------------------------------------------------------
def test_configs_parse_with_tritons_protobuf(clip_repo, pb2):
    repo, models = clip_repo
    cfgs = parse_configs(repo, pb2)
    assert set(cfgs) == set(models) == {"clip_image", "clip_text", "clip_image_trt", "clip_text_trt", "clip_tokenize",
                                        "clip_preprocess", "clip_text_embed", "clip_image_embed"}
    kinds = {"onnxruntime_onnx": "KIND_GPU", "tensorrt_plan": "KIND_GPU", "": "KIND_CPU"}
    for name, cfg in cfgs.items():
        assert cfg.max_batch_size == 8
        assert (repo / name / "1").is_dir()
        if cfg.platform == "ensemble":
            assert len(cfg.ensemble_scheduling.step) == 2
            continue
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
        assert [(g.count, pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == [
            (2, kinds[cfg.platform])]
        if cfg.platform == "":
            assert cfg.backend == "python" and (repo / name / "1" / "model.py").is_file()
    assert cfgs["clip_text_trt"].platform == "tensorrt_plan"
    # no TensorRT here: the repo carries the ONNX and the trtexec lines that build the plans on the server
    script = (repo / "build_trt_plans.sh").read_text()
    assert "--onnx=clip_text_trt/1/model.onnx --saveEngine=clip_text_trt/1/model.plan" in script
    assert "--minShapes=ids:1x1,pool:1 --optShapes=ids:8x77,pool:8 --maxShapes=ids:8x77,pool:8" in script
    assert "--maxShapes=pixels:8x3x32x32" in script and "--stronglyTyped" not in script
    assert script.count("--noTF32") == 2  # fp32 plans are fp32, as build_plan's


def assert_towers_match_graphs(repo: Path, pb2) -> dict:
    """Every ONNX Runtime / TensorRT model names its graph's inputs and outputs, types and dims."""
    towers = {n: c for n, c in parse_configs(repo, pb2).items()
              if c.platform in ("onnxruntime_onnx", "tensorrt_plan")}
    for name, cfg in towers.items():
        sig = signature(repo / name / "1" / "model.onnx")
        assert onnx.load(str(repo / name / "1" / "model.onnx")).graph.node  # the whole graph, weights inline
        for mine, theirs in ((cfg.input, sig.inputs), (cfg.output, sig.outputs)):
            assert [t.name for t in mine] == [t.name for t in theirs]
            for c, t in zip(mine, theirs):
                assert pb2.DataType.Name(c.data_type) == _TYPES[t.dtype]
                want = [d if isinstance(d, int) else -1 for d in t.dims[1:]]  # axis 0 is Triton's batch
                if want:
                    assert list(c.dims) == want and not c.HasField("reshape")
                else:  # a batch-only tensor ([B]): dims [1] reshaped to [] in the graph
                    assert list(c.dims) == [1] and c.HasField("reshape") and list(c.reshape.shape) == []
    return towers


def test_tower_configs_name_their_graphs_tensors(clip_repo, pb2):
    assert len(assert_towers_match_graphs(clip_repo[0], pb2)) == 4


def test_vq_towers_and_fp16_plans(tmp_path, pb2):
    from mmfast.vqgan import VQ, VQGAN, VQConfig
    cfg = VQConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=16,
                   embed_dim=8, n_embed=97)
    torch.manual_seed(0)
    out = tmp_path / "vq"
    models = export_triton_repo(VQ(VQGAN(cfg).eval(), device="cpu", dtype="fp32"), out, fp16=True,
                                backends=("tensorrt", "onnxruntime"), max_batch_size=2)
    assert sorted(models) == ["vq_decoder", "vq_decoder_trt", "vq_encoder", "vq_encoder_trt"]
    towers = assert_towers_match_graphs(out, pb2)
    assert [list(t.dims) for t in towers["vq_decoder_trt"].input] == [[-1, -1]]  # tokens [h, w], any grid
    assert "float16" in weight_dtypes(out / "vq_decoder" / "1" / "model.onnx")
    script = (out / "build_trt_plans.sh").read_text()
    # f4 at 32 px: image sides 4..32, token grids 1..8; fp16 weights build as a strongly typed network
    assert "--minShapes=pixels:1x3x4x4 --optShapes=pixels:2x3x32x32 --maxShapes=pixels:2x3x32x32" in script
    assert "--minShapes=tokens:1x1x1 --optShapes=tokens:2x8x8 --maxShapes=tokens:2x8x8" in script
    assert script.count("--stronglyTyped") == 2
    # the script runs as written (trtexec replaced by echo: a shell check, not a TensorRT one)
    run = subprocess.run(["sh", str(out / "build_trt_plans.sh")], env={**os.environ, "TRTEXEC": "echo"},
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert run.stdout.splitlines()[1].startswith("--onnx=vq_decoder_trt/1/model.onnx")


def test_ensembles_chain_existing_inputs_and_outputs(clip_repo, pb2):
    repo, _ = clip_repo
    cfgs = parse_configs(repo, pb2)
    for name in ("clip_text_embed", "clip_image_embed"):
        cfg = cfgs[name]
        available = {t.name for t in cfg.input}
        consumed = set()
        for step in cfg.ensemble_scheduling.step:
            model = cfgs[step.model_name]
            assert step.model_name.endswith(("_tokenize", "_preprocess")) or model.platform == "onnxruntime_onnx"
            assert set(step.input_map) == {t.name for t in model.input}
            assert set(step.output_map) <= {t.name for t in model.output}
            assert set(step.input_map.values()) <= available, f"{name}: {step.model_name} reads a missing tensor"
            consumed |= set(step.input_map.values())
            available |= set(step.output_map.values())
        assert {t.name for t in cfg.output} <= available and {t.name for t in cfg.input} <= consumed
        # each tensor's type and shape agree on both sides of every link
        produced = {t.name: t for t in cfg.input}
        for step in cfg.ensemble_scheduling.step:
            model = cfgs[step.model_name]
            for t in model.input:
                src = produced[step.input_map[t.name]]
                assert src.data_type == t.data_type and len(src.dims) == len(t.dims), (name, t.name)
                assert all(a == b or -1 in (a, b) for a, b in zip(src.dims, t.dims)), (name, t.name)
            produced.update({step.output_map[t.name]: t for t in model.output if t.name in step.output_map})


def test_pbtxt_writer_escapes_and_nests(pb2):
    from google.protobuf import text_format

    from mmfast.export.triton_server import Enum
    text = to_pbtxt({"name": 'a "q" \\ b', "max_batch_size": 4, "parameters": [
        {"key": "k", "value": {"string_value": "línea\n2"}}], "input": [
        {"name": "x", "data_type": Enum("TYPE_FP32"), "dims": [1], "reshape": {"shape": []}, "optional": True}]})
    cfg = text_format.Parse(text, pb2.ModelConfig())
    assert cfg.name == 'a "q" \\ b' and cfg.parameters["k"].string_value == "línea\n2"
    assert cfg.input[0].optional and list(cfg.input[0].reshape.shape) == []


# ---- the Python-backend models and the ensembles, run -----------------------------------------------------
def test_tokenize_model_gives_mmfasts_ids_and_pool(clip_repo, tiny_clip_dir, pb_utils):
    repo, _ = clip_repo
    model = load_python_model(repo / "clip_tokenize")
    clip = load_clip(tiny_clip_dir, dtype="fp32", device="cpu")
    requests = [Request(text=_strings(TEXTS[0])), Request(text=_strings(*TEXTS[1:3])),
                Request(text=np.array([[b"\xff\xfe bad"]], dtype=object)), Request(text=_strings(TEXTS[3]))]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert "not UTF-8" in responses[2].error.message() and not responses[2].outputs
    got = [r for i, r in enumerate(responses) if i != 2]
    ids = np.concatenate([r.outputs["ids"] for r in got])
    pool = np.concatenate([r.outputs["pool"] for r in got])
    want = clip.tokenizer(TEXTS)
    np.testing.assert_array_equal(ids, want.numpy())
    np.testing.assert_array_equal(pool, clip.model.pool_positions(want).numpy()[:, None])
    assert [r.outputs["ids"].shape[0] for r in got] == [1, 2, 1] and all(r.error is None for r in got)
    model.finalize()


def _png(seed, size=(40, 28)):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_model_gives_mmfasts_pixels(clip_repo, tiny_clip_dir, pb_utils):
    repo, _ = clip_repo
    model = load_python_model(repo / "clip_preprocess")
    clip = load_clip(tiny_clip_dir, dtype="fp32", device="cpu")
    images = [_png(0), _png(1, (20, 50)), _png(2)]
    requests = [Request(image=np.array([[images[0]], [images[1]]], dtype=object)),
                Request(image=np.array([[b"not an image"]], dtype=object)),
                Request(image=np.array([[images[2]]], dtype=object))]
    responses = model.execute(requests)
    assert responses[1].error is not None and "could not be decoded" in responses[1].error.message()
    got = np.concatenate([responses[0].outputs["pixels"], responses[2].outputs["pixels"]])
    assert clip.preprocess.resize_mode == "squash"  # the checkpoint's own settings travelled
    np.testing.assert_array_equal(got, clip.preprocess(images).numpy())


def run_ensemble(repo: Path, cfgs: dict, name: str, feeds: dict) -> dict:
    """Triton's ensemble scheduler in a few lines: Python models under the stub, towers on ONNX Runtime."""
    import onnxruntime as ort
    tensors = dict(feeds)
    for step in cfgs[name].ensemble_scheduling.step:
        d = repo / step.model_name
        ins = {k: tensors[v] for k, v in step.input_map.items()}
        if cfgs[step.model_name].backend == "python":
            (r,) = load_python_model(d).execute([Request(**ins)])
            assert r.error is None
            outs = r.outputs
        else:
            for t in cfgs[step.model_name].input:  # Triton's reshape: [b, 1] -> [b]
                if t.HasField("reshape"):
                    ins[t.name] = ins[t.name].reshape(ins[t.name].shape[0], *t.reshape.shape)
            sess = ort.InferenceSession(str(d / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
            outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, ins)))
        tensors.update({v: outs[k] for k, v in step.output_map.items()})
    return {t.name: tensors[t.name] for t in cfgs[name].output}


def test_ensembles_give_mmfasts_embeddings(clip_repo, tiny_clip_dir, pb_utils, pb2):
    repo, _ = clip_repo
    cfgs = parse_configs(repo, pb2)
    clip = load_clip(tiny_clip_dir, dtype="fp32", device="cpu")
    got = run_ensemble(repo, cfgs, "clip_text_embed", {"text": _strings(*TEXTS)})["embeddings"]
    torch.testing.assert_close(torch.from_numpy(got), clip.encode_texts(TEXTS, normalize=False), atol=1e-4, rtol=0)
    images = [_png(3), _png(4, (64, 33))]
    got = run_ensemble(repo, cfgs, "clip_image_embed", {"image": np.array([[b] for b in images], dtype=object)})
    torch.testing.assert_close(torch.from_numpy(got["embeddings"]), clip.encode_images(images, normalize=False),
                               atol=1e-4, rtol=0)


# ---- the target folder, arguments, CLI ----------------------------------------------------------------------
def test_target_must_be_empty_unless_overwrite(tmp_path, tiny_clip):
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        export_triton_repo(tiny_clip, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "clip_text").mkdir()
    (out / "clip_text" / "stale.onnx").write_text("old")
    models = export_triton_repo(tiny_clip, out, overwrite=True, device="cpu")
    assert (out / "keep.txt").read_text() == "mine" and not (out / "clip_text" / "stale.onnx").exists()
    assert "clip_text_trt" not in models and not (out / "build_trt_plans.sh").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".mmfast-")]  # the export's scratch is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="a file"):
        export_triton_repo(tiny_clip, tmp_path / "file")


@pytest.mark.parametrize("kwargs, match", [
    ({"backends": ("onnx",)}, "backends must be"), ({"backends": ()}, "backends must be"),
    ({"family": "resnet"}, "family must be"), ({"device": "tpu"}, "device must be"),
    ({"device": "cpu", "backends": ("tensorrt",)}, "GPUs only"),
    ({"device": "cpu", "fp16": True}, "GPUs only"), ({"max_batch_size": 0}, "max_batch_size"),
    ({"queue_delay_us": -1}, "queue_delay_us"), ({"instances": True}, "instances")])
def test_bad_arguments_are_named(tmp_path, tiny_clip, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_triton_repo(tiny_clip, tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()


def test_cli_writes_the_repo_and_refuses_a_full_folder(tmp_path, tiny_clip_dir, capsys):
    from mmfast.cli import main
    out = tmp_path / "repo"
    main(["export", "triton-repo", str(tiny_clip_dir), "--out", str(out), "--max-batch-size", "4", "--device", "cpu"])
    assert "tritonserver --model-repository" in capsys.readouterr().out
    assert "max_batch_size: 4" in (out / "clip_image" / "config.pbtxt").read_text()
    with pytest.raises(SystemExit, match="mmfast export: error: .* not empty"):
        main(["export", "triton-repo", str(tiny_clip_dir), "--out", str(out)])


# ---- DALL·E: the generator as a Python-backend model ------------------------------------------------------
@pytest.fixture(scope="module")
def dalle_dir(tmp_path_factory):
    """min-dalle's file layout (its parameter names are mmfast's) with random tiny towers."""
    from mmfast.dalle import dalle_preset
    from mmfast.dalle.model import DalleDecoder, DalleEncoder
    cfg = dalle_preset("dalle-tiny")
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models_root") / "dalle_bart_mini"
    d.mkdir()
    torch.save(DalleEncoder(cfg).state_dict(), d / "encoder.pt")
    torch.save(DalleDecoder(cfg).state_dict(), d / "decoder.pt")
    chars = ["\u0120"] + [chr(c) for c in range(33, 127)]  # "Ġ" + printable ASCII
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(chars)}}
    merges = ["\u0120 a", "\u0120 c", "\u0120a t", "r e", "\u0120 t", "\u0120t h"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf8")
    return d


def test_generator_model_runs_mmfasts_loop(dalle_dir, tmp_path, pb_utils, pb2):
    from mmfast import load_generator
    out = tmp_path / "repo"
    models = export_triton_repo(dalle_dir.parent, out, device="cpu", max_batch_size=4)  # family found: dalle
    assert list(models) == ["dalle_generate"]
    cfg = parse_configs(out, pb2)["dalle_generate"]
    assert cfg.backend == "python" and cfg.max_batch_size == 4
    assert [(t.name, t.optional) for t in cfg.input] == [("prompt", False), ("seed", True), ("top_k", True),
                                                         ("top_p", True), ("temperature", True), ("guidance", True)]
    assert [t.name for t in cfg.output] == ["tokens"]  # no VQGAN beside this checkpoint: tokens only
    model = load_python_model(out / "dalle_generate")
    requests = [Request(prompt=_strings("a red cat"), seed=np.array([[3]])),
                Request(prompt=_strings("the hat", "a red cat"), seed=np.array([[5], [7]]),
                        top_k=np.array([[4], [4]]), guidance=np.array([[2.5], [2.5]], np.float32)),
                Request(prompt=_strings("a cat"), seed=np.array([[1], [2]])),  # two seeds, one prompt
                Request(prompt=_strings("a hat"), seed=np.array([[-1]]))]
    responses = model.execute(requests)
    assert "seed has 2 values for 1 prompts" in responses[2].error.message()
    assert "seed must be in [0, 2**63)" in responses[3].error.message()
    gen = load_generator(dalle_dir, device="cpu", dtype="fp32")
    want0 = gen.generate_tokens("a red cat", seed=[3])
    want1 = gen.generate_tokens(["the hat", "a red cat"], seed=[5, 7], top_k=4, guidance=2.5)
    np.testing.assert_array_equal(responses[0].outputs["tokens"], want0.numpy())
    np.testing.assert_array_equal(responses[1].outputs["tokens"], want1.numpy())
    assert responses[1].outputs["tokens"].shape == (2, 256)
    with pytest.raises(TypeError, match="min-dalle's folder"):
        export_triton_repo(gen, tmp_path / "r2")


def test_generator_with_config_json_and_vqgan_folder(tmp_path, pb_utils, pb2):
    """mmfast's own layout (safetensors, config.json naming a VQGAN folder, unicode cleaning): the
    repository holds a self-contained copy, and the Python model returns images too."""
    from mmfast import load_generator
    from mmfast.demo import weights_path
    out = tmp_path / "repo"
    export_triton_repo(weights_path("generator"), out, device="cpu", max_batch_size=2)
    files = out / "dalle_generate" / "1" / "dalle"
    assert json.loads((files / "config.json").read_text(encoding="utf-8"))["vqgan"] == "vqgan"
    assert (files / "vqgan" / "model.safetensors").is_file() and (files / "encoder.safetensors").is_file()
    cfg = parse_configs(out, pb2)["dalle_generate"]
    assert [t.name for t in cfg.output] == ["tokens", "image"]
    model = load_python_model(out / "dalle_generate")
    [response] = model.execute([Request(prompt=_strings("синий квадрат справа"), seed=np.array([[3]]),
                                        top_k=np.array([[8]]))])
    assert response.error is None, response.error.message()
    gen = load_generator(weights_path("generator"), device="cpu", dtype="fp32")
    np.testing.assert_array_equal(response.outputs["tokens"],
                                  gen.generate_tokens("синий квадрат справа", seed=[3], top_k=8).numpy())
    assert response.outputs["image"].shape == (1, 32, 32, 3)
