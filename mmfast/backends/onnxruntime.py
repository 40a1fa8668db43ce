"""ONNX Runtime backend: the exported graphs of every family behind the duck types the runtimes call.

- `OrtSession`: one graph; inputs and outputs bound by pointer to caller-owned torch tensors (IO
  binding: no copies in or out), thread count, and the optimized graph cached on disk beside the
  model, keyed by the model's hash, the ORT version, the providers and the CPU (a stale or foreign
  cached graph is rebuilt, with a warning that says why).
- `OrtClip`, `OrtVQ` (and `onnxruntime_dalle.OrtDalleEncoder` / `OrtDalleDecoder`): what `Clip`,
  `VQ` and `Generator` call on their models (`encode_image` / `encode_text`, `encode` / `decode` /
  `quantize`, the encoder call, `cross_kv` / `new_cache` and the decode step).
- `exported(...)`: the graphs of a torch model, exported once into the mmfast cache folder (keyed by
  the weights and the export code) and reused by later loads; `quantized(...)`: ORT's dynamic int8.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from mmfast._atomic import atomic_write, replace_with_sidecar, staging_dir
from mmfast.export.onnx_common import ort_import

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
       torch.bool: np.bool_, torch.uint8: np.uint8}


def cache_root() -> Path:
    """`$MMFAST_CACHE_DIR`, else `$XDG_CACHE_HOME/mmfast`, else `~/.cache/mmfast`."""
    if os.environ.get("MMFAST_CACHE_DIR"):
        return Path(os.environ["MMFAST_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmfast"


def file_sha256(path: Path) -> str:
    """sha256 of an ONNX file; an external-data file beside it counts by its size and mtime."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    data = Path(str(path) + ".data")
    if data.exists():
        st = data.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _machine() -> str:
    from mmfast.quantize import cpu_flags
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    isa = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    return model + " " + hashlib.sha256(" ".join(isa).encode()).hexdigest()[:12]


# ---- one graph ----------------------------------------------------------------------------------------
class OrtSession:
    """An ONNX graph on ONNX Runtime with IO binding and an on-disk cache of its optimized graph.

    Parameters
    ----------
    path : the .onnx file.
    threads : intra-op threads; default torch.get_num_threads(), so one knob sets both engines
        (0: ONNX Runtime's own default, one per physical core).
    providers : default ["CPUExecutionProvider"].
    cache_dir : where the optimized graph is kept (default `<path's folder>/ort_cache`); None or
        False to skip the cache.

    Example
    -------
    >>> s = OrtSession("out/vq_decoder.onnx")                                  # doctest: +SKIP
    >>> out = torch.empty(1, 3, 256, 256)
    >>> s.run({"tokens": tokens}, {"pixels": out})                              # writes into out
    """

    def __init__(self, path, *, threads: int | None = None, providers=None, cache_dir="auto"):
        ort = ort_import()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX graph at {str(self.path)!r}")
        self.providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise ValueError(f"ONNX Runtime {ort.__version__} here has no {missing}; available: "
                             f"{ort.get_available_providers()} (onnxruntime-gpu brings CUDAExecutionProvider)")
        self.threads = torch.get_num_threads() if threads is None else threads
        if cache_dir == "auto":
            cache_dir = self.path.parent / "ort_cache"
        self.cache_status = "off"
        self.session = self._cached(Path(cache_dir)) if cache_dir else self._build(None)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _options(self, level: str):
        ort = ort_import()
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def _build(self, target: Path | None):
        ort = ort_import()
        so = self._options("ORT_ENABLE_ALL")
        if target is not None:
            so.optimized_model_filepath = str(target)
            if Path(str(self.path) + ".data").exists():  # > 2 GB: the optimized graph needs external data too
                so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                            target.name + ".data")
                so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        return ort.InferenceSession(str(self.path), so, providers=self.providers)

    def _cached(self, cache_dir: Path):
        ort = ort_import()
        key = {"source_sha256": file_sha256(self.path), "onnxruntime": ort.__version__, "providers": self.providers,
               "machine": _machine(), "level": "ORT_ENABLE_ALL"}
        opt = cache_dir / f"{self.path.stem}.opt.onnx"
        meta = cache_dir / f"{self.path.stem}.opt.json"
        if opt.exists():
            try:
                have = json.loads(meta.read_text())
            except (OSError, ValueError):
                have = {}
            if have == key:
                try:
                    s = ort.InferenceSession(str(opt), self._options("ORT_DISABLE_ALL"), providers=self.providers)
                    self.cache_status = "hit"
                    return s
                except Exception as e:  # noqa: BLE001 - a corrupt cache entry is rebuilt, never fatal
                    why = f"it does not load ({str(e).splitlines()[0][:120]})"
            else:
                diff = [k for k in key if have.get(k) != key[k]] or ["its key file"]
                why = ("the model changed since" if diff == ["source_sha256"] else
                       f"it was built for another {', '.join(d for d in diff if d != 'source_sha256')}"
                       + (" and the model changed" if "source_sha256" in diff else ""))
            warnings.warn(f"mmfast: cached optimized ONNX Runtime graph {opt} is stale ({why}); rebuilding it",
                          stacklevel=3)
            self.cache_status = "rebuilt"
        else:
            self.cache_status = "built"
        try:  # atomic: a reader never sees half a graph; the key is written once the graph is in place
            with staging_dir(cache_dir, opt.name) as stage:
                session = self._build(stage / opt.name)
                replace_with_sidecar(stage / opt.name, opt)
            atomic_write(meta, json.dumps(key, indent=1))
        except OSError as e:                         # a read-only model folder: run without the cache
            warnings.warn(f"mmfast: cannot write the ONNX Runtime cache in {cache_dir} ({e}); not caching",
                          stacklevel=3)
            self.cache_status = "off"
            session = self._build(None)
        return session

    # ---- running ------------------------------------------------------------------------------------
    def bind(self, binding, inputs: dict, outputs: dict) -> None:
        """Bind torch tensors (contiguous; CPU or CUDA) by pointer to an `io_binding()`."""
        for fn, tensors in ((binding.bind_input, inputs), (binding.bind_output, outputs)):
            for name, t in tensors.items():
                if t.dtype not in _NP or not t.is_contiguous():
                    raise ValueError(f"{self.path.name}: {name} must be a contiguous tensor of "
                                     f"{[str(d) for d in _NP]}, got {t.dtype} (contiguous={t.is_contiguous()})")
                dev = "cuda" if t.is_cuda else "cpu"
                fn(name, dev, t.device.index or 0, _NP[t.dtype], tuple(t.shape), t.data_ptr())

    def run(self, inputs: dict, outputs: dict) -> dict:
        """Run with `inputs` {name: tensor}; results are written into `outputs` {name: tensor}."""
        inputs = {k: v if v.is_contiguous() else v.contiguous() for k, v in inputs.items()}
        b = self.session.io_binding()
        self.bind(b, inputs, outputs)
        self.session.run_with_iobinding(b)
        return outputs


# ---- exports and int8, cached ---------------------------------------------------------------------------
def weights_sha256(*modules) -> str:
    """Content hash of modules' parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in list(m.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())       # the buffer itself, no copy
    return h.hexdigest()


def _export_code_sha() -> str:
    import mmfast.export.onnx as onnx_export
    d = Path(onnx_export.__file__).parent
    h = hashlib.sha256(torch.__version__.encode())
    for f in sorted(d.glob("onnx*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


_EXPORT_LOCK = threading.Lock()


def exported(family: str, modules: tuple, parts: tuple, *, fp16: bool = False, cache_dir=None) -> dict[str, Path]:
    """Paths of `parts` of `family`'s graphs for `modules` (exported once, then reused from the cache).

    The folder is `<cache>/onnx/<family>-<hash of the weights + export code>`; a part is exported
    (with its parity check) only when its file is missing there.
    """
    from mmfast.export import onnx as onnx_export

    key = hashlib.sha256((weights_sha256(*modules) + _export_code_sha()).encode()).hexdigest()[:20]
    d = Path(cache_dir) if cache_dir else cache_root() / "onnx" / f"{family}-{key}"
    names = {p: d / f"{'vq' if family == 'vq' else family}_{p}{'_fp16' if fp16 else ''}.onnx" for p in parts}
    with _EXPORT_LOCK:
        todo = tuple(p for p, f in names.items() if not f.exists())
        if todo:
            src = modules[0] if len(modules) == 1 else tuple(modules)
            fn = {"clip": onnx_export.export_clip, "vq": onnx_export.export_vq,
                  "dalle": onnx_export.export_generator}[family]
            with staging_dir(d.parent, d.name) as tmp:  # a part's file appears only once it is complete
                for part, p in fn(src, tmp, parts=todo, fp16=fp16).items():
                    d.mkdir(parents=True, exist_ok=True)
                    replace_with_sidecar(p, d / Path(p).name)
    return names


def quantized(path: Path, op_types=None) -> Path:
    """ORT dynamic int8 of an fp32 graph (int8 per-channel weights, activations quantized per call:
    MatMulInteger on MLAS's VNNI kernels), written once beside it as `<stem>_int8.onnx`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    q = path.with_name(path.stem + "_int8.onnx")
    stamp = q.with_suffix(".json")
    src = file_sha256(path)
    if q.exists() and stamp.exists() and json.loads(stamp.read_text()).get("source_sha256") == src:
        return q
    with warnings.catch_warnings(), staging_dir(q.parent, q.name) as stage:
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)        # the quantizer's root-logger advice on pre-processing
        try:
            quantize_dynamic(str(path), str(stage / q.name), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=op_types,
                             use_external_data_format=Path(str(path) + ".data").exists())
        finally:
            logging.disable(logging.NOTSET)
        replace_with_sidecar(stage / q.name, q)    # the graph moves last: a reader never sees half of one
    atomic_write(stamp, json.dumps({"source_sha256": src}))
    return q


def check_dtype(family: str, dtype: str, device: torch.device, allowed=("fp32", "int8")) -> str:
    """The ORT mode for a runtime's dtype argument; a dtype ONNX Runtime cannot run raises."""
    name = {"float32": "fp32", torch.float32: "fp32"}.get(dtype, dtype)
    if name not in allowed or device.type != "cpu":
        raise ValueError(f"backend='onnxruntime' runs {family} on CPU in {' or '.join(allowed)}; got dtype={dtype!r} "
                         f"on {device}. bf16 has no ONNX Runtime CPU kernels: use backend='torch' for it")
    return name


# ---- the families' duck types -----------------------------------------------------------------------------
class OrtClip:
    """CLIP towers on ORT: what `Clip` calls on a `mmfast.clip.model.CLIP` (fp32, or ORT's int8).

    `parts` picks the towers to export (a `Clip` with backend="auto" may run one tower here).
    """

    def __init__(self, model, cache_dir=None, int8: bool = False, *, parts=("image", "text"),
                 threads: int | None = None):
        self.cfg = model.cfg
        self._pool = model.pool_positions
        self.logit_scale = model.logit_scale
        self.paths = exported("clip", (model,), tuple(parts), cache_dir=cache_dir)
        if int8:
            self.paths = {k: quantized(p) for k, p in self.paths.items()}
        self.sessions = {k: OrtSession(p, threads=threads) for k, p in self.paths.items()}

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        return self._pool(ids)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        out = torch.empty(pixels.shape[0], self.cfg.embed_dim)
        return self.sessions["image"].run({"pixels": pixels.float().cpu()}, {"embeddings": out})["embeddings"]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        pool = self.pool_positions(ids)
        T = int(pool.max()) + 1 if ids.shape[0] else 1  # same exact truncation as the torch model
        out = torch.empty(ids.shape[0], self.cfg.embed_dim)
        feeds = {"ids": ids[:, :T].cpu(), "pool": pool.cpu()}
        return self.sessions["text"].run(feeds, {"embeddings": out})["embeddings"]


class OrtVQ:
    """VQGAN parts on ORT: `encode_latents` / `encode` / `decode` as `VQGAN` has them, tokens from the
    latents by the model's own quantizer (`kernels.nearest_code`). A part not in `parts` runs on
    `fallback` (a prepared torch VQGAN), e.g. when `backend="auto"` keeps it in PyTorch."""

    def __init__(self, model, *, parts=("encoder", "decoder"), fallback=None, threads: int | None = None,
                 cache_dir=None):
        self.cfg = model.cfg
        parts = tuple(p for p in parts if p != "encoder" or model.cfg.has_encoder)
        self.paths = exported("vq", (model,), parts, cache_dir=cache_dir)
        self.sessions = {k: OrtSession(p, threads=threads) for k, p in self.paths.items()}
        self.fallback = fallback
        self.quantize = fallback.quantize if fallback is not None else model.quantize.cpu().float()
        self.quantize.refresh()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _torch(self, part: str):
        if self.fallback is None:
            raise RuntimeError(f"this OrtVQ runs no {part} (parts={tuple(self.sessions)}) and has no fallback model")
        return self.fallback

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        if "encoder" not in self.sessions:
            return self._torch("encoder").encode_latents(x)
        B, _, H, W = x.shape
        f = self.cfg.factor
        out = torch.empty(B, self.cfg.embed_dim, H // f, W // f)
        return self.sessions["encoder"].run({"pixels": x.float().cpu()}, {"latents": out})["latents"]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if "encoder" not in self.sessions:
            return self._torch("encoder").encode(x)
        return self.quantize.codes(self.encode_latents(x))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if "decoder" not in self.sessions:
            return self._torch("decoder").decode(ids)
        B, h, w = ids.shape
        f = self.cfg.factor
        out = torch.empty(B, self.cfg.out_ch, h * f, w * f)
        return self.sessions["decoder"].run({"tokens": ids.long().cpu()}, {"pixels": out})["pixels"]
