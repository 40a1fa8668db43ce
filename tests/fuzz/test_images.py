"""Fuzz the image encoders (Clip.encode_images, VQ.encode) with hostile images.

Images come as PIL images in every mode (CMYK, palette with transparency, 16-bit, float, ...), encoded
files in every format Pillow writes (then truncated / bit-flipped, as bytes, paths or lazily opened
PIL images), headers that claim decompression-bomb sizes, extreme aspect ratios (30000 x 1), and
arrays / tensors of every dtype and shape (0 x 0 included). Where an image is readable, the pixels
must equal torchvision's Resize + CenterCrop of the same image (the open_clip / taming transform),
so the embeddings / tokens equal those of the reference pixels.
"""
import io

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from mmfast.clip.runtime import Clip
from mmfast.preprocess import ImagePreprocessor
from mmfast.vqgan import VQ
from tests.fuzz import models as M
from tests.fuzz.mutate import FORMATS, MODES, arrays, bomb_png, encode, mutated, pil_image, png_claiming, sizes
from tests.fuzz.oracle import run_case

torchvision = pytest.importorskip("torchvision")  # tests/conftest.py installs the shim it needs
from torchvision import transforms as T  # noqa: E402

_REF_PIXELS = 2 ** 22  # the reference resizes the whole image first: skip it past this many pixels


@pytest.fixture(scope="module")
def clip():
    return Clip(M.tiny_clip(), device="cpu", dtype="fp32", backend="torch")


@pytest.fixture(scope="module")
def vq():
    return VQ(M.tiny_vq(), device="cpu", dtype="fp32", backend="torch")


class Quiet:
    """An input hypothesis prints by its description, not as megabytes of pixels."""

    def __init__(self, value, what: str, ref=None):
        self.value, self.what, self.ref = value, what, ref

    def __repr__(self):
        return self.what


def _to_8bit_reference(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16"):  # mmfast's documented 16-bit rule: the full range scaled to 8 bits
        a = np.asarray(im).astype(np.uint32)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    return im


def reference_pixels(im: Image.Image, S: int) -> np.ndarray | None:
    """torchvision's Resize(S, bicubic) + CenterCrop(S), then RGB: uint8 [S, S, 3] (None: too big to run)."""
    im = _to_8bit_reference(im)
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if S * int(S * long / short) > _REF_PIXELS:
        return None
    out = T.CenterCrop(S)(T.Resize(S, interpolation=T.InterpolationMode.BICUBIC)(im))
    return np.asarray(out.convert("RGB"))


def _decoded(data: bytes):
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception:  # noqa: BLE001 - unreadable: mmfast must refuse it too
        return None


@st.composite
def hostile_images(draw, tmp_dir):
    kind = draw(st.sampled_from(["pil"] * 3 + ["encoded"] * 4 + ["lazy", "bomb", "array", "array", "tensor",
                                                                  "junk"]))
    seed = draw(st.integers(0, 2 ** 16))
    if kind in ("pil", "encoded", "lazy"):
        mode, size = draw(st.sampled_from(MODES)), draw(sizes())
        if kind != "pil" and size[0] * size[1] > 4096:
            size = (min(size[0], 64), min(size[1], 64))  # encoding 30000 x 1 files each case costs too much
        im = pil_image(mode, size, seed)
        if kind == "pil":
            return Quiet(im, f"PIL {mode} {size}", ref=im)
        fmt = draw(st.sampled_from(sorted(FORMATS)))
        data = encode(im, fmt)
        if data is None:
            return Quiet(im, f"PIL {mode} {size}", ref=im)
        if draw(st.booleans()):
            data = draw(mutated(data))
        what = f"{fmt} of {mode} {size}, {len(data)} bytes"
        ref = _decoded(data)
        if kind == "lazy":
            try:
                return Quiet(Image.open(io.BytesIO(data)), "lazily opened " + what, ref=ref)
            except Exception:  # noqa: BLE001 - not even its header reads: pass the bytes instead
                return Quiet(data, what, ref=ref)
        if draw(st.booleans()):
            return Quiet(data, what, ref=ref)
        path = tmp_dir / f"image{FORMATS[fmt]}"
        path.write_bytes(data)
        return Quiet(path, f"path to {what}", ref=ref)
    if kind == "bomb":
        w, h = draw(st.sampled_from([(100000, 100000), (2 ** 31 - 1, 1), (20000, 20000), (10000, 10000),
                                     (1, 2 ** 31 - 1), (0, 5), (65535, 65535)]))
        data = bomb_png(w, h) if (w, h) == (10000, 10000) else png_claiming(w, h, draw(st.binary(max_size=32)))
        return Quiet(data, f"PNG claiming {w} x {h}")
    if kind == "array":
        a = draw(arrays())
        ok = a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))) and 0 not in a.shape
        ref = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a) if ok else None
        return Quiet(a, f"array {a.dtype} {a.shape}", ref=ref)
    if kind == "tensor":
        a = draw(arrays())
        if a.dtype == np.uint16:
            a = a.astype(np.int32)  # torch has no uint16 <-> numpy image path; an int tensor must be refused
        t = torch.from_numpy(np.ascontiguousarray(a))
        if t.dim() == 3 and draw(st.booleans()):
            t = t.permute(2, 0, 1)  # CHW, torchvision's layout
        return Quiet(t, f"tensor {t.dtype} {tuple(t.shape)}")
    junk = draw(st.sampled_from([None, 3, 2.5, "no/such/file.png", str(tmp_dir), b"", [], (), {}, object(),
                                 [None], "", np.array(7), torch.tensor(7)]))
    return Quiet(junk, f"junk {type(junk).__name__} {junk!r:.40}")


def _check(encode_fn, item: Quiet, S: int, want_shape):
    def check(out):
        empty = isinstance(item.value, (list, tuple)) and not item.value  # Clip: nothing in, nothing out
        want = (0, *want_shape[1:]) if empty else want_shape
        assert isinstance(out, torch.Tensor) and tuple(out.shape) == want, f"shape {tuple(out.shape)}"
        if item.ref is not None:
            ref = reference_pixels(item.ref, S)
            if ref is not None:
                expected = encode_fn([ref])  # the reference pixels, already S x S: no resize, no crop
                assert torch.equal(out, expected), f"{item.what}: differs from torchvision's Resize + CenterCrop"
    return check


@given(data=st.data())
def test_clip_encode_images(clip, tmp_path_factory, data):
    item = data.draw(hostile_images(tmp_path_factory.getbasetemp()))
    images = [item.value] if data.draw(st.booleans()) else item.value
    run_case("Clip.encode_images", lambda: clip.encode_images(images), names=["images"],
             check=_check(clip.encode_images, item, 16, (1, 16)))


@given(data=st.data())
def test_vq_encode(vq, tmp_path_factory, data):
    item = data.draw(hostile_images(tmp_path_factory.getbasetemp()))
    images = [item.value] if data.draw(st.booleans()) else item.value
    run_case("VQ.encode", lambda: vq.encode(images), names=["images"],
             check=_check(vq.encode, item, 16, (1, 8, 8)))


@given(w=st.integers(1, 40000), h=st.integers(1, 3), mode=st.sampled_from(["RGB", "L", "P", "RGBA", "CMYK"]),
       size=st.sampled_from([224, 336, 16]), crop=st.sampled_from(["round", "floor"]), swap=st.booleans())
def test_extreme_aspect_ratios_stay_small(w, h, mode, size, crop, swap):
    """ImagePreprocessor at CLIP's real sizes: a 40000 x 1 image must not resize to gigabytes first."""
    pre = ImagePreprocessor(image_size=size, crop_offset=crop)
    im = Image.new(mode, (h, w) if swap else (w, h), 0 if mode in ("L", "P") else (0,) * len(mode))
    out = run_case("ImagePreprocessor (extreme aspect)", lambda: pre(im), names=["images"])[1]
    assert out.shape == (1, 3, size, size)
