"""mmfast.load_vq / VQ: every input kind, micro-batching, dtype modes, threads, bad input, CLI."""
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import mmfast
from mmfast.cli import main as cli
from mmfast.vqgan import VQ, VQGAN, VQConfig
from mmfast.vqgan import runtime as vq_runtime

TINY = VQConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                z_channels=16, embed_dim=8, n_embed=97)


def _model(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    m = VQGAN(cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def vq():
    return VQ(_model(), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A taming run folder: ckpts/last.ckpt (Lightning layout, loss.* junk) + configs/model.yaml."""
    d = tmp_path_factory.mktemp("taming_run")
    (d / "ckpts").mkdir()
    (d / "configs").mkdir()
    sd = {**_model().state_dict(), "loss.discriminator.main.0.weight": torch.zeros(3)}
    torch.save({"state_dict": sd, "epoch": 3}, d / "ckpts" / "last.ckpt")
    dd = dict(double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
              num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    model_yaml = {"model": {"target": "taming.models.vqgan.VQModel",
                            "params": {"embed_dim": 8, "n_embed": 97, "ddconfig": dd}}}
    (d / "configs" / "model.yaml").write_text(yaml.safe_dump(model_yaml))
    return d


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8), "L")]


def test_encode_every_input_kind_and_micro_batches(vq, tmp_path):
    images = _images()
    path = tmp_path / "a.png"
    Image.fromarray(images[0]).save(path)
    tokens = vq.encode(images)
    assert tokens.shape == (3, 8, 8) and tokens.dtype == torch.int64
    assert torch.equal(vq.encode(images, batch_size=1), tokens)          # micro-batching is exact
    assert torch.equal(vq.encode(str(path)), tokens[:1])                  # a path, alone
    assert torch.equal(vq.encode(images[0]), tokens[:1])                  # one array, alone
    # the documented transform: shorter side to size, centre crop -> pixels in [0, 1] -> encode_pixels
    px = vq.preprocessor()(images) * 0.5 + 0.5
    assert torch.equal(vq.encode_pixels(px), tokens)
    assert vq.encode(images[:1], size=64).shape == (1, 16, 16)            # any multiple of the factor


def test_decode_embed_and_pil(vq):
    tokens = torch.randint(0, 97, (3, 5, 7))
    images = vq.decode(tokens)
    assert images.shape == (3, 20, 28, 3) and images.dtype == torch.uint8
    px = vq.decode_pixels(tokens)
    assert px.shape == (3, 3, 20, 28) and 0 <= px.min() and px.max() <= 1
    assert torch.equal(images, px.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1))
    # oneDNN sums convolutions in a batch-size-dependent order (~3e-6): a uint8 pixel may round apart by 1
    assert (vq.decode(tokens, batch_size=2).int() - images.int()).abs().max() <= 1
    assert torch.equal(vq.decode(tokens.reshape(3, 35)[:, :25]), vq.decode(tokens.reshape(3, 35)[:, :25].reshape(3, 5, 5)))
    assert torch.equal(vq.decode(tokens.numpy()), images)                 # numpy in
    emb = vq.embed(tokens)
    torch.testing.assert_close(emb, vq.model.quantize.embedding.weight[tokens].permute(0, 3, 1, 2).float())
    pil = vq.to_pil(images)
    assert len(pil) == 3 and pil[0].size == (28, 20) and pil[0].mode == "RGB"


def test_bad_input_is_named(vq):
    with pytest.raises(ValueError, match=r"id 97 is outside \[0, 97\)"):
        vq.decode(torch.full((1, 4, 4), 97))
    with pytest.raises(ValueError, match=r"id -1 is outside"):
        vq.decode(torch.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="square number of tokens"):
        vq.decode(torch.zeros(2, 255, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        vq.decode(torch.zeros(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        vq.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="multiple of the model's factor 4"):
        vq.encode(_images(), size=30)
    with pytest.raises((ValueError, TypeError), match="images|image"):
        vq.encode([object()])
    with pytest.raises(ValueError, match=r"pixels must be a float tensor"):
        vq.encode_pixels(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples of the factor"):
        vq.encode_pixels(torch.zeros(1, 3, 9, 8))
    with pytest.raises(ValueError, match="batch_size"):
        vq.decode(torch.zeros(1, 4, 4, dtype=torch.long), batch_size=0)
    with pytest.raises(ValueError, match="fp16"):
        VQ(_model(), device="cpu", dtype="fp16")
    decoder_only = VQ(VQGAN(TINY.replace(has_encoder=False)), device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="no encoder"):
        decoder_only.encode(_images())


def test_auto_mode_keeps_fp32_unless_bf16_is_fast_and_faithful(monkeypatch):
    monkeypatch.setattr(vq_runtime, "has_fast_bf16", lambda: False)
    assert VQ(_model(), device="cpu", dtype="auto").dtype == "fp32"
    monkeypatch.setattr(vq_runtime, "has_fast_bf16", lambda: True)
    monkeypatch.setattr(vq_runtime, "AUTO_MIN_PSNR", float("inf"))      # no mode can pass: fp32
    assert VQ(_model(), device="cpu", dtype="auto").dtype == "fp32"
    monkeypatch.setattr(vq_runtime, "AUTO_MIN_PSNR", 0.0)               # any mode passes: bf16
    vq = VQ(_model(), device="cpu", dtype="auto")
    assert vq.dtype == "bf16" and vq.probe_psnr > 20
    assert vq.model.encoder.conv_in.weight.dtype == torch.float32       # tokens stay exact on CPU
    ref = VQ(_model(), device="cpu", dtype="fp32")
    imgs = _images()
    assert torch.equal(vq.encode(imgs), ref.encode(imgs))
    tokens = torch.randint(0, 97, (2, 6, 6))
    assert vq_runtime.psnr(vq.decode_pixels(tokens), ref.decode_pixels(tokens)) > 30


def test_threads_match_serial(vq):
    tokens = [torch.randint(0, 97, (1, 6, 6), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    images = _images()
    want = [vq.decode(t) for t in tokens]
    want_enc = vq.encode(images)
    got, errors = [None] * 8, []

    def work(i):
        try:
            got[i] = (vq.decode(tokens[i]), vq.encode(images))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(8):
        assert torch.equal(got[i][0], want[i]) and torch.equal(got[i][1], want_enc)


def test_load_vq_from_a_taming_run(ckpt_dir):
    vq = mmfast.load_vq(ckpt_dir / "ckpts" / "last.ckpt", device="cpu", dtype="fp32")
    assert vq.config == TINY
    ref = VQ(_model(), device="cpu", dtype="fp32")
    tokens = torch.randint(0, 97, (2, 4, 4))
    assert torch.equal(vq.decode(tokens), ref.decode(tokens))
    assert torch.equal(vq.encode(_images()), ref.encode(_images()))


def test_cli_encode_decode(ckpt_dir, tmp_path, capsys):
    paths = []
    for i, im in enumerate(_images()):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im if isinstance(im, np.ndarray) else np.asarray(im)).save(paths[-1])
    model = str(ckpt_dir / "ckpts" / "last.ckpt")
    cli(["vq", "encode", "--model", model, "--dtype", "fp32", *paths, "-o", str(tmp_path / "t.npy")])
    tokens = np.load(tmp_path / "t.npy")
    assert tokens.shape == (3, 8, 8) and tokens.dtype == np.int64
    cli(["vq", "decode", "--model", model, "--dtype", "fp32", str(tmp_path / "t.npy"), "-o", str(tmp_path / "o.png")])
    grid = Image.open(tmp_path / "o.png")
    assert grid.size == (64, 64)                                        # 3 images of 32 px in a 2 x 2 grid
    assert "wrote 3 image(s)" in capsys.readouterr().out
    np.save(tmp_path / "bad.npy", np.full((1, 4, 4), 1000))
    with pytest.raises(SystemExit, match="outside"):
        cli(["vq", "decode", "--model", model, str(tmp_path / "bad.npy"), "-o", str(tmp_path / "x.png")])
