"""TensorRT plans from mmfast's ONNX exports: optimization profiles, fp16, timing cache, plan cache.

    from mmfast.export.tensorrt import export_clip
    plans = export_clip("open_clip_dir", "engines/", precision="fp16", max_batch=32)
    # {"image": engines/clip_image-fp16-<key>.plan, "text": engines/clip_text-fp16-<key>.plan}

Written against TensorRT's Python API, 10.x and 11.x. Precision lives in the graph where it can:
an ONNX with fp16 weights builds as a strongly typed network (the only fp16 path TensorRT 11 has,
since it removed `BuilderFlag.FP16`); TensorRT 10 can also build fp16 from an fp32 graph with the
flag. A plan only runs on the TensorRT version and GPU that built it, so the cache key holds both,
beside the ONNX hash, the precision and the profiles; a cached plan that fails to deserialize
anyway (copied from elsewhere, truncated) is rebuilt with a warning.

`tensorrt` is imported inside the functions that build or run engines; everything else here
(profiles, keys) is plain Python and tested without it.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from .graph import check_onnx, onnx_config, onnx_digest, signature, weight_dtypes

PLAN_FORMAT = 1          # bump when the way plans are built changes: old plans then miss the cache
PRECISIONS = ("fp32", "fp16")
Range = tuple[int, int, int]  # (min, opt, max) of one axis


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise ImportError("TensorRT is not installed: pip install 'mmfast[tensorrt]' (NVIDIA's wheels; "
                          "needs an NVIDIA GPU and driver)") from None
    return tensorrt


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


# ---- optimization profiles (pure) ----------------------------------------------------------------
def _check_range(name: str, r) -> Range:
    ok = isinstance(r, (tuple, list)) and len(r) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in r)
    if not ok or not 1 <= r[0] <= r[1] <= r[2]:
        raise ValueError(f"{name} must be (min, opt, max) ints with 1 <= min <= opt <= max, got {r!r}")
    return tuple(r)


def optimization_profiles(model, batch: Range = (1, 8, 32), dims: dict | None = None) -> dict:
    """min / opt / max shape of every graph input, for `IOptimizationProfile.set_shape`.

    The symbolic axis 0 of the inputs takes the `batch` range; any other symbolic axis needs its
    range in `dims` ({dim_param: (min, opt, max)}); fixed axes stay fixed.

    Returns {input name: (min shape, opt shape, max shape)}.

    Example
    -------
    >>> optimization_profiles("clip_text.onnx", batch=(1, 32, 32), dims={"length": (1, 77, 77)})
    {'ids': ((1, 1), (32, 77), (32, 77)), 'pool': ((1,), (32,), (32,))}
    """
    sig = signature(model)
    batch = _check_range("batch", batch)
    ranges = {t.dims[0]: batch for t in sig.inputs if t.dims and isinstance(t.dims[0], str)}
    if not ranges:
        raise ValueError("no graph input has a symbolic batch axis (axis 0): the export froze it (exporting "
                         "with batch 1 can); re-export with batch >= 2 and dynamic axes")
    ranges.update({k: _check_range(f"dims[{k!r}]", r) for k, r in (dims or {}).items()})
    out = {}
    for t in sig.inputs:
        axes = []
        for axis, d in enumerate(t.dims):
            if isinstance(d, int):
                axes.append((d, d, d))
            elif d in ranges:
                axes.append(ranges[d])
            else:
                what = f"symbolic ({d!r})" if d else "of unknown size (no dim_param: re-export with one)"
                raise ValueError(f"input {t.name!r} axis {axis} is {what}; pass dims={{{d!r}: (min, opt, max)}}")
        out[t.name] = tuple(tuple(a[i] for a in axes) for i in range(3))
    return out


def out_of_profile(profile, shape) -> str | None:
    """Why `shape` falls outside one input's (min, opt, max) profile, or None when it fits."""
    lo, _, hi = profile
    if len(shape) != len(lo):
        return f"has {len(shape)} dims, the engine takes {len(lo)}"
    for axis, (v, a, b) in enumerate(zip(shape, lo, hi)):
        if not a <= v <= b:
            return f"axis {axis} is {v}, the engine's profile allows [{a}, {b}]"
    return None


# ---- the plan cache key (pure) ----------------------------------------------------------------------
def plan_key(onnx_sha256: str, tensorrt_version: str, gpu: str, precision: str, profiles: dict) -> str:
    """sha256 of everything a plan depends on; `gpu` is the compute capability, e.g. "sm_90"."""
    blob = {"format": PLAN_FORMAT, "onnx": onnx_sha256, "tensorrt": str(tensorrt_version), "gpu": gpu,
            "precision": precision,
            "profiles": {k: [list(s) for s in v] for k, v in sorted(profiles.items())}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def gpu_capability(device=None) -> str:
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines run on an NVIDIA GPU and torch sees none (torch.cuda.is_available() "
                           "is False); use backend='onnxruntime' or 'torch' on this machine")
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


# ---- building ---------------------------------------------------------------------------------------
def _write(path: Path, data) -> None:
    from mmfast._atomic import atomic_write
    atomic_write(path, memoryview(data))  # readers never see half a plan; a killed build leaves no file


def _set_timing_cache(config, path: Path | None) -> None:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        ok = config.set_timing_cache(config.create_timing_cache(data), False)  # False: refuse a mismatch
    except Exception:  # noqa: BLE001 - TensorRT raises plain RuntimeError/TypeError on foreign bytes
        ok = False
    if not ok:
        warnings.warn(f"timing cache {path} is from another TensorRT version or GPU (or damaged); "
                      "starting a new one", stacklevel=3)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def build_plan(onnx_path, plan_path, profiles: dict, *, precision: str = "fp32", timing_cache=None,
               workspace_bytes: int | None = None) -> Path:
    """Parse `onnx_path`, build a serialized engine with one optimization profile, write `plan_path`.

    precision : "fp32", or "fp16": an ONNX with fp16 weights builds strongly typed (TensorRT 10 and
        11); an fp32 ONNX builds with `BuilderFlag.FP16` on TensorRT 10 only (11 removed the flag).
    timing_cache : a file path; read when it exists, written after the build (faster rebuilds).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    sig = check_onnx(onnx_path)
    missing = {t.name for t in sig.inputs} ^ set(profiles)
    if missing:
        raise ValueError(f"profiles must name exactly the graph inputs {[t.name for t in sig.inputs]}; "
                         f"mismatched: {sorted(missing)}")
    fp16_graph = "float16" in weight_dtypes(onnx_path)
    if fp16_graph and precision == "fp32":
        raise ValueError(f"{onnx_path} holds fp16 weights; precision='fp32' needs the fp32 export")
    trt = import_tensorrt()
    weak_fp16 = precision == "fp16" and not fp16_graph
    if weak_fp16 and (_major(trt) >= 11 or not hasattr(trt.BuilderFlag, "FP16")):
        raise ValueError(f"TensorRT {trt.__version__} builds fp16 only from an ONNX with fp16 weights (it "
                         "removed BuilderFlag.FP16): export the fp16 ONNX (mmfast.export.onnx, fp16=True)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strong is not None and not weak_fp16:  # required for typed fp16 on 10.x, always on (ignored) in 11.x
        flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32 (as torch's matmuls): parity, not TF32's 1e-3
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = Path(timing_cache) if timing_cache is not None else None
    _set_timing_cache(config, cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} "
                           "(its log above names the layer)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    _write(plan_path, plan)
    if cache is not None:
        _write(cache, config.get_timing_cache().serialize())
    return plan_path


def cached_engine(onnx_path, cache_dir, profiles: dict, *, precision: str = "fp32", device=None):
    """The deserialized `ICudaEngine` for (ONNX, profiles, precision) on this GPU and TensorRT,
    built once and cached in `cache_dir` as `<onnx stem>-<precision>-<key>.plan` (+ a .json saying
    what it was built from). Returns (engine, plan path)."""
    import torch
    trt = import_tensorrt()
    gpu = gpu_capability(device)
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    key = plan_key(onnx_digest(onnx_path), trt.__version__, gpu, precision, profiles)
    plan = cache_dir / f"{onnx_path.stem}-{precision}-{key[:16]}.plan"
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        if plan.is_file():
            engine = _deserialize(runtime, plan)
            if engine is not None:
                return engine, plan
            warnings.warn(f"cached TensorRT plan {plan} does not deserialize on TensorRT {trt.__version__} / "
                          f"{gpu} (built by another version or GPU, or damaged): rebuilding it", stacklevel=2)
        build_plan(onnx_path, plan, profiles, precision=precision,
                   timing_cache=cache_dir / f"timing-{trt.__version__}-{gpu}.cache")
        meta = {"onnx": str(onnx_path), "tensorrt": trt.__version__, "gpu": gpu, "precision": precision,
                "profiles": {k: [list(s) for s in v] for k, v in profiles.items()}, "key": key}
        _write(plan.with_suffix(".json"), json.dumps(meta, indent=1).encode())
        engine = _deserialize(runtime, plan)
    if engine is None:
        raise RuntimeError(f"TensorRT {trt.__version__} cannot deserialize the plan it just built: {plan}")
    return engine, plan


def _deserialize(runtime, plan: Path):
    try:
        return runtime.deserialize_cuda_engine(plan.read_bytes())
    except Exception:  # noqa: BLE001 - a foreign plan raises on some versions, returns None on others
        return None


# ---- model parts ----------------------------------------------------------------------------------------
def clip_profiles(paths: dict, cfg, max_batch: int = 32, opt_batch: int | None = None) -> dict:
    """Profiles of the two CLIP towers: batch 1..max_batch; token length 1..context_length."""
    batch = (1, opt_batch or max_batch, max_batch)
    ctx = cfg.text.context_length
    text = signature(paths["text"])
    length = {d: (1, ctx, ctx) for t in text.inputs for d in t.dims[1:] if isinstance(d, str)}
    return {"image": optimization_profiles(paths["image"], batch),
            "text": optimization_profiles(paths["text"], batch, length)}


def vq_profiles(paths: dict, resolution: int, factor: int, max_batch: int = 4,
                opt_batch: int | None = None) -> dict:
    """Profiles of the VQGAN parts: batch 1..max_batch; image sides factor..resolution (encoder) and
    token grids 1..resolution / factor (decoder), tuned for the training resolution."""
    batch = (1, opt_batch or max_batch, max_batch)
    sides = {"encoder": (factor, resolution, resolution), "decoder": (1, resolution // factor, resolution // factor)}
    return {part: optimization_profiles(p, batch, {d: sides[part] for t in signature(p).inputs for d in t.dims[1:]
                                                   if isinstance(d, str)}) for part, p in paths.items()}


def export_clip(source, out_dir, *, precision: str = "fp32", max_batch: int = 32,
                opt_batch: int | None = None) -> dict[str, Path]:
    """CLIP towers -> ONNX (checked against PyTorch) -> TensorRT plans for this GPU, in `out_dir`.

    source : a checkpoint path, a `Clip` loaded with dtype="fp32", or a `CLIP` module.
    precision : "fp32", or "fp16" (the fp16 ONNX export, built strongly typed).
    Returns {"image": plan path, "text": plan path}; plans are cached by key in `out_dir`.
    """
    from .onnx import clip_module, export_clip as export_clip_onnx
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    import_tensorrt()  # the clear error before the export
    model = clip_module(source)
    paths = export_clip_onnx(model, out_dir, fp16=precision == "fp16")
    profiles = clip_profiles(paths, model.cfg, max_batch, opt_batch)
    return {part: cached_engine(paths[part], out_dir, profiles[part], precision=precision)[1] for part in paths}


def export_vq(source, out_dir, *, parts=None, precision: str = "fp32", max_batch: int = 4,
              opt_batch: int | None = None) -> dict[str, Path]:
    """VQGAN encoder (-> latents) / decoder (tokens ->) -> ONNX -> TensorRT plans for this GPU.

    source : a checkpoint path, a `VQ` or a `VQGAN`; parts : default both (decoder only for decoder-only
    files). Returns {part: plan path}, cached by key in `out_dir`.
    """
    from .onnx import export_vq as export_vq_onnx
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    import_tensorrt()
    paths = export_vq_onnx(source, out_dir, parts=parts, fp16=precision == "fp16")
    cfg = onnx_config(next(iter(paths.values())))
    profiles = vq_profiles(paths, cfg["resolution"], 2 ** (len(cfg["ch_mult"]) - 1), max_batch, opt_batch)
    return {part: cached_engine(paths[part], out_dir, profiles[part], precision=precision)[1] for part in paths}
