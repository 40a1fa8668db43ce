"""The VQ runtime object: `mmfast.load_vq(...)` -> `VQ` (images <-> discrete tokens).

One way in for images, documented once: the shorter side is resized to `size` (bicubic), then
the centre `size` x `size` square is cropped (the taming / DALL-E evaluation transform); `size` is
the model's training resolution unless given, and must be a multiple of the model's factor (16 for
f16, 8 for f8). Pixels that are already the right size go in through `encode_pixels`.

Calls are safe from several threads: the model is read-only under `torch.inference_mode` and
nothing is cached per call. Work runs in micro-batches so that a big batch never holds more
than `batch_size` images' activations at once.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..preprocess import ImagePreprocessor
from ..quantize import has_fast_bf16, resolve_device
from .config import VQConfig
from .load import load_into, load_vq_checkpoint
from .model import VQGAN

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", torch.float32: "fp32",
            torch.bfloat16: "bf16", torch.float16: "fp16"}
# dtype="auto" keeps a reduced-precision decoder only if its images stay this close to fp32's.
AUTO_MIN_PSNR = 40.0


def load_vq(path, *, name: str | None = None, config=None, device="auto", dtype="auto",
            backend: str | None = None) -> "VQ":
    """Load a VQGAN: taming `.ckpt` (+ its yaml), ru-dalle's Gumbel f8, min-dalle's `detoker.pt`,
    or a state dict in taming's names with a preset `name`.

    Parameters
    ----------
    path : str or Path, a checkpoint file or the folder holding it; "demo" for the small VQGAN shipped
        in the package (trained here on coloured shapes).
    name : preset for bare state dicts ("vqgan-f16-16384", "gumbel-f8-8192", ...).
    config : optional path of the run's yaml when it is not beside the checkpoint.
    device : "auto" | "cpu" | "cuda" | torch.device.
    dtype : "auto" | "fp32" | "bf16" | "fp16". On CPU, "bf16" runs the decoder's convolutions in
        bf16 (the encoder stays fp32, so tokens are exact); "auto" takes it on CPUs with native bf16
        when a probe decode keeps >= 40 dB PSNR to fp32 on these weights, else fp32. On CUDA the
        whole model runs in the dtype ("auto": bf16, or fp16 where bf16 is missing). GroupNorm
        statistics, attention softmax and the last convolution stay fp32 in every mode.
    backend : None (default: $MMFAST_BACKEND, else "auto") | "torch" | "onnxruntime" | "tensorrt" |
        "auto". "onnxruntime" exports the encoder (to latents; tokens
        by the same nearest-code op) and decoder once (checked against PyTorch, cached by weights)
        and runs them on ORT's CPU provider in fp32. "auto" probes both engines per part and keeps
        the fastest whose output keeps dtype="auto"'s bar (decoder PSNR >= 40 dB, encoder latents
        within 1e-4); the measurement is cached, and `VQ.info` says what it chose and why. "tensorrt"
        (CUDA, `mmfast[tensorrt]`) builds fp16 ("auto") or fp32 engines, cached per GPU.

    Example
    -------
    >>> vq = mmfast.load_vq("vqgan_imagenet_f16_16384/ckpts/last.ckpt")   # doctest: +SKIP
    >>> tokens = vq.encode(["cat.jpg"])          # [1, 16, 16] int64
    >>> vq.to_pil(vq.decode(tokens))[0].save("cat-reconstructed.png")
    """
    from ..backends.auto import resolve_backend
    backend = resolve_backend(backend)
    if isinstance(path, str) and path == "demo":
        from ..demo import weights_path
        path = weights_path("vq")
    cfg, sd = load_vq_checkpoint(path, name=name, config=config)
    model = VQGAN(cfg)
    load_into(model, sd, str(path))
    return VQ(model, device=device, dtype=dtype, backend=backend)


class VQ:
    """A VQGAN ready for inference; see `load_vq`. `tokens` are int64 [B, h, w] grids."""

    def __init__(self, model: VQGAN, *, device="auto", dtype="auto", backend: str = "torch"):
        self.config: VQConfig = model.cfg
        self.device = resolve_device(device)
        lo, hi = self.config.output_range
        # model pixels = lo + (hi - lo) * p for p in [0, 1]: mean / std in ImagePreprocessor's terms
        self._mean, self._std = (-lo / (hi - lo),) * 3, (1 / (hi - lo),) * 3
        self.backend = backend
        if backend != "torch":  # "onnxruntime" / "auto": mmfast.backends.auto builds the parts
            from ..backends.auto import check_backend, vq_backend
            self.dtype, self.model, self.info = vq_backend(self, model.eval(), check_backend(backend), dtype)
            return
        self.dtype, self.model = self._choose(model.eval(), dtype)
        parts = ("encoder", "decoder") if self.config.has_encoder else ("decoder",)
        self.info = {p: {"backend": "torch", "dtype": self.dtype, "why": f"backend='torch', dtype={dtype!r}"}
                     for p in parts}

    # ---- dtype / mode ---------------------------------------------------------------------------
    def _prepare(self, model: VQGAN, name: str) -> VQGAN:
        if self.device.type == "cuda" or not model.cfg.has_encoder:
            return model.to(self.device).prepare(_DTYPES[name])
        # on CPU a reduced dtype is a decode mode: the encoder stays fp32 so tokens are exactly fp32's
        full = model.encoder, model.quant_conv
        model.encoder = model.quant_conv = None
        model = model.to(self.device).prepare(_DTYPES[name])
        model.encoder, model.quant_conv = (m.to(self.device).float().to(memory_format=torch.channels_last)
                                           for m in full)
        return model

    def _choose(self, model: VQGAN, dtype) -> tuple[str, VQGAN]:
        name = _ALIASES.get(dtype, dtype)
        if name != "auto":
            if name not in _DTYPES:
                raise ValueError(f"dtype={dtype!r} is not supported; use 'auto', 'fp32', 'bf16' or 'fp16'")
            if name == "fp16" and self.device.type == "cpu":
                raise ValueError("dtype='fp16' runs on CUDA only (CPUs have no fast fp16 convolutions); "
                                 "use 'bf16' or 'fp32' on CPU")
            return name, self._prepare(model, name)
        if self.device.type == "cuda":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), self._prepare(
                model, "bf16" if torch.cuda.is_bf16_supported() else "fp16")
        if not has_fast_bf16():
            return "fp32", self._prepare(model, "fp32")
        fp32 = self._prepare(model, "fp32")
        low = self._prepare(copy.deepcopy(model), "bf16")
        ids = self._probe_tokens(fp32)
        with torch.inference_mode():
            quality = psnr(_to_unit(fp32.decode(ids), self.config), _to_unit(low.decode(ids), self.config))
        self.probe_psnr = quality
        return ("bf16", low) if quality >= AUTO_MIN_PSNR else ("fp32", fp32)

    def _probe_tokens(self, model: VQGAN) -> torch.Tensor:
        """Tokens of two smooth colour fields (natural-image statistics) at an 8 x 8 grid; random
        codes where the model has no encoder."""
        g = torch.Generator().manual_seed(0)
        side = 8 * self.config.factor
        if not self.config.has_encoder:
            return torch.randint(0, self.config.n_embed, (2, 8, 8), generator=g).to(self.device)
        low = torch.rand(2, 3, 4, 4, generator=g)
        px = torch.nn.functional.interpolate(low, size=(side, side), mode="bicubic", align_corners=False)
        with torch.inference_mode():
            return model.encode(self._to_model_range(px.clamp(0, 1).to(self.device)))

    # ---- images -> tokens -----------------------------------------------------------------------
    def preprocessor(self, size: int | None = None) -> ImagePreprocessor:
        size = self.config.resolution if size is None else size
        f = self.config.factor
        if isinstance(size, bool) or not isinstance(size, int) or size < f or size % f:
            raise ValueError(f"size must be a positive multiple of the model's factor {f}, got {size!r}; "
                             f"e.g. size={max(f, (int(size) // f) * f) if isinstance(size, (int, float)) else 256}")
        return ImagePreprocessor(image_size=size, mean=self._mean, std=self._std)

    def encode(self, images, *, size: int | None = None, batch_size: int = 4) -> torch.Tensor:
        """Images -> int64 tokens [B, size/f, size/f] on CPU.

        `images`: a path, bytes, PIL image, uint8 HWC array or uint8/[0, 1] float tensor, or a list
        of them (see `mmfast.preprocess.ImagePreprocessor`); shorter side resized to `size`, centre
        crop. `batch_size` bounds the activations held at once (memory), not the result size.
        """
        self._require_encoder()
        pre = self.preprocessor(size)
        items = images if isinstance(images, (list, tuple)) else [images] if not _is_batch(images) else images
        out = []
        for i in range(0, len(items), _check_batch_size(batch_size)):
            px = pre(items[i:i + batch_size])                        # model range already
            with torch.inference_mode():
                out.append(self.model.encode(px.to(self.device)).cpu())
        if not out:
            raise ValueError("images is empty; pass at least one image")
        return torch.cat(out)

    def encode_pixels(self, pixels: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
        """Float pixels [B, 3, H, W] in [0, 1] (H, W multiples of the factor) -> tokens [B, H/f, W/f]."""
        self._require_encoder()
        f = self.config.factor
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3 \
                or not pixels.is_floating_point():
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"pixels must be a float tensor [B, 3, H, W] in [0, 1], got {got}; "
                             "use encode() for files, PIL images or uint8 arrays")
        if pixels.shape[2] % f or pixels.shape[3] % f or 0 in pixels.shape:
            raise ValueError(f"pixels: H and W must be positive multiples of the factor {f}, got "
                             f"{tuple(pixels.shape[2:])}; crop or resize them (encode() does it for you)")
        out = []
        for i in range(0, pixels.shape[0], _check_batch_size(batch_size)):
            with torch.inference_mode():
                x = self._to_model_range(pixels[i:i + batch_size].to(self.device, torch.float32))
                out.append(self.model.encode(x).cpu())
        return torch.cat(out)

    # ---- tokens -> images -----------------------------------------------------------------------
    def embed(self, tokens) -> torch.Tensor:
        """Tokens [B, h, w] -> codebook vectors [B, embed_dim, h, w] float32 (a gather)."""
        ids = self.check_tokens(tokens)
        with torch.inference_mode():
            return self.model.quantize.lookup(ids.to(self.device)).float().cpu()

    def decode_pixels(self, tokens, *, batch_size: int = 4) -> torch.Tensor:
        """Tokens -> float32 pixels [B, 3, h*f, w*f] in [0, 1] (the model's output range mapped)."""
        ids = self.check_tokens(tokens)
        out = []
        for i in range(0, ids.shape[0], _check_batch_size(batch_size)):
            with torch.inference_mode():
                out.append(_to_unit(self.model.decode(ids[i:i + batch_size].to(self.device)), self.config).cpu())
        return torch.cat(out)

    def decode(self, tokens, *, batch_size: int = 4) -> torch.Tensor:
        """Tokens [B, h, w] (or flat [B, h*w] with a square grid) -> uint8 images [B, h*f, w*f, 3].

        Example
        -------
        >>> images = vq.decode(tokens)                  # doctest: +SKIP
        >>> vq.to_pil(images)[0].save("out.png")
        """
        px = self.decode_pixels(tokens, batch_size=batch_size)
        return px.mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def to_pil(images) -> list:
        """uint8 [B, H, W, 3] (from `decode`) -> list of PIL images."""
        from PIL import Image

        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[-1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"to_pil takes the uint8 [B, H, W, 3] tensor that decode() returns, got {got}")
        return [Image.fromarray(a) for a in images.numpy()]

    def check_tokens(self, tokens) -> torch.Tensor:
        """Validate and normalise tokens to an int64 [B, h, w] CPU tensor (see `decode`)."""
        if not isinstance(tokens, torch.Tensor):
            try:
                arr = np.asarray(tokens)
            except (ValueError, TypeError) as e:   # ragged nested lists, objects numpy cannot hold
                raise TypeError(f"tokens must be a rectangular array of integer codebook ids ({e})") from None
            if arr.dtype.kind not in "iub":          # strings, objects, None, dates, ...: never ids
                raise TypeError(f"tokens must be integers (int64 codebook ids), got a numpy {arr.dtype} array"
                                f" from {type(tokens).__name__}")
            t = torch.as_tensor(arr if arr.dtype.kind != "u" or arr.dtype.itemsize < 8 else arr.astype(np.int64))
        else:
            t = tokens
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"tokens must be integers (int64 codebook ids), got {t.dtype}")
        if t.dim() in (1, 2):                        # flat sequences: [n] or [B, n], n = side^2
            n = t.shape[-1]
            side = math.isqrt(n)
            if n == 0 or side * side != n:
                raise ValueError(f"tokens: a flat sequence needs a square number of tokens (e.g. 256 = "
                                 f"16 x 16), got {n} in shape {tuple(t.shape)}; pass a [B, h, w] grid instead")
            t = t.reshape(-1, side, side)
        if t.dim() != 3 or 0 in t.shape:
            raise ValueError(f"tokens must be a [B, h, w] grid (or flat [B, h*w]), got shape {tuple(t.shape)}")
        t = t.detach().cpu().long()
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= self.config.n_embed:
            bad = lo if lo < 0 else hi
            raise ValueError(f"tokens: id {bad} is outside [0, {self.config.n_embed}) (this model's "
                             f"codebook has n_embed={self.config.n_embed} codes)")
        return t

    # ---- helpers --------------------------------------------------------------------------------
    def _to_model_range(self, px: torch.Tensor) -> torch.Tensor:
        lo, hi = self.config.output_range
        return px * (hi - lo) + lo

    def _require_encoder(self) -> None:
        if not self.config.has_encoder:
            raise ValueError("this checkpoint has no encoder (min-dalle's detoker.pt is decoder-only): it "
                             "can decode tokens but not encode images; load a taming VQGAN to encode")

    def __repr__(self) -> str:
        c = self.config
        return (f"VQ({c.quantizer}, f{c.factor}, {c.n_embed} codes x {c.embed_dim}, ch {c.ch}x{list(c.ch_mult)}, "
                f"{self.dtype} on {self.device}" + ("" if self.backend == "torch" else ", " + ", ".join(
                    f"{p} {i['backend']} {i['dtype']}" for p, i in self.info.items())) + ")")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two [0, 1] images (inf when identical)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _to_unit(x: torch.Tensor, cfg: VQConfig) -> torch.Tensor:
    lo, hi = cfg.output_range
    return (x.float().clamp(lo, hi) - lo) / (hi - lo)


def _is_batch(images) -> bool:
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size
