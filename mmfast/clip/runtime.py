"""The CLIP runtime object: `mmfast.load_clip(...)` -> `Clip`.

It holds the weights once (in the chosen dtype), the tokenizer and the image preprocessor, and
turns images / texts into L2-normalised float32 embeddings. Calls are safe from several threads:
the model is read-only under `torch.inference_mode`, and nothing is cached per call.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import kernels
from ..io import read_json
from .load import load_clip_checkpoint, load_into
from .config import ClipConfig
from .model import CLIP
from ..preprocess import ImagePreprocessor
from ..quantize import has_fast_bf16, has_vnni, quantize_linears_int8, resolve_device
from .tokenizer import ClipTokenizer

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "int8": "int8"}
# "auto" keeps the fastest mode whose embeddings stay this close to fp32's on the loaded weights.
AUTO_MIN_COSINE = 0.999


def load_clip(path, *, name: str | None = None, device="auto", dtype="auto", backend: str | None = None) -> "Clip":
    """Load a CLIP checkpoint (open_clip dir, Hugging Face dir, OpenAI .pt, or bare state dict).

    Parameters
    ----------
    path : str or Path
        A directory or file; see `mmfast.clip.load` for the layouts. "demo": the small CLIP shipped
        in the package (trained here on coloured shapes, English and Russian captions).
    name : str, optional
        Preset name ("ViT-B-32", "ViT-B-32-quickgelu", ...), needed only for bare state dicts.
    device : "auto" | "cpu" | "cuda" | torch.device
        "auto" is CUDA when available, else CPU.
    dtype : "auto" | "fp32" | "bf16" | "fp16" | "int8"
        "auto": fp16 on CUDA; on CPU the fastest of int8 (VNNI CPUs) / bf16 (CPUs with native
        bf16) / fp32 whose embeddings keep cosine >= 0.999 to fp32 on these weights.
    backend : None | "torch" | "onnxruntime" | "tensorrt" | "auto"
        The engine that runs the towers; None (default) is $MMFAST_BACKEND, else "auto". "onnxruntime" exports fp32 ONNX graphs once (checked
        against PyTorch, cached by weights in mmfast's cache folder) and runs them on ORT's CPU
        provider, in fp32 or (dtype="int8", the "auto" choice on VNNI CPUs) with ORT's dynamic int8
        quantization. "auto" probes both engines per tower and keeps the fastest whose embeddings
        keep cosine >= 0.999 to fp32 (measurement cached); `Clip.info` says what it chose and why.
        "tensorrt" (CUDA, `mmfast[tensorrt]`) builds fp16 ("auto") or fp32 engines, cached per GPU.

    Example
    -------
    >>> clip = mmfast.load_clip("open_clip_dir")                      # doctest: +SKIP
    >>> clip.classify(["cat.jpg"], ["cat", "dog"]).argmax(-1)         # doctest: +SKIP
    """
    from ..backends.auto import resolve_backend
    backend = resolve_backend(backend)
    if isinstance(path, str) and path == "demo":
        from ..demo import weights_path
        path = weights_path("clip")
    cfg, sd = load_clip_checkpoint(path, name=name)
    model = CLIP(cfg)
    load_into(model, sd, str(path))
    p = Path(path)
    tokenizer = None
    if p.is_dir() and ((p / "tokenizer.json").exists() or (p / "vocab.json").exists()):
        tokenizer = ClipTokenizer.from_hf_dir(p)
    return Clip(model, device=device, dtype=dtype, tokenizer=tokenizer, backend=backend,
                preprocessor=_preprocessor_for(p, cfg))


def _preprocessor_for(path: Path, cfg: ClipConfig) -> ImagePreprocessor:
    """The checkpoint's own preprocessing (open_clip's preprocess_cfg / HF's processor config)."""
    if path.is_dir() and (path / "preprocessor_config.json").exists():
        return ImagePreprocessor.from_hf_preprocessor_config(read_json(path / "preprocessor_config.json"))
    if path.is_dir() and (path / "open_clip_config.json").exists():
        raw = read_json(path / "open_clip_config.json")
        pp = {**raw.get("preprocess_cfg", {})}
        pp.setdefault("size", cfg.vision.image_size)
        return ImagePreprocessor.from_open_clip_config({"preprocess_cfg": pp})
    return ImagePreprocessor(image_size=cfg.vision.image_size)


class Clip:
    """CLIP image and text towers with their tokenizer and preprocessing. See `load_clip`."""

    def __init__(self, model: CLIP, *, device="auto", dtype="auto", tokenizer=None, preprocessor=None,
                 backend: str = "torch"):
        cfg: ClipConfig = model.cfg
        self.config = cfg
        self.device = resolve_device(device)
        self.tokenizer = tokenizer or ClipTokenizer.default(context_length=cfg.text.context_length)
        self.preprocess = preprocessor or ImagePreprocessor(image_size=cfg.vision.image_size)
        model = model.eval().requires_grad_(False).float()
        self.logit_scale = float(model.logit_scale.exp().clamp(max=100))
        self.backend = backend
        if backend != "torch":  # "onnxruntime" / "auto": mmfast.backends.auto builds the towers
            from ..backends.auto import check_backend, clip_backend
            self.dtype, self.model, self.info = clip_backend(self, model, check_backend(backend), dtype)
            if backend == "auto":
                self.backend = "auto: " + ", ".join(f"{p} {i['backend']} {i['dtype']}" for p, i in self.info.items())
            return
        self.dtype, self.model = self._choose(model, dtype)
        # what runs each tower and why (backend="auto" fills in its measurements)
        self.info = {p: {"backend": "torch", "dtype": self.dtype, "why": f"backend='torch', dtype={dtype!r}"}
                     for p in ("image", "text")}

    # ---- dtype / mode ---------------------------------------------------------------------------
    def _candidates(self) -> list[str]:
        if self.device.type == "cuda":
            return ["fp16"]
        return (["int8"] if has_vnni() else []) + (["bf16"] if has_fast_bf16() else []) + ["fp32"]

    def _choose(self, model: CLIP, dtype) -> tuple[str, CLIP]:
        """Resolve `dtype` to a mode name and return it with the model prepared for it."""
        if isinstance(dtype, torch.dtype):
            dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, dtype)
        if dtype != "auto":
            if dtype not in _DTYPES:
                raise ValueError(f"dtype={dtype!r} is not supported; use one of 'auto', 'fp32', "
                                 f"'bf16', 'fp16', 'int8'")
            name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
            if name == "int8" and self.device.type != "cpu":
                raise ValueError("dtype='int8' runs on CPU only; use dtype='fp16' on CUDA")
            return name, self._prepare(model, name)
        candidates = self._candidates()
        if len(candidates) == 1:
            return candidates[0], self._prepare(model, candidates[0])
        # Measure each candidate against fp32 on a fixed probe (smooth images, varied prompts).
        probe_px, probe_ids = _probe_inputs(self.config, self.tokenizer, self.preprocess)
        with torch.inference_mode():
            ref_i, ref_t = model.encode_image(probe_px), model.encode_text(probe_ids)
            for name in candidates[:-1]:
                m = self._prepare(copy.deepcopy(model), name)
                px = probe_px.to(self.device, torch.float32 if name == "int8" else _DTYPES[name])
                cos = min(F.cosine_similarity(m.encode_image(px).float().cpu(), ref_i).min(),
                          F.cosine_similarity(m.encode_text(probe_ids.to(self.device)).float().cpu(), ref_t).min())
                if cos >= AUTO_MIN_COSINE:
                    return name, m
        return "fp32", self._prepare(model, "fp32")

    def _prepare(self, model: CLIP, name: str) -> CLIP:
        if name == "int8":
            quantize_linears_int8(model.visual.transformer)
            quantize_linears_int8(model.transformer)
            return model
        return model.to(self.device, _DTYPES[name])

    # ---- encoders -------------------------------------------------------------------------------
    @property
    def _param_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "int8" else _DTYPES[self.dtype]

    def encode_images(self, images, *, batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """Images -> [N, embed_dim] float32 embeddings (L2-normalised unless `normalize=False`).

        `images`: a path, PIL image, uint8 HWC array, or tensor, or a list of them (see
        `mmfast.preprocess.ImagePreprocessor`). A float tensor [N, 3, S, S] at the model's own
        resolution S is taken as already preprocessed (normalised) pixels.
        """
        S = self.config.vision.image_size
        if isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4 \
                and images.shape[1] == 3 and images.shape[-2:] == (S, S):
            chunks = (images[i:i + batch_size] for i in range(0, images.shape[0], batch_size))
        elif isinstance(images, (list, tuple)):
            # preprocess chunk by chunk: a long list never holds all its pixels at once
            chunks = (self.preprocess(images[i:i + batch_size]) for i in range(0, len(images), batch_size))
        else:
            pixels = self.preprocess(images)
            chunks = (pixels[i:i + batch_size] for i in range(0, pixels.shape[0], batch_size))
        out = []
        with torch.inference_mode():
            for chunk in chunks:
                out.append(self.model.encode_image(chunk.to(self.device, self._param_dtype)).float().cpu())
        emb = torch.cat(out) if out else torch.empty(0, self.config.embed_dim)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_texts(self, texts, *, batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Texts (str or list of str, any language) -> [N, embed_dim] float32 embeddings."""
        ids = self.tokenizer(texts)
        out = []
        with torch.inference_mode():
            # sort by length so each batch is cut at its own longest prompt (exact: causal attention)
            order = self.model.pool_positions(ids).argsort()
            for i in range(0, ids.shape[0], batch_size):
                sel = order[i:i + batch_size]
                out.append(self.model.encode_text(ids[sel].to(self.device)).float().cpu())
        emb = torch.empty(ids.shape[0], self.config.embed_dim)
        if out:
            emb[order] = torch.cat(out)
        return F.normalize(emb, dim=-1) if normalize else emb

    # ---- tasks ----------------------------------------------------------------------------------
    def similarity(self, images, texts) -> torch.Tensor:
        """Cosine similarities [N_images, N_texts]; accepts raw inputs or embeddings."""
        a = images if _is_embedding(images) else self.encode_images(images)
        b = texts if _is_embedding(texts) else self.encode_texts(texts)
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"embedding sizes differ: images {tuple(a.shape)} vs texts {tuple(b.shape)}")
        return kernels.similarity(a.float(), F.normalize(b.float(), dim=-1))

    def zero_shot_classifier(self, labels: Sequence[str], templates=("a photo of a {}.",)) -> torch.Tensor:
        """[L, D] class embeddings: the normalised mean of each label's prompt embeddings."""
        labels, templates = _check_labels(labels, templates)
        prompts = [t.format(label) for label in labels for t in templates]
        emb = self.encode_texts(prompts).view(len(labels), len(templates), -1)
        return F.normalize(emb.mean(dim=1), dim=-1)

    def classify(self, images, labels: Sequence[str], templates=("a photo of a {}.",)) -> torch.Tensor:
        """Zero-shot class probabilities [N_images, L] with prompt ensembling over `templates`."""
        classifier = self.zero_shot_classifier(labels, templates)
        img = images if _is_embedding(images) else self.encode_images(images)
        logits = kernels.similarity(img, classifier, scale=self.logit_scale)
        return logits.softmax(dim=-1)

    def __repr__(self) -> str:
        v, t = self.config.vision, self.config.text
        return (f"Clip(ViT {v.width}x{v.layers} /{v.patch_size} @{v.image_size}, text {t.width}x"
                f"{t.layers}, embed {self.config.embed_dim}, {self.dtype} on {self.device}, {self.backend})")


def _is_embedding(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point()


def _check_labels(labels, templates):
    if isinstance(labels, str):
        raise TypeError("labels must be a list of strings, got a single string; wrap it: [label]")
    labels = list(labels)
    if not labels:
        raise ValueError("labels is empty; pass at least one class name")
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("templates is empty; pass at least one template such as 'a photo of a {}.'")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(f"templates[{i}]={t!r} must be a string containing '{{}}' for the label")
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise TypeError(f"labels[{i}] is {type(label).__name__}; labels must be strings")
    return labels, templates


def _probe_inputs(cfg: ClipConfig, tokenizer, pre: ImagePreprocessor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic probe batch: two smooth colour fields (natural-image-like statistics), texts."""
    g = torch.Generator().manual_seed(0)
    s = cfg.vision.image_size
    low = torch.rand(2, 3, 8, 8, generator=g)
    px = F.interpolate(low, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    ids = tokenizer(["a photo of a cat.", "a diagram of a transformer model", "кошка на диване", ""])
    return (px - mean) / std, ids
