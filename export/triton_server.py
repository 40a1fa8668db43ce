"""An NVIDIA Triton Inference Server model repository from an mmfast checkpoint: the scale-out path.

    from mmfast.export.triton_server import export_triton_repo
    export_triton_repo("open_clip_dir", "repo/", backends=("onnxruntime", "tensorrt"))
    # then: tritonserver --model-repository repo/        (README.md in the repo says more)

CLIP (family="clip")
    clip_image, clip_text               ONNX Runtime towers (platform onnxruntime_onnx)
    clip_image_trt, clip_text_trt       TensorRT towers (tensorrt_plan), with "tensorrt" in backends
    clip_tokenize, clip_preprocess      Python backend: captions / encoded images -> tower inputs
    clip_text_embed, clip_image_embed   ensembles: raw text / image bytes in, embeddings out
VQGAN (family="vq")                     the parts `mmfast.export.onnx.export_vq` writes, as towers
DALL·E (family="dalle")                 dalle_generate: Python backend running mmfast's own loop

Every tower's config.pbtxt is written from its exported graph's signature, never from typed names.
A TensorRT plan only runs on the GPU model and TensorRT version that built it: with TensorRT
importable here (and a GPU) the plans are built now; otherwise `build_trt_plans.sh` builds them
with trtexec on the serving machine (e.g. inside the Triton container) before the server starts.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

from mmfast._atomic import atomic_write, replace_dir, staging_dir, sweep

from .graph import Tensor, check_onnx, onnx_config, signature, weight_dtypes
from .tensorrt import optimization_profiles

# backend -> (Triton platform, model file, model name suffix)
BACKENDS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx", ""),
            "tensorrt": ("tensorrt_plan", "model.plan", "_trt")}
FAMILIES = ("clip", "vq", "dalle")
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
          "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
          "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
_HF_TOKENIZER = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_TEMPLATES = Path(__file__).parent / "triton_models"


# ---- protobuf text format ---------------------------------------------------------------------------
class Enum(str):
    """A protobuf enum value (TYPE_FP32, KIND_GPU): written bare, not quoted."""


def _scalar(v) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_pbtxt(msg: dict, indent: int = 0) -> str:
    """A dict as protobuf text format: dicts are messages, lists of dicts repeated messages (map
    fields are lists of {"key", "value"} dicts), other lists repeated scalars."""
    pad, lines = "  " * indent, []
    for key, value in msg.items():
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                lines += [f"{pad}{key} {{", to_pbtxt(v, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


# ---- config pieces ---------------------------------------------------------------------------------
def _io(name: str, dtype: str, dims) -> dict:
    """One model input/output; a tensor that is only the batch axis is dims [1] reshaped to []."""
    out = {"name": name, "data_type": Enum(dtype), "dims": list(dims) or [1]}
    if not dims:
        out["reshape"] = {"shape": []}
    return out


def _graph_io(t: Tensor, batched: bool) -> dict:
    dims = [d if isinstance(d, int) else -1 for d in (t.dims[1:] if batched else t.dims)]
    if t.dtype not in _TYPES:
        raise ValueError(f"tensor {t.name!r} has dtype {t.dtype}, which Triton configs here do not map")
    return _io(t.name, _TYPES[t.dtype], dims)


def _batched(sig) -> bool:
    return all(t.dims and isinstance(t.dims[0], str) for t in sig.inputs + sig.outputs)


class _Repo:
    """Writes models into one repository folder and remembers what it wrote. Each model is built in a
    hidden staging folder and moved into the repository by `finish` (an atomic swap where the kernel
    has one): a server polling the repository never loads a half-written model, and a failed or killed
    export leaves the models that were there."""

    def __init__(self, out: Path, stage: Path, backends, max_batch_size, queue_delay_us, instances, device, fp16):
        self.out, self.stage, self.backends, self.fp16 = out, stage, backends, fp16
        self.max_batch, self.delay, self.instances, self.device = max_batch_size, queue_delay_us, instances, device
        self.models: dict[str, Path] = {}
        self.trtexec: list[str] = []

    def _model_dir(self, name: str, config: dict) -> Path:
        """The staging folder of model `name` (its repository folder is `self.models[name]`)."""
        d = self.stage / name
        (d / "1").mkdir(parents=True)
        (d / "config.pbtxt").write_text(to_pbtxt({"name": name, **config}) + "\n", encoding="utf-8")
        self.models[name] = self.out / name
        return d

    def _scheduling(self, kind: str) -> dict:
        return {"max_batch_size": self.max_batch, "dynamic_batching": {"max_queue_delay_microseconds": self.delay},
                "instance_group": [{"count": self.instances, "kind": Enum(kind)}]}

    def tower(self, name: str, onnx_path: Path, dims: dict | None = None, profiles: dict | None = None) -> dict:
        """The exported graph as one model per backend; returns {backend: model name}. TensorRT's profile:
        `profiles`, or batch 1..max_batch_size with `dims` for the other symbolic axes."""
        sig = check_onnx(onnx_path)
        if not _batched(sig):
            raise ValueError(f"{onnx_path}: every input and output needs a symbolic batch axis 0 for Triton's "
                             f"dynamic batching; got {[(t.name, t.dims) for t in sig.inputs + sig.outputs]}")
        names = {}
        for backend in self.backends:
            platform, filename, suffix = BACKENDS[backend]
            gpu = backend == "tensorrt" or self.device == "gpu"
            config = {"platform": platform, **self._scheduling("KIND_GPU" if gpu else "KIND_CPU"),
                      "input": [_graph_io(t, True) for t in sig.inputs],
                      "output": [_graph_io(t, True) for t in sig.outputs]}
            d = self._model_dir(name + suffix, config)
            _place_onnx(onnx_path, d / "1" / "model.onnx")
            if backend == "tensorrt":
                batch = (1, self.max_batch, self.max_batch)
                self._plan(d / "1", profiles or optimization_profiles(onnx_path, batch, dims))
            names[backend] = name + suffix
        return names

    def _plan(self, version_dir: Path, profiles: dict) -> None:
        fp16 = "float16" in weight_dtypes(version_dir / "model.onnx")
        if importlib.util.find_spec("tensorrt") is not None and _has_cuda():
            from .tensorrt import build_plan
            build_plan(version_dir / "model.onnx", version_dir / "model.plan", profiles,
                       precision="fp16" if fp16 else "fp32", timing_cache=self.out / "timing.cache")
            return
        rel = version_dir.relative_to(self.stage)
        shapes = {k: ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in profiles.items())
                  for k, i in (("min", 0), ("opt", 1), ("max", 2))}
        self.trtexec.append(f'"$TRTEXEC" --onnx={rel}/model.onnx --saveEngine={rel}/model.plan '
                            f"--minShapes={shapes['min']} --optShapes={shapes['opt']} --maxShapes={shapes['max']} "
                            # as build_plan: fp16 from fp16 weights (strongly typed), fp32 without TF32
                            f"--timingCacheFile=timing.cache {'--stronglyTyped' if fp16 else '--noTF32'}")

    def python_model(self, name: str, template: str, inputs: list, outputs: list, settings: dict,
                     settings_file: str, gpu: bool = False) -> Path:
        config = {"backend": "python", **self._scheduling("KIND_GPU" if gpu else "KIND_CPU"),
                  "input": inputs, "output": outputs}
        d = self._model_dir(name, config)
        shutil.copyfile(_TEMPLATES / template, d / "1" / "model.py")
        (d / "1" / settings_file).write_text(json.dumps(settings, indent=1), encoding="utf-8")
        return d

    def ensemble(self, name: str, inputs: list, outputs: list, steps: list) -> None:
        """steps: (model name, {model input: ensemble tensor}, {model output: ensemble tensor})."""
        config = {"platform": "ensemble", "max_batch_size": self.max_batch, "input": inputs, "output": outputs,
                  "ensemble_scheduling": {"step": [
                      {"model_name": m, "model_version": -1,
                       "input_map": [{"key": k, "value": v} for k, v in ins.items()],
                       "output_map": [{"key": k, "value": v} for k, v in outs.items()]} for m, ins, outs in steps]}}
        self._model_dir(name, config)

    def finish(self) -> None:
        """Move every staged model into the repository (overwrite=True: a model replaced, the rest of
        the folder kept), then write the build script and README."""
        for name, final in self.models.items():
            replace_dir(self.stage / name, final)
        if self.trtexec:
            script = self.out / "build_trt_plans.sh"
            head = ("#!/bin/sh\n# Builds the TensorRT plans on the serving GPU (a plan runs only on the GPU model\n"
                    "# and TensorRT version that built it). Run once before starting tritonserver.\n"
                    'set -e\ncd "$(dirname "$0")"\nTRTEXEC="${TRTEXEC:-trtexec}"\n')
            atomic_write(script, head + "\n".join(self.trtexec) + "\n")
            script.chmod(0o755)
        atomic_write(self.out / "README.md", _readme(self))


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _place_onnx(src: Path, dst: Path) -> None:
    """Copy an ONNX file and the external-data files it names (kept relative to it)."""
    import onnx
    shutil.copyfile(src, dst)
    m = onnx.load(str(src), load_external_data=False)
    for loc in {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}:
        (dst.parent / loc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / loc, dst.parent / loc)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # checkpoints are read-only data: a hard link saves gigabytes for mega
    except OSError:
        shutil.copyfile(src, dst)


def _readme(repo: _Repo) -> str:
    models = "\n".join(f"- `{n}`" for n in repo.models)
    trt = ("\nFirst build the TensorRT plans on the serving GPU: `sh build_trt_plans.sh` (set TRTEXEC if trtexec "
           "is not on PATH; the Triton container has it in /usr/src/tensorrt/bin).\n") if repo.trtexec else ""
    return (f"# Triton model repository written by mmfast\n\nModels:\n{models}\n{trt}\n"
            "Serve: `tritonserver --model-repository .`. The Python-backend models import mmfast: install it "
            "(with torch) in the server's Python environment, e.g. `pip install mmfast` inside the container.\n\n"
            "Clients send raw captions / encoded image bytes as BYTES tensors of shape [batch, 1] to the ensembles "
            "(`clip_text_embed`, `clip_image_embed`); embeddings come back unnormalized (L2-normalize them for "
            "cosine similarity, as `Clip.encode_*` does).\n")


# ---- model families -----------------------------------------------------------------------------------
def _clip(repo: _Repo, source, tmp: Path) -> None:
    from mmfast.clip.model import CLIP
    from mmfast.clip.runtime import Clip, load_clip

    from .onnx import export_clip
    path = None
    if isinstance(source, Clip):
        clip = source
    elif isinstance(source, CLIP):
        clip = Clip(source, dtype="fp32", device="cpu")
    else:
        path, clip = Path(source), load_clip(source, dtype="fp32", device="cpu")
    cfg, tok = clip.config, clip.tokenizer
    tokenizer_files = []
    if tok.reference == "transformers":
        if path is None or not path.is_dir():
            raise ValueError("this Clip uses a Hugging Face tokenizer: pass its checkpoint folder, so that the "
                             "tokenizer files go into the repository")
        tokenizer_files = [path / f for f in _HF_TOKENIZER if (path / f).is_file()]
    paths = export_clip(clip, tmp, fp16=repo.fp16)  # checked against PyTorch
    ctx, S = tok.context_length, cfg.vision.image_size
    length = {d: (1, ctx, ctx) for t in signature(paths["text"]).inputs for d in t.dims[1:] if isinstance(d, str)}
    image = repo.tower("clip_image", paths["image"])
    text = repo.tower("clip_text", paths["text"], length)
    settings = {"context_length": ctx, "pool": cfg.text.pool, "eos_token_id": cfg.text.eos_token_id,
                "preprocess": dataclasses.asdict(clip.preprocess)}
    d = repo.python_model("clip_tokenize", "clip_tokenize.py", [_io("text", "TYPE_STRING", [1])],
                          [_io("ids", "TYPE_INT64", [ctx]), _io("pool", "TYPE_INT64", [1])], settings,
                          "mmfast_clip.json")
    for f in tokenizer_files:
        _link_or_copy(f, d / "1" / "tokenizer" / f.name)
    repo.python_model("clip_preprocess", "clip_preprocess.py", [_io("image", "TYPE_STRING", [1])],
                      [_io("pixels", "TYPE_FP32", [3, S, S])], settings, "mmfast_clip.json")
    first = repo.backends[0]
    for part, tower, raw, prep, feeds in (("text", text, "text", "clip_tokenize", ("ids", "pool")),
                                          ("image", image, "image", "clip_preprocess", ("pixels",))):
        out = signature(paths[part]).outputs
        repo.ensemble(f"clip_{part}_embed", [_io(raw, "TYPE_STRING", [1])], [_graph_io(t, True) for t in out],
                      [(prep, {raw: raw}, {f: f for f in feeds}), (tower[first], {f: f for f in feeds},
                                                                     {t.name: t.name for t in out})])


def _vq(repo: _Repo, source, tmp: Path) -> None:
    from .onnx import export_vq
    from .tensorrt import vq_profiles
    paths = export_vq(source, tmp, fp16=repo.fp16)
    cfg = onnx_config(next(iter(paths.values())))
    # TensorRT: image sides up to the training resolution, token grids up to its grid
    dims = vq_profiles(paths, cfg["resolution"], 2 ** (len(cfg["ch_mult"]) - 1), repo.max_batch)
    for part, path in paths.items():
        repo.tower(f"vq_{part}", Path(path), profiles=dims[part])


def _generator(repo: _Repo, source, tmp: Path) -> None:
    from mmfast.dalle.load import _find_detoker, _read_config, _weights, find_model_dir
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError("the generator is served from its files: pass min-dalle's folder (models_root or "
                        f"dalle_bart_mini/), not a loaded {type(source).__name__}")
    model_dir = find_model_dir(source)
    config = _read_config(model_dir)
    detoker = _find_detoker(model_dir, config)
    inputs = [_io("prompt", "TYPE_STRING", [1])] + [
        {**_io(n, t, [1]), "optional": True} for n, t in (("seed", "TYPE_INT64"), ("top_k", "TYPE_INT64"),
                                                          ("top_p", "TYPE_FP32"), ("temperature", "TYPE_FP32"),
                                                          ("guidance", "TYPE_FP32"))]
    outputs = [_io("tokens", "TYPE_INT64", [-1])] + ([_io("image", "TYPE_UINT8", [-1, -1, 3])] if detoker else [])
    d = repo.python_model("dalle_generate", "dalle_generate.py", inputs, outputs, {"dtype": "auto"},
                          "mmfast_dalle.json", gpu=repo.device == "gpu")
    dst = d / "1" / "dalle"
    for f in (_weights(model_dir, "encoder"), _weights(model_dir, "decoder"), model_dir / "vocab.json",
              model_dir / "merges.txt"):
        _link_or_copy(f, dst / f.name)
    if detoker is not None and detoker.is_dir():      # a VQGAN folder (taming / mmfast): copied beside it
        for f in detoker.iterdir():
            if f.is_file():
                _link_or_copy(f, dst / "vqgan" / f.name)
    elif detoker is not None:
        _link_or_copy(detoker, dst / "vqgan" / "detoker.pt")
    if config:                                        # config.json, its VQGAN now the copy beside it
        if "vqgan" in config:
            config = {**config, "vqgan": "vqgan"}
        atomic_write(dst / "config.json", json.dumps(config, indent=1, ensure_ascii=False))


def export_triton_repo(source, out_dir, *, family: str | None = None, backends=("onnxruntime",),
                       fp16: bool = False, max_batch_size: int = 32, queue_delay_us: int = 500,
                       instances: int = 1, device: str = "gpu", overwrite: bool = False) -> dict[str, Path]:
    """Write an NVIDIA Triton Inference Server model repository for a CLIP, VQGAN or DALL·E checkpoint.

    Parameters
    ----------
    source : a checkpoint path, or a loaded `Clip` / `VQ` (fp32); the generator from its min-dalle folder.
    out_dir : the repository folder; it must be empty or absent unless `overwrite=True`, which replaces
        the models written here and keeps anything else in the folder.
    family : "clip" | "vq" | "dalle" (the generator); default: found from `source`, as `mmfast export onnx`.
    backends : towers for "onnxruntime" and/or "tensorrt"; the ensembles use the first.
    fp16 : fp16 towers (the `*_fp16.onnx` exports; TensorRT builds them strongly typed). GPU only.
    max_batch_size, queue_delay_us : Triton's dynamic batching: the largest batch it forms and how long a
        request may wait for others. instances, device : instance_group count and kind ("gpu" / "cpu").

    Returns {model name: model folder}.

    Example
    -------
    >>> export_triton_repo("open_clip_dir", "repo/", backends=("onnxruntime", "tensorrt"))   # doctest: +SKIP
    """
    from .onnx import detect_family
    if family not in (None,) + FAMILIES:
        raise ValueError(f"family must be None (found from the source) or one of {FAMILIES}, got {family!r}")
    backends = (backends,) if isinstance(backends, str) else tuple(backends)
    bad = [b for b in backends if b not in BACKENDS]
    if not backends or bad or len(set(backends)) != len(backends):
        raise ValueError(f"backends must be distinct names from {tuple(BACKENDS)}, got {backends!r}")
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    if device == "cpu" and ("tensorrt" in backends or fp16):
        raise ValueError("TensorRT and fp16 towers run on GPUs only; use device='gpu', or backends=('onnxruntime',) "
                         "in fp32 on CPU")
    for name, v, least in (("max_batch_size", max_batch_size, 1), ("instances", instances, 1),
                           ("queue_delay_us", queue_delay_us, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    out = Path(out_dir)
    if out.is_dir():
        sweep(out)  # the staging folder of an export that was killed: not the user's file
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out} exists and is {'a file' if not out.is_dir() else 'not empty'}: choose an "
                              "empty folder, or pass overwrite=True (--overwrite) to replace the models it "
                              "writes there")
    family = family or detect_family(source)
    with staging_dir(out, "models") as stage:
        repo = _Repo(out, stage, backends, max_batch_size, queue_delay_us, instances, device, fp16)
        (stage / ".onnx").mkdir()  # the exports the towers are made of (model names cannot start with ".")
        {"clip": _clip, "vq": _vq, "dalle": _generator}[family](repo, source, stage / ".onnx")
        repo.finish()
    return repo.models
