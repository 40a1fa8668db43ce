"""Regression tests for the bugs the fuzzers found: each one a plain, fast test.

SimilarityIndex's files and ids came first (issue 10's quick probe, then the fuzzers):
"""
import os

import numpy as np
import pytest
import torch

from mmfast import SimilarityIndex


@pytest.fixture
def index():
    return SimilarityIndex(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)))


def test_index_save_to_a_directory_is_refused_and_leaves_no_temp_file(index, tmp_path):
    with pytest.raises(ValueError, match=f"save: '{tmp_path}' is a directory"):
        index.save(tmp_path)
    assert os.listdir(tmp_path) == [] and not [p for p in os.listdir(tmp_path.parent) if ".tmp-" in p]


def test_index_save_into_a_missing_folder_names_it(index, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.* does not exist"):
        index.save(tmp_path / "nope" / "x.safetensors")
    with pytest.raises(TypeError, match="save: path must be"):
        index.save(3)


@pytest.mark.parametrize("content", [b"", b"\x00" * 20, b"\xff" * 8 + b"{}", b"garbage that is not safetensors"])
def test_index_load_of_garbage_names_the_file(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        SimilarityIndex.load(path)


def test_index_load_of_missing_paths_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        SimilarityIndex.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="is a directory"):
        SimilarityIndex.load(tmp_path)


def test_index_load_checks_metadata_and_tensor_dtypes(index, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "i.safetensors"
    base = {"vectors": torch.zeros(2, 4, dtype=torch.float16), "ids": torch.arange(2)}
    meta = {"format": "mmfast.SimilarityIndex/1", "dim": "4", "dtype": "fp16"}
    for tensors, bad_meta, match in [
            (base, {**meta, "dim": "four"}, "bad SimilarityIndex metadata"),
            (base, {**meta, "dtype": "fp64"}, "bad SimilarityIndex metadata"),
            ({**base, "ids": torch.arange(2.0)}, meta, "'ids' is torch.float32"),
            ({**base, "ids": torch.zeros(2, 1, dtype=torch.int64)}, meta, "'ids' is torch.int64 \\(2, 1\\)")]:
        save_file(tensors, path, metadata=bad_meta)
        with pytest.raises(ValueError, match=match):
            SimilarityIndex.load(path)


def test_index_ids_past_int64_are_refused(index):
    index.add(torch.randn(1, 8), ids=[2 ** 63 - 1])
    with pytest.raises(ValueError, match="ids: .* would pass 2\\*\\*63 - 1"):
        index.add(torch.randn(1, 8))                       # consecutive ids would overflow int64
    with pytest.raises(ValueError, match="ids must fit in int64"):
        index.add(torch.randn(1, 8), ids=np.array([2 ** 64 - 1], dtype=np.uint64))  # would wrap to -1
    with pytest.raises(ValueError, match="ids must be 1 integers"):
        index.add(torch.randn(1, 8), ids=["a"])
    with pytest.raises(TypeError, match="vectors must be floating point"):
        index.add(np.array([["x"] * 8], dtype=object))
    assert len(index) == 6


# ---------------------------------------------------------------- checkpoint readers (mmfast.io)

def test_torch_zip_named_safetensors_is_a_value_error(tmp_path):
    from mmfast.io import read_state_dict

    path = tmp_path / "weights.safetensors"           # torch.load hands *.safetensors names to safetensors
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="weights.safetensors.*could not be read"):
        read_state_dict(path)


def _zip_bytes(tmp_path, script: bool) -> bytes:
    path = tmp_path / "m.pt"
    if script:
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    else:
        torch.save({"w": torch.ones(2)}, path)
    return path.read_bytes()


def test_torchscript_with_a_corrupt_code_record_is_a_value_error(tmp_path):
    import zipfile

    from mmfast.io import read_state_dict

    data = bytearray(_zip_bytes(tmp_path, script=True))
    path = tmp_path / "script.pt"
    path.write_bytes(data)
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/code/" in i.filename and i.filename.endswith(".py"))
    local = data[info.header_offset:info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    data[start + 2] ^= 0xFF                           # deflated code: bad data or a CRC mismatch
    path.write_bytes(data)
    with pytest.raises(ValueError, match="script.pt"):
        read_state_dict(path)


def test_zip_with_a_name_that_is_not_utf8_is_a_value_error(tmp_path):
    from mmfast.io import read_state_dict

    data = bytearray(_zip_bytes(tmp_path, script=False))
    central = data.rfind(b"PK\x01\x02")               # torch sets the UTF-8 flag on every name
    data[central + 46] = 0xFF
    path = tmp_path / "names.pt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="names.pt.*corrupt zip"):
        read_state_dict(path)


# ---------------------------------------------------------------- DALL·E tokenizer files

def test_dalle_tokenizer_files_that_are_not_text_or_not_ids(tmp_path):
    import json

    from mmfast.dalle.tokenizer import DalleTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_bytes(b"\xff\xfe#version\n")
    with pytest.raises(ValueError, match="merges.txt is not a UTF-8 text file"):
        DalleTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "vocab.json").write_text(json.dumps({**vocab, "b": "five"}))
    with pytest.raises(ValueError, match="vocab.json: token 'b' has id 'five'"):
        DalleTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 4}))
    with pytest.raises(ValueError, match="vocab.json .* no '<s>' token"):
        DalleTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


# ---------------------------------------------------------------- kernels: every refusal names its argument

def test_kernel_scales_that_are_not_numbers_name_scale():
    from mmfast import kernels

    q, g = torch.randn(2, 4), torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    for fn in (lambda: kernels.similarity_topk(q, g, 2, scale="x"), lambda: kernels.similarity(q, g, scale=[1.0])):
        with pytest.raises(TypeError, match="scale must be a number"):
            fn()
    k = torch.randn(1, 1, 3, 4)
    with pytest.raises(TypeError, match="decode_attention: scale must be a number"):
        kernels.decode_attention(torch.randn(1, 1, 4), k, k, torch.tensor([2]), scale="x")
    with pytest.raises(ValueError, match="k_cache and v_cache: head dim D and cache length T must be >= 1"):
        kernels.decode_attention(torch.randn(1, 1, 0), k[..., :0], k[..., :0], torch.tensor([2]))


def test_prefilter_of_empty_rows_and_group_norm_of_single_values():
    from mmfast import kernels

    with pytest.raises(ValueError, match="similarity_prefilter: gallery rows are empty"):
        kernels.similarity_prefilter(torch.zeros(3, 0, dtype=torch.float16))
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError, match="group_norm_silu: .* one value per group"):
        kernels.group_norm_silu(x, torch.ones(4), torch.zeros(4), groups=4)
    assert kernels.group_norm_silu(x, torch.ones(4), torch.zeros(4), groups=2).shape == x.shape


# ---------------------------------------------------------------- images and devices

def test_extreme_aspect_ratio_does_not_resize_to_gigabytes():
    from PIL import Image

    from mmfast.preprocess import ImagePreprocessor

    pre = ImagePreprocessor(image_size=224)       # 40000 x 1 would resize to 8,960,000 x 224 (2 GB RGB) first
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1, 40000, 3), dtype=np.uint8))
    assert pre(im).shape == (1, 3, 224, 224)
    small = ImagePreprocessor(image_size=16)      # a size whose full resize the test can afford: within 2 levels
    w = 30000
    big = im.resize((w, 1))
    want = np.asarray(big.resize((16 * w, 16), Image.Resampling.BICUBIC).crop((8 * w - 8, 0, 8 * w + 8, 16)))
    got = small(big).mul(torch.tensor(small.std)[:, None, None]).add(torch.tensor(small.mean)[:, None, None])
    got = got.mul(255).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() <= 2


def test_decompression_bomb_headers_and_truncated_lazy_images_are_value_errors():
    import io
    import struct
    import zlib

    from PIL import Image

    from mmfast.preprocess import ImagePreprocessor

    def png(w, h, body=b""):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
            chunk(b"IDAT", body) + chunk(b"IEND", b"")

    pre = ImagePreprocessor(image_size=16)
    for w, h in [(100000, 100000), (10000, 10000)]:   # Pillow refuses the first, only warns about the second
        with pytest.raises(ValueError, match="images\\[0\\] \\(bytes\\): cannot read image: .*MAX_IMAGE_PIXELS|"
                                             "images\\[0\\] \\(bytes\\): cannot read image: DecompressionBomb"):
            pre(png(w, h))
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    lazy = Image.open(io.BytesIO(buf.getvalue()[:80]))   # the header reads; the pixels do not
    with pytest.raises(ValueError, match="images\\[0\\]: cannot decode this PIL image"):
        pre([lazy])


def test_devices_torch_cannot_run_models_on_are_refused():
    from mmfast.quantize import resolve_device

    for device in ("meta", "xpu"):
        with pytest.raises(ValueError, match=f"device='{device}' is not supported"):
            resolve_device(device)


def test_weights_beyond_fp16_range_pack_as_plain_fp32():
    """A (bit-flipped) checkpoint with |w| > 65504: the default fp32 mode's fp16 hi/lo pairs cannot
    hold it; it falls back to the plain fp32 GEMM (same results), and fp16 weights are refused."""
    from mmfast.quantize import pack_weight
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    w[2, 3] = 1e30
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pack_weight(w, "fp32")(x), x @ w.t())
    with pytest.raises(ValueError, match="weights: values beyond fp16's range .* use dtype='fp32'"):
        pack_weight(w, "fp16")
