"""mmfast.preprocess against open_clip's eval transform on real photos, for every input kind."""
import dataclasses
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from mmfast.preprocess import OPENAI_STD, ImagePreprocessor

skimage_data = pytest.importorskip("skimage.data")

STD = torch.tensor(OPENAI_STD).view(-1, 3, 1, 1)
ONE_LEVEL = 1 / 255 + 1e-6  # the contract: within one 8-bit level of open_clip, per pixel


@pytest.fixture(scope="module")
def open_clip():
    return pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def photos():
    chelsea = skimage_data.chelsea()  # (300, 451, 3)
    alpha = np.linspace(0, 255, chelsea.shape[1], dtype=np.uint8)[None, :, None].repeat(chelsea.shape[0], 0)
    return {
        "chelsea": chelsea,
        "coffee": skimage_data.coffee(),       # (400, 600, 3)
        "astronaut": skimage_data.astronaut(),  # (512, 512, 3)
        "rocket": skimage_data.rocket(),       # (427, 640, 3)
        "gray": skimage_data.camera(),         # (512, 512), HW
        "rgba": np.concatenate([chelsea, alpha], axis=2),  # (300, 451, 4), alpha varies across
        "odd": np.ascontiguousarray(skimage_data.coffee()[100:137, 100:350]),  # (37, 250, 3)
        "small": np.ascontiguousarray(skimage_data.rocket()[200:350, 300:400]),  # (150, 100, 3)
    }


def ref_transform(open_clip, size=224, **kw):
    return open_clip.image_transform(size, is_train=False, **kw)


def assert_within_one_level(ours: torch.Tensor, ref: torch.Tensor):
    # Compare in un-normalised [0, 1] pixel space: multiply the difference back by std.
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    diff = ((ours - ref) * STD).abs().max().item()
    assert diff <= ONE_LEVEL, f"max pixel difference {diff * 255:.3f} levels"


def as_input(kind: str, arr: np.ndarray, tmp_path):
    if kind == "numpy":
        return arr
    if kind == "pil":
        return Image.fromarray(arr)
    if kind in ("png", "jpeg"):
        path = tmp_path / f"img.{kind}"
        Image.fromarray(arr).save(path, quality=95) if kind == "jpeg" else Image.fromarray(arr).save(path)
        return str(path) if kind == "png" else path  # both str and pathlib.Path
    t = torch.from_numpy(arr)
    if kind == "tensor_hwc":
        return t
    chw = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return chw if kind == "tensor_chw" else chw.float() / 255  # float CHW in [0, 1]


KINDS = ["numpy", "pil", "png", "jpeg", "tensor_chw", "tensor_hwc", "float_chw"]
NAMES = ["chelsea", "coffee", "astronaut", "rocket", "gray", "rgba", "odd", "small"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_open_clip(open_clip, photos, tmp_path, name, kind):
    arr = photos[name]
    if kind == "jpeg" and arr.ndim == 3 and arr.shape[2] == 4:
        pytest.skip("JPEG has no alpha channel")
    if kind == "tensor_hwc" and arr.ndim == 2:
        pytest.skip("a 2-D tensor is HW already (covered by tensor_chw)")
    item = as_input(kind, arr, tmp_path)
    # The reference sees what a user of open_clip would: the decoded file, or the same pixels as PIL.
    ref_img = Image.open(item) if kind in ("png", "jpeg") else Image.fromarray(arr)
    ref = ref_transform(open_clip)(ref_img).unsqueeze(0)
    ours = ImagePreprocessor()(item)
    assert ours.shape == (1, 3, 224, 224)
    assert_within_one_level(ours, ref)


def test_mixed_list_and_batches(open_clip, photos, tmp_path):
    ref_t = ref_transform(open_clip)
    items, refs = [], []
    for i, (kind, name) in enumerate(zip(KINDS * 2, NAMES * 2)):
        (tmp_path / str(i)).mkdir()
        items.append(as_input(kind, photos[name], tmp_path / str(i)))
        refs.append(ref_t(Image.open(items[-1]) if kind in ("png", "jpeg") else Image.fromarray(photos[name])))
    assert_within_one_level(ImagePreprocessor()(items), torch.stack(refs))
    # 4-D batches: NHWC uint8 numpy/tensor, NCHW uint8 tensor, NCHW float tensor.
    crops = np.stack([photos[n][:250, :300, :3] for n in ("chelsea", "coffee", "rocket")])  # (3, 250, 300, 3)
    ref = torch.stack([ref_t(Image.fromarray(c)) for c in crops])
    nchw = torch.from_numpy(crops).permute(0, 3, 1, 2)
    for batch in (crops, torch.from_numpy(crops), nchw, nchw.float() / 255):
        assert_within_one_level(ImagePreprocessor()(batch), ref)


def test_create_model_and_transforms_is_the_same_transform(open_clip, photos):
    preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)[2]
    img = Image.fromarray(photos["rocket"])
    assert_within_one_level(ImagePreprocessor()(img), preprocess(img).unsqueeze(0))


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "1", "YCbCr"])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_pil_modes_and_resize_modes(open_clip, photos, mode, resize_mode):
    img = Image.fromarray(photos["chelsea"]).convert(mode)
    ref = ref_transform(open_clip, 96, resize_mode=resize_mode)(img).unsqueeze(0)
    assert_within_one_level(ImagePreprocessor(image_size=96, resize_mode=resize_mode)(img), ref)


def test_matches_hugging_face_clip_processor(photos):
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPImageProcessor()  # openai/clip-vit-base-patch32's settings
    pre = ImagePreprocessor.from_hf_preprocessor_config(hf.to_dict())
    for name in ("rocket", "gray", "odd"):  # rocket: an odd crop margin, where HF floors
        img = Image.fromarray(photos[name])
        ref = torch.from_numpy(hf(images=img, return_tensors="np")["pixel_values"])
        diff = ((pre(img) - ref) * STD).abs()
        # HF rounds its own way in a few places: a handful of pixels land two levels off.
        assert diff.max().item() <= 2 * ONE_LEVEL and (diff > ONE_LEVEL).float().mean().item() < 1e-4


def test_16bit_is_scaled_not_clipped(photos):
    a16 = photos["gray"].astype(np.uint16) * 257  # the same picture in 16 bits
    pre = ImagePreprocessor(image_size=64)
    expected = pre(photos["gray"])
    torch.testing.assert_close(pre(a16), expected)
    torch.testing.assert_close(pre(Image.fromarray(a16)), expected)  # PIL mode I;16


def test_fast_jpeg_is_close(tmp_path, photos):
    path = tmp_path / "big.jpg"
    Image.fromarray(photos["astronaut"]).resize((1600, 1200), Image.Resampling.BICUBIC).save(path, quality=95)
    exact, fast = ImagePreprocessor()(path), ImagePreprocessor(fast_jpeg=True)(path)
    diff = ((exact - fast) * STD).abs()
    # DCT downscaling then bicubic is not bicubic: close on average, a few edges differ more.
    assert diff.mean().item() < 1 / 255 and diff.max().item() < 32 / 255


def test_out_buffer_and_threads(photos, tmp_path):
    pre = ImagePreprocessor(image_size=32)
    imgs = [photos[n] for n in NAMES]
    expected = pre(imgs)
    Image.fromarray(photos["gray"]).save(tmp_path / "lazy.png")
    lazy = Image.open(tmp_path / "lazy.png")  # not decoded yet; listed three times
    torch.testing.assert_close(pre([lazy, photos["rocket"], lazy, lazy]), expected[[4, 3, 4, 4]], rtol=0, atol=0)
    out = torch.empty(len(imgs), 3, 32, 32)
    assert pre(imgs, out=out) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must be a float32 tensor of shape"):
        pre(imgs, out=torch.empty(1, 3, 32, 32))
    results = [None] * 4

    def run(i):
        results[i] = pre(imgs)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for r in results:
        torch.testing.assert_close(r, expected, rtol=0, atol=0)


def test_configs(open_clip):
    cfg = open_clip.get_model_config("ViT-B-32")
    assert ImagePreprocessor.from_open_clip_config(cfg) == ImagePreprocessor()
    hub = {"model_cfg": {"vision_cfg": {"image_size": 256}},
           "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}}
    assert ImagePreprocessor.from_open_clip_config(hub) == ImagePreprocessor(256, (0.5,) * 3, (0.5,) * 3,
                                                                             resize_mode="squash")
    from open_clip.transform import PreprocessCfg
    pp = dataclasses.asdict(PreprocessCfg(size=336, interpolation="bilinear"))
    assert ImagePreprocessor.from_open_clip_config(pp) == ImagePreprocessor(336, interpolation="bilinear")
    hf = {"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}, "resample": 3,
          "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
          "do_center_crop": True, "image_processor_type": "CLIPImageProcessor"}
    assert ImagePreprocessor.from_hf_preprocessor_config(hf) == ImagePreprocessor(336, crop_offset="floor")
    assert ImagePreprocessor.from_hf_preprocessor_config({"crop_size": 224, "size": 224, "resample": 2}) \
        == ImagePreprocessor(interpolation="bilinear", crop_offset="floor")
    with pytest.raises(ValueError, match="no image size"):
        ImagePreprocessor.from_open_clip_config({"mean": [0.5] * 3})
    with pytest.raises(ValueError, match="interpolation must be one of"):
        ImagePreprocessor(interpolation="cubic")
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocessor(resize_mode="crop")
    with pytest.raises(ValueError, match="mean must have 3 values"):
        ImagePreprocessor(mean=(0.5,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ImagePreprocessor().image_size = 3


def test_errors(tmp_path, photos):
    pre = ImagePreprocessor(image_size=32)
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ValueError, match=r"images\[1\].*nope\.jpg.*cannot read image"):
        pre([photos["gray"], missing])
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"junk\.png.*cannot read image"):
        pre(junk)
    truncated = tmp_path / "half.jpg"
    Image.fromarray(photos["coffee"]).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"half\.jpg.*cannot read image"):
        pre(str(truncated))
    with pytest.raises(TypeError, match=r"images\[2\] has unsupported type builtins\.dict"):
        pre([photos["gray"], photos["gray"], {"not": "an image"}])
    with pytest.raises(ValueError, match="images is empty"):
        pre([])
    with pytest.raises(ValueError, match=r"float pixels must be in \[0, 1\]"):
        pre(torch.full((3, 8, 8), 200.0))
    with pytest.raises(ValueError, match="HW or HWC"):
        pre(np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(TypeError, match="unsupported pixel dtype int64"):
        pre(np.zeros((8, 8), np.int64))
