"""Hypothesis strategies for hostile inputs: mutated bytes, pickles that reach for code, hostile images.

Inputs are built once (a checkpoint's bytes, an encoded image) and mutated cheaply per case: a few
bit flips, a truncation, an overwrite, an insertion, with offsets biased towards where the structure
lives (headers, the pickle, a zip's central directory at the end) rather than tensor payloads.
"""
from __future__ import annotations

import builtins
import importlib
import io
import os
import pickle
import struct
import subprocess
import zlib

import numpy as np
from hypothesis import strategies as st
from PIL import Image

HEAD, TAIL = 16384, 8192  # bytes at each end where the structure lives


@st.composite
def offsets(draw, size: int):
    where = draw(st.sampled_from(["head", "head", "tail", "any"]))
    if size <= 1:
        return 0
    if where == "head":
        return draw(st.integers(0, min(size, HEAD) - 1))
    if where == "tail":
        return draw(st.integers(max(0, size - TAIL), size - 1))
    return draw(st.integers(0, size - 1))


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with 1-3 mutations: bit flips, a truncation, an overwrite, an insertion or a deletion."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "overwrite", "insert", "delete", "byte"]))
        n = len(buf)
        if kind == "truncate":
            keep = draw(st.one_of(st.integers(0, 64), st.integers(0, max(n - 1, 0)), offsets(max(n, 1))))
            del buf[min(keep, max(n - 1, 0)):]
            continue
        at = draw(offsets(max(n, 1)))
        if kind == "flip" and n:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and n:
            buf[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("{"), ord("}"), ord("\""), 0x28, 0x2E]))
        elif kind == "overwrite" and n:
            chunk = draw(st.binary(min_size=1, max_size=16))
            buf[at:at + len(chunk)] = chunk
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete" and n:
            del buf[at:at + draw(st.integers(1, 64))]
    return bytes(buf)


def lying_safetensors_header(draw, tensors_bytes: bytes) -> bytes:
    """A safetensors file whose header length, dtype, shape or offsets lie about the payload."""
    n = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(0, 2 ** 40), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "X9", ""]))
    begin = draw(st.integers(0, 2 ** 62))
    end = draw(st.one_of(st.integers(0, 64), st.integers(0, 2 ** 63)))
    header = {f"t{i}": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]} for i in range(n)}
    raw = repr(header).replace("'", '"').encode()
    length = draw(st.one_of(st.just(len(raw)), st.integers(0, 2 ** 64 - 1)))
    return struct.pack("<Q", length) + raw + tensors_bytes


# ---------------------------------------------------------------- pickles that reach for code

class Reduce:
    """Pickles as `func(*args)`: what a malicious checkpoint uses to run code on load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payload_callables(sentinel: str):
    touch = f"open({sentinel!r}, 'w').close()"
    return [
        (os.system, (f"touch {sentinel}",)),
        (builtins.eval, (touch,)),
        (builtins.exec, (touch,)),
        (subprocess.Popen, (["touch", sentinel],)),
        (subprocess.check_output, (["touch", sentinel],)),
        (importlib.import_module, ("mmfast_fuzz_payload",)),
        (builtins.__import__, ("mmfast_fuzz_payload",)),
        (builtins.getattr, (Reduce(importlib.import_module, "os"), "system")),
        (builtins.open, (sentinel, "w")),
        (os.remove, (sentinel,)),
    ]


@st.composite
def payload_objects(draw, sentinel: str, tensors: dict):
    """A checkpoint-like object with a code-running reducer somewhere inside (maybe nested)."""
    func, args = draw(st.sampled_from(payload_callables(sentinel)))
    bomb = Reduce(func, *args)
    for _ in range(draw(st.integers(0, 2))):  # nested: the outer call's argument is itself a call
        outer, _ = draw(st.sampled_from(payload_callables(sentinel)))
        bomb = Reduce(outer, bomb)
    where = draw(st.sampled_from(["top", "value", "wrapper", "list", "dict_key_value"]))
    if where == "top":
        return bomb
    if where == "value":
        return {**tensors, "evil": bomb}
    if where == "wrapper":
        return {"state_dict": tensors, "hyper_parameters": {"args": bomb}}
    if where == "list":
        return {"state_dict": tensors, "callbacks": [1, "x", bomb]}
    return {"state_dict": tensors, "optimizer_states": [{"state": {0: bomb}}]}


def pickle_bytes(obj, protocol: int) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


# ---------------------------------------------------------------- hostile images

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La",
         "I;16", "I;16B", "I;16L"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
           "PPM": ".ppm", "ICO": ".ico", "TGA": ".tga"}
EXTREME_SIZES = [(1, 1), (1, 2), (2, 1), (1, 300), (300, 1), (30000, 1), (1, 30000), (3, 7000)]


@st.composite
def sizes(draw):
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(EXTREME_SIZES))
    return draw(st.integers(1, 48)), draw(st.integers(1, 48))


def pil_image(mode: str, size, seed: int) -> Image.Image:
    """A PIL image in `mode` with random content (palette with transparency for P / PA)."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode in ("I;16", "I;16B", "I;16L"):
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16).astype(">u2" if mode == "I;16B" else "<u2")
        return Image.frombytes(mode, (w, h), a.tobytes())
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32), "F")
    if mode == "I":
        return Image.fromarray(rng.integers(-2 ** 20, 2 ** 20, (h, w), dtype=np.int32), "I")
    if mode == "P":
        im = rgb.quantize(colors=int(rng.integers(2, 17)))
        im.info["transparency"] = int(rng.integers(0, 2))
        return im
    if mode == "PA":
        return rgb.quantize(colors=8).convert("PA")
    return rgb.convert(mode)


def encode(im: Image.Image, fmt: str) -> bytes | None:
    """`im` in file format `fmt`, or None where Pillow cannot write that mode in that format."""
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return buf.getvalue()


def png_claiming(width: int, height: int, body: bytes = b"") -> bytes:
    """A PNG whose IHDR (with a correct CRC) claims width x height; `body` as the IDAT payload."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def bomb_png(width: int, height: int) -> bytes:
    """A small PNG that really decodes to width x height (zeros compress ~1000:1)."""
    row = b"\x00" + b"\x00" * (3 * width)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return png_claiming(width, height, body)


ARRAY_DTYPES = [np.uint8, np.uint8, np.uint16, np.float32, np.float64, np.float16, np.int32, np.int64, np.bool_,
                np.int8, np.complex64]
ARRAY_SHAPES = [(0, 0, 3), (0, 5, 3), (5, 0), (1, 1), (1, 1, 3), (3, 5, 1), (4, 4, 2), (4, 4, 5), (2, 3, 4),
                (1, 300, 3), (300, 1), (5,), (2, 2, 2, 2, 2), (3, 8, 8), (7, 9, 3), (16, 16, 4), (1, 30000, 3)]


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(ARRAY_DTYPES))
    shape = draw(st.sampled_from(ARRAY_SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
        a = rng.random(shape)
        special = draw(st.sampled_from([None, None, np.nan, np.inf, -0.5, 1.5, 255.0]))
        if special is not None and a.size:
            a.flat[draw(st.integers(0, a.size - 1))] = special
        return a.astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, shape, dtype=dtype)
