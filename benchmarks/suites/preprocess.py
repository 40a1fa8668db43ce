"""Image preprocessing: mmfast.ImagePreprocessor vs open_clip's eval transform (the reference).

32 real photos (scikit-image's chelsea, coffee, astronaut, rocket; 300x451 .. 512x512), as PIL
images and as JPEG files; plus 8 camera-size JPEGs (4032x3024), where fast_jpeg matters.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.harness import Case, Provider


def cases(args):
    import tests.torchvision_shim  # noqa: F401 - lets open_clip import torchvision
    import open_clip
    import skimage.data
    import torch
    from PIL import Image

    from mmfast.preprocess import ImagePreprocessor

    ref = open_clip.image_transform(224, is_train=False)
    pre, fast = ImagePreprocessor(), ImagePreprocessor(fast_jpeg=True)
    tmp = Path(tempfile.mkdtemp(prefix="mmfast-bench-"))
    names = ["chelsea", "coffee", "astronaut", "rocket"]
    photos = [Image.fromarray(getattr(skimage.data, n)()) for n in names]
    files = []
    for n, im in zip(names, photos):
        im.save(tmp / f"{n}.jpg", quality=95)
        files.append(tmp / f"{n}.jpg")
    n = 8 if args.quick else 32
    pils, paths = (photos * 8)[:n], (files * 8)[:n]
    yield Case("preprocess", f"N={n} PIL photos -> 224", baseline="open_clip transform", items=n, providers=[
        Provider("open_clip transform", lambda: torch.stack([ref(im) for im in pils]), "fp32"),
        Provider("mmfast", lambda: pre(pils), "fp32"),
    ])
    yield Case("preprocess", f"N={n} JPEG files -> 224", baseline="open_clip transform", items=n, providers=[
        Provider("open_clip transform", lambda: torch.stack([ref(Image.open(p)) for p in paths]), "fp32"),
        Provider("mmfast", lambda: pre(paths), "fp32"),
        Provider("mmfast fast_jpeg", lambda: fast(paths), "fp32"),
    ])
    big = Image.fromarray(skimage.data.coffee()).resize((4032, 3024), Image.Resampling.LANCZOS)
    big.save(tmp / "big.jpg", quality=92)
    bigs = [tmp / "big.jpg"] * (2 if args.quick else 8)
    yield Case("preprocess", f"N={len(bigs)} 4032x3024 JPEG files -> 224", baseline="open_clip transform",
               items=len(bigs), providers=[
        Provider("open_clip transform", lambda: torch.stack([ref(Image.open(p)) for p in bigs]), "fp32"),
        Provider("mmfast", lambda: pre(bigs), "fp32"),
        Provider("mmfast fast_jpeg", lambda: fast(bigs), "fp32"),
    ])
