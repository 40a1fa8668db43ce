"""Image preprocessing equal to CLIP's / open_clip's eval transform, without torchvision.

open_clip 3.3 (and OpenAI's `clip`) run, per image: torchvision `Resize(S)` (shorter side to S,
longer side `int(S * long / short)`, PIL bicubic, skipped when the size already matches),
`CenterCrop(S)` (offsets `round((n - S) / 2)`, Python's round), `convert("RGB")`, `ToTensor`,
`Normalize`. The resize happens *before* the RGB conversion, in the image's own mode, so we keep
that order: RGBA is resized premultiplied, palette ("P") and 1-bit images are resized with
nearest (a Pillow rule), exactly like the reference. Deliberate differences: 16-bit images
("I;16*" modes, uint16 arrays) are scaled to 8 bits first (the reference clips them at 255); an image
whose resize would exceed 2**22 pixels (aspect beyond ~80:1 at 224) resizes only the part the crop keeps,
within a few levels of the reference, instead of allocating gigabytes; and files whose header claims
more than `PIL.Image.MAX_IMAGE_PIXELS` pixels are refused before decoding (decompression bombs).

Speed comes from doing the per-image work (decode, resize, crop) in a small thread pool (Pillow
releases the GIL) straight into one uint8 batch, and normalising the batch in one torch op.
"""
from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# HF preprocessor_config.json stores `resample` as Pillow's integer enum.
_HF_RESAMPLE = {int(f): name for name, f in _FILTERS.items()}
_RESIZE_MODES = ("shortest", "longest", "squash")
_PATH_TYPES = (str, os.PathLike)
_SINGLE_ARRAY_NDIM = (2, 3)  # one image; a 4-D array/tensor is a batch
_MAX_RESIZED_PIXELS = 2 ** 22  # larger resize results (aspect > ~80:1 at 224) are cut to the crop first

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _thread_pool() -> ThreadPoolExecutor:
    # One process-wide pool: creating threads per call costs more than resizing a small image.
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="mmfast-pre")
        return _pool


@dataclass(frozen=True)
class ImagePreprocessor:
    """Turns images into the normalised [N, 3, S, S] float32 batch a CLIP-style model expects.

    Accepted images (one, a list/tuple of them, or a batch):

    - file paths (`str`, `pathlib.Path`) and encoded file contents (`bytes`);
    - PIL images in any mode (RGB, RGBA, L, LA, P, CMYK, 1, I;16, ...);
    - numpy uint8 arrays HW or HWC (C = 1, 3, 4), uint16 (16-bit) or float in [0, 1];
      a 4-D numpy array is a batch in NHWC;
    - torch tensors: uint8 CHW or HWC (a 3-D tensor is CHW when its first dim is 1, 3 or 4,
      torchvision's layout, else HWC), float CHW / HW in [0, 1] (rounded to 8 bits first);
      a 4-D tensor is a batch (uint8 NHWC or NCHW by the same rule, float NCHW).

    Examples
    --------
    >>> pre = ImagePreprocessor()                        # OpenAI CLIP ViT-B/32 settings
    >>> x = pre(["cat.jpg", pil_image, uint8_hwc_array])  # x: [3, 3, 224, 224] float32
    """

    # Side of the square the vision tower sees (ViT-B/32: 224, ViT-L/14@336: 336).
    image_size: int = 224
    # Per-channel statistics in [0, 1] units; OpenAI's, which most open_clip models reuse.
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    # Pillow filter of the resize; CLIP was trained with bicubic.
    interpolation: str = "bicubic"
    # open_clip's resize modes: "shortest" (CLIP: short side to S, centre crop), "longest"
    # (long side to S, centre pad with fill_color), "squash" (both sides to S, aspect ignored).
    resize_mode: str = "shortest"
    # Padding value of the "longest" mode, in the image's own pixel units.
    fill_color: int = 0
    # Where the centre crop starts when the margin is odd: "round" (torchvision, so open_clip and
    # OpenAI: round half to even) or "floor" (Hugging Face's CLIPImageProcessor). One pixel apart.
    crop_offset: str = "round"
    # Let the JPEG decoder downscale by 2/4/8 (Pillow's draft) when a file is that much larger
    # than needed: several times faster on camera photos, but pixels then differ from open_clip's
    # by a few levels, so it is off by default.
    fast_jpeg: bool = False

    def __post_init__(self):
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)  # frozen: normalise lists to tuples once
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}, got {self.interpolation!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}")
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"crop_offset must be 'round' or 'floor', got {self.crop_offset!r}")

    @classmethod
    def from_open_clip_config(cls, config: dict) -> "ImagePreprocessor":
        """Build from an open_clip config: a model config (`vision_cfg.image_size`), a hub
        `open_clip_config.json` (`model_cfg` + `preprocess_cfg`) or a `PreprocessCfg` dict.

        Examples
        --------
        >>> ImagePreprocessor.from_open_clip_config(open_clip.get_model_config("ViT-B-32"))
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        pp = {**config, **config.get("preprocess_cfg", {})}
        vision = config.get("vision_cfg") or config.get("model_cfg", {}).get("vision_cfg", {})
        size = pp.get("size", pp.get("image_size", vision.get("image_size")))
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"only square image sizes are supported, got size {size!r}")
            size = size[0]
        if size is None:
            raise ValueError("config has no image size: expected 'size', 'image_size' or 'vision_cfg.image_size'")
        return cls(
            image_size=int(size),
            mean=tuple(pp.get("mean") or OPENAI_MEAN),
            std=tuple(pp.get("std") or OPENAI_STD),
            interpolation=pp.get("interpolation") or "bicubic",
            resize_mode=pp.get("resize_mode") or "shortest",
            fill_color=int(pp.get("fill_color") or 0),
        )

    @classmethod
    def from_hf_preprocessor_config(cls, config: dict) -> "ImagePreprocessor":
        """Build from a Hugging Face `preprocessor_config.json` dict (CLIPImageProcessor).

        Uses `crop_size`, `size.shortest_edge`, `image_mean`, `image_std` and `resample`, and
        HF's crop offset. HF converts to RGB before resizing; we keep open_clip's order, which
        only matters for non-RGB inputs.
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        crop, size = config.get("crop_size"), config.get("size")
        crop = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        if crop is None and size is None:
            raise ValueError("preprocessor config has neither 'crop_size' nor 'size'")
        if size is not None and crop is not None and size != crop:
            raise ValueError(f"size.shortest_edge={size} differs from crop_size={crop}; only the CLIP case "
                             "(resize the short side to the crop size, then centre crop) is supported")
        resample = config.get("resample", int(Image.Resampling.BICUBIC))
        if resample not in _HF_RESAMPLE:
            raise ValueError(f"resample must be one of Pillow's filters {sorted(_HF_RESAMPLE)}, got {resample!r}")
        return cls(
            image_size=int(crop if crop is not None else size),
            mean=tuple(config.get("image_mean") or OPENAI_MEAN),
            std=tuple(config.get("image_std") or OPENAI_STD),
            interpolation=_HF_RESAMPLE[resample],
            crop_offset="floor",
        )

    def __call__(self, images, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Preprocess `images` into a float32 tensor [N, 3, image_size, image_size].

        Parameters
        ----------
        images : one image, a list/tuple of images, or a 4-D batch (see the class docstring).
        out : optional float32 tensor [N, 3, S, S] (e.g. pinned memory) to write the result into.

        Raises
        ------
        ValueError : an empty list, or an image that cannot be read (names the index and path).
        TypeError : an unsupported item type (names the index and the type).
        """
        items = _as_items(images)
        S = self.image_size
        batch = np.empty((len(items), 3, S, S), dtype=np.uint8)  # (N, C, H, W)

        draft = self._resize_size if self.fast_jpeg else None

        def work(i: int) -> None:
            batch[i] = self._resize_crop(_to_pil(items[i], i, draft), i).transpose(2, 0, 1)  # HWC -> CHW

        if len(items) == 1:
            work(0)
        else:
            _load_shared_images(items)
            # list() re-raises the first failure in index order.
            list(_thread_pool().map(work, range(len(items))))
        return self._normalize(torch.from_numpy(batch), out)

    def _resize_size(self, w: int, h: int) -> tuple[int, int]:
        S = self.image_size
        if self.resize_mode == "shortest":  # torchvision Resize(int): long side truncated
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(S * long / short)
            return (S, new_long) if w <= h else (new_long, S)
        if self.resize_mode == "longest":  # open_clip ResizeKeepRatio(longest=1): sides rounded
            ratio = max(w / S, h / S)
            return max(1, round(w / ratio)), max(1, round(h / ratio))
        return S, S

    def _resize_crop(self, im: Image.Image, index: int) -> np.ndarray:
        S = self.image_size
        size = self._resize_size(*im.size)
        try:
            if size[0] * size[1] > max(_MAX_RESIZED_PIXELS, 64 * S * S):
                # An absurd aspect ratio (30000 x 1) would resize to gigabytes before the crop: resize the
                # part the crop keeps only (Pillow's box), within a few levels of the full resize.
                im = im.resize((S, S), _FILTERS[self.interpolation], box=_crop_box(im.size, size, S,
                                                                                   self.crop_offset == "floor"))
            elif size != im.size:
                im = im.resize(size, _FILTERS[self.interpolation])
            im = _center_crop_or_pad(im, S, self.fill_color, self.crop_offset == "floor")
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im)
        except (ValueError, OSError, MemoryError) as e:  # modes Pillow cannot resize or convert (HSV, F, ...)
            raise ValueError(f"images[{index}]: cannot turn a {im.mode!r} image of size {im.size} into RGB "
                             f"pixels ({type(e).__name__}: {e})") from e

    def _normalize(self, batch: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        # The same ops as ToTensor + Normalize (x / 255 - mean) / std, so results match bit for bit.
        if out is None:
            out = batch.float()
        else:
            if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.shape != batch.shape:
                got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"out must be a float32 tensor of shape {tuple(batch.shape)}, got {got}")
            out.copy_(batch)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=out.device).view(1, 3, 1, 1)
        return out.div_(255).sub_(mean).div_(std)


def _crop_box(src: tuple[int, int], resized: tuple[int, int], S: int, floor: bool) -> tuple[float, ...]:
    """The source rectangle that the centre S x S crop of `src` resized to `resized` shows."""
    (w, h), (W, H) = src, resized
    top, left = ((H - S) // 2, (W - S) // 2) if floor else (int(round((H - S) / 2.0)), int(round((W - S) / 2.0)))
    return left * w / W, top * h / H, (left + S) * w / W, (top + S) * h / H


def _center_crop_or_pad(im: Image.Image, S: int, fill: int, floor: bool) -> Image.Image:
    w, h = im.size
    if w < S or h < S:  # torchvision pads (left/top get the smaller half) before cropping
        if im.mode == "P":
            padded = Image.new("P", (max(w, S), max(h, S)), fill)
            padded.putpalette(im.getpalette())
        else:
            bands = len(im.getbands())
            padded = Image.new(im.mode, (max(w, S), max(h, S)), fill if bands == 1 else (fill,) * bands)
        padded.paste(im, ((S - w) // 2 if S > w else 0, (S - h) // 2 if S > h else 0))
        im, (w, h) = padded, padded.size
    if (w, h) == (S, S):
        return im
    if floor:
        top, left = (h - S) // 2, (w - S) // 2
    else:
        top, left = int(round((h - S) / 2.0)), int(round((w - S) / 2.0))
    return im.crop((left, top, left + S, top + S))


def _load_shared_images(items: list) -> None:
    # A lazily decoded PIL image listed twice would be decoded by two threads at once; decode it here.
    seen = set()
    for it in items:
        if isinstance(it, Image.Image):
            if id(it) in seen:
                it.load()
            seen.add(id(it))


def _as_items(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is empty: pass at least one image (a path, PIL image, array or tensor)")
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError(f"images is an empty batch of shape {tuple(images.shape)}")
        return list(images)
    return [images]


def _to_pil(item, index: int, draft) -> Image.Image:
    if isinstance(item, Image.Image):
        try:
            item.load()  # a lazily opened file decodes here: a truncated one fails with its index
        except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, struct.error, ...: Pillow's decoders
            raise ValueError(f"images[{index}]: cannot decode this PIL image: {type(e).__name__}: {e}") from e
        return _from_16bit(item) if item.mode.startswith("I;16") else item
    if isinstance(item, (_PATH_TYPES, bytes)):
        return _open(item, index, draft)
    if isinstance(item, torch.Tensor):
        return _array_to_pil(_tensor_to_hwc(item, index), index)
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, index)
    raise TypeError(f"images[{index}] has unsupported type {type(item).__module__}.{type(item).__qualname__}; "
                    "pass a file path, bytes, PIL image, numpy array or torch tensor")


def _open(src, index: int, draft) -> Image.Image:
    where = f"images[{index}] ({os.fspath(src)!r})" if isinstance(src, _PATH_TYPES) else f"images[{index}] (bytes)"
    try:
        im = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.size[0] * im.size[1] > limit:  # Pillow only warns below twice its limit
            raise ValueError(f"its header claims {im.size[0]} x {im.size[1]} pixels, more than PIL.Image."
                             f"MAX_IMAGE_PIXELS = {limit} (a decompression bomb?); raise that limit to read it")
        if draft is not None and im.format == "JPEG":
            im.draft(im.mode, draft(*im.size))  # decodes at >= the size the resize produces
        im.load()  # decode now, in this worker thread, so errors surface with their index
    except Exception as e:  # noqa: BLE001 - OSError, SyntaxError, DecompressionBombError, struct.error, ...:
        # whatever Pillow's decoders raise on hostile bytes, the image cannot be read
        raise ValueError(f"{where}: cannot read image: {type(e).__name__}: {e}") from e
    return _from_16bit(im) if im.mode.startswith("I;16") else im


def _from_16bit(im: Image.Image) -> Image.Image:
    # Pillow's I;16 -> RGB clips at 255 (a white image); scale the full 16-bit range to 8 bits.
    return Image.fromarray(_to_uint8_from_16(np.asarray(im)), "L")


def _to_uint8_from_16(a: np.ndarray) -> np.ndarray:
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _tensor_to_hwc(t: torch.Tensor, index: int) -> np.ndarray:
    t = t.detach().cpu()
    if t.ndim == 3 and t.dtype == torch.uint8:
        if t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)  # CHW -> HWC
    elif t.ndim == 3 and t.is_floating_point():
        if t.shape[0] not in (1, 3, 4):
            raise ValueError(f"images[{index}]: a float tensor must be CHW with C in (1, 3, 4), got shape "
                             f"{tuple(t.shape)}; permute HWC tensors with .permute(2, 0, 1)")
        t = t.permute(1, 2, 0)
    return t.float().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.numpy()


def _array_to_pil(a: np.ndarray, index: int) -> Image.Image:
    if a.ndim not in _SINGLE_ARRAY_NDIM or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ValueError(f"images[{index}]: an image array must be HW or HWC with C in (1, 3, 4), got shape "
                         f"{a.shape}; for CHW numpy arrays use a.transpose(1, 2, 0)")
    if min(a.shape[:2]) == 0:
        raise ValueError(f"images[{index}]: image has an empty side, shape {a.shape}")
    if a.dtype == np.uint16:
        a = _to_uint8_from_16(a)
    elif np.issubdtype(a.dtype, np.floating):
        lo, hi = float(a.min()), float(a.max())
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise ValueError(f"images[{index}]: float pixels must be in [0, 1], got range [{lo}, {hi}]; "
                             "divide by 255 or pass uint8")
        a = np.rint(a * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise TypeError(f"images[{index}]: unsupported pixel dtype {a.dtype}; pass uint8, uint16 or float in [0, 1]")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(a), {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[2] if a.ndim == 3 else 2])
