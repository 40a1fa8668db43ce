"""Models on TensorRT: `TrtEngine` runs one plan on torch CUDA tensors; `TrtClip` is the duck type of
`mmfast.clip.model.CLIP` that `Clip` calls, `TrtVQ` of `mmfast.vqgan.model.VQGAN` for `VQ` (as `OrtClip`
and `OrtVQ` are for ONNX Runtime).

Buffers are torch tensors: inputs are bound with `set_tensor_address(name, tensor.data_ptr())`,
outputs are allocated at the shapes the context infers, and `execute_async_v3` runs on torch's
current stream, so the results are ordered with whatever torch does next, without a host sync.
"""
from __future__ import annotations

import copy
import tempfile
import threading
from pathlib import Path

import torch

from mmfast.export.tensorrt import (PRECISIONS, cached_engine, clip_profiles, import_tensorrt, out_of_profile,
                                    vq_profiles)

_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
          "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


class TrtEngine:
    """One deserialized engine and its execution context; call it with named tensors.

    >>> eng = TrtEngine.from_onnx("clip_image.onnx", profiles, cache_dir="engines/")   # doctest: +SKIP
    >>> eng(pixels=torch.randn(4, 3, 224, 224))["embeddings"].shape                     # doctest: +SKIP
    torch.Size([4, 512])
    """

    def __init__(self, engine, device=None):
        trt = import_tensorrt()
        self.engine = engine
        index = None if device is None else torch.device(device).index
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _TORCH[engine.get_tensor_dtype(n).name] for n in names}
        # (min, opt, max) of profile 0, the only one mmfast builds
        self.profiles = {n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}
        self._lock = threading.Lock()  # one context: its shapes and addresses are per call
        self._done = None  # event after the last enqueue: a call on another stream waits for it on the GPU

    @classmethod
    def from_onnx(cls, onnx_path, profiles: dict, *, cache_dir, precision: str = "fp32", device=None) -> "TrtEngine":
        engine, _ = cached_engine(onnx_path, cache_dir, profiles, precision=precision, device=device)
        return cls(engine, device)

    def __call__(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        if set(feeds) != set(self.inputs):
            raise ValueError(f"this engine takes inputs {self.inputs}, got {sorted(feeds)}")
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            held = []  # inputs stay referenced until enqueued on `stream` (the allocator orders reuse)
            for name in self.inputs:
                x = torch.as_tensor(feeds[name]).to(self.device, self.dtypes[name]).contiguous()
                problem = out_of_profile(self.profiles[name], tuple(x.shape))
                if problem:
                    raise ValueError(f"input {name!r} {problem}; split the batch or rebuild the engine with a "
                                     "larger range (max_batch=...)")
                self.context.set_input_shape(name, tuple(x.shape))
                self.context.set_tensor_address(name, x.data_ptr())
                held.append(x)
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if self._done is not None:
                stream.wait_event(self._done)  # the context's scratch memory is shared between calls
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (its log names the layer)")
            self._done = torch.cuda.Event()
            self._done.record(stream)
        return outs


class TrtClip:
    """Exports a CLIP once (ONNX in `cache_dir`, default a temp dir), builds or loads its plans for this
    GPU, and runs both towers on TensorRT. precision: "fp32", or "fp16" (the fp16 ONNX export, built
    as a strongly typed network: the fp16 path of TensorRT 10 and 11 alike)."""

    def __init__(self, model, cache_dir=None, precision: str = "fp32", max_batch: int = 32, device=None):
        from mmfast.export.onnx import export_clip
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        import_tensorrt()
        self.cfg = model.cfg
        self._pool = model.pool_positions
        self.logit_scale = model.logit_scale
        self.max_batch = max_batch
        out = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="mmfast-trt-"))
        paths = export_clip(model, out, fp16=precision == "fp16")
        profiles = clip_profiles(paths, model.cfg, max_batch)
        self.engines = {part: TrtEngine.from_onnx(paths[part], profiles[part], cache_dir=out, precision=precision,
                                                  device=device) for part in paths}

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        return self._pool(ids)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        run = self.engines["image"]
        return torch.cat([run(pixels=pixels[i:i + self.max_batch])["embeddings"]
                          for i in range(0, pixels.shape[0], self.max_batch)])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        run, out = self.engines["text"], []
        for i in range(0, ids.shape[0], self.max_batch):
            chunk = ids[i:i + self.max_batch]
            pool = self.pool_positions(chunk)
            T = int(pool.max()) + 1  # the same exact truncation as the torch model (causal attention)
            out.append(run(ids=chunk[:, :T], pool=pool)["embeddings"])
        return torch.cat(out)


class TrtVQ:
    """VQGAN encoder (-> latents) and decoder (tokens ->) on TensorRT, `encode_latents` / `encode` /
    `decode` as `VQGAN` has them; tokens from the latents by the model's own quantizer
    (`kernels.nearest_code`), outside the graph. Profiles: batch 1..max_batch, sides up to the
    training resolution (`vq_profiles`)."""

    def __init__(self, model, cache_dir=None, precision: str = "fp32", max_batch: int = 4, device=None):
        from mmfast.export.onnx import export_vq
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        import_tensorrt()
        self.cfg = model.cfg
        self.max_batch = max_batch
        out = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="mmfast-trt-"))
        paths = export_vq(model, out, fp16=precision == "fp16")
        profiles = vq_profiles(paths, self.cfg.resolution, self.cfg.factor, max_batch)
        self.engines = {part: TrtEngine.from_onnx(paths[part], profiles[part], cache_dir=out, precision=precision,
                                                  device=device) for part in paths}
        self.device = next(iter(self.engines.values())).device
        self.quantize = copy.deepcopy(model.quantize).to(self.device).float()  # the caller's model stays put
        self.quantize.refresh()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what the engines take and return (fp16 plans keep fp32 edges)

    def _run(self, part: str, name: str, x: torch.Tensor, out: str) -> torch.Tensor:
        if part not in self.engines:
            raise ValueError(f"this checkpoint has no {part} (min-dalle's detoker.pt is decoder-only)")
        return torch.cat([self.engines[part](**{name: x[i:i + self.max_batch]})[out]
                          for i in range(0, x.shape[0], self.max_batch)])

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self._run("encoder", "pixels", x, "latents")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.encode_latents(x))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run("decoder", "tokens", ids, "pixels")
