"""Generator.generate: tokens -> VQGAN pixels -> CLIP reranking, previews, the detoker found beside
the checkpoint, the codebook check, and the CLI."""
import numpy as np
import pytest
import torch

import mmfast
from mmfast.clip import Clip, ClipConfig
from mmfast.clip.config import ClipTextConfig, ClipVisionConfig
from mmfast.clip.model import CLIP
from mmfast.dalle import load_generator
from mmfast.vqgan import VQ, VQGAN, VQConfig

# decoder-only f4 VQGAN with the DALL·E codebook size: 16 x 16 tokens -> 64 x 64 pixels
TINY_VQ = VQConfig(resolution=64, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                   z_channels=16, embed_dim=8, n_embed=2 ** 14, norm_eps=1e-5, output_range=(0.0, 1.0),
                   has_encoder=False)


def _vq(cfg=TINY_VQ):
    torch.manual_seed(3)
    m = VQGAN(cfg)
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def gen(tiny):
    g = load_generator(tiny[0], device="cpu", dtype="fp32", vqgan=None)
    g.attach_vq(VQ(_vq(), device="cpu", dtype="fp32"))
    return g


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    cfg = ClipConfig(embed_dim=32, vision=ClipVisionConfig(64, 16, 64, 2, 1, 256),
                     text=ClipTextConfig(width=64, heads=1, layers=2, mlp_dim=256))
    return Clip(CLIP(cfg), device="cpu", dtype="fp32")


def test_images_are_the_vqgan_decode_of_the_tokens(gen):
    images, tokens = gen.generate(["a red apple", "a blue car"], n=2, seed=5, top_k=4, return_tokens=True)
    assert len(images) == 4 and tokens.shape == (4, 256)
    assert torch.equal(tokens, gen.generate_tokens(["a red apple", "a blue car"], n=2, seed=5, top_k=4))
    want = gen.vq.decode(tokens)
    for i, im in enumerate(images):
        assert im.size == (64, 64) and im.mode == "RGB"
        assert torch.equal(torch.from_numpy(np.array(im)), want[i])
    assert [im.info["prompt"] for im in images] == ["a red apple"] * 2 + ["a blue car"] * 2
    assert [im.info["seed"] for im in images] == [5, 6, 7, 8]


def test_rerank_with_clip_orders_each_prompt_best_first(gen, clip):
    prompts = ["a red apple", "a blue car"]
    plain, plain_tokens = gen.generate(prompts, n=3, seed=0, top_k=8, return_tokens=True)
    images, tokens = gen.generate(prompts, n=3, seed=0, top_k=8, rerank_with=clip, return_tokens=True)
    img_emb = clip.encode_images(plain)
    txt_emb = clip.encode_texts(prompts)
    want_scores = (img_emb.view(2, 3, -1) * txt_emb[:, None]).sum(-1)        # (P, n) cosine
    for p in range(2):
        group = images[3 * p:3 * p + 3]
        scores = [im.info["clip_score"] for im in group]
        assert scores == sorted(scores, reverse=True)
        assert all(im.info["prompt"] == prompts[p] for im in group)
        torch.testing.assert_close(torch.tensor(sorted(scores, reverse=True)),
                                   want_scores[p].sort(descending=True).values, atol=1e-5, rtol=1e-5)
    # the tokens follow the images: same rows, permuted within each prompt
    for im, row in zip(images, tokens):
        src = [i for i in range(6) if plain[i].info["seed"] == im.info["seed"]][0]
        assert torch.equal(row, plain_tokens[src])


def test_previews_stream_partial_images(gen):
    seen = []
    gen.generate("a red apple", n=1, seed=1, top_k=4, every=128, callback=lambda step, ims: seen.append((step, ims)))
    assert [s for s, _ in seen] == [128, 256]
    assert all(len(ims) == 1 and ims[0].size == (64, 64) for _, ims in seen)


def test_missing_or_mismatched_vqgan_and_bad_rerank(tiny, gen):
    tokens_only = load_generator(tiny[0], device="cpu", dtype="fp32", vqgan=None)
    with pytest.raises(ValueError, match="no VQGAN"):
        tokens_only.generate("a red apple")
    with pytest.raises(ValueError, match="n_embed=1024.*16384"):
        tokens_only.attach_vq(VQ(_vq(TINY_VQ.replace(n_embed=1024)), device="cpu", dtype="fp32"))
    with pytest.raises(TypeError, match="rerank_with must be a loaded mmfast.Clip"):
        gen.generate("a red apple", rerank_with="clip")
    with pytest.raises(ValueError, match="n must be"):
        gen.generate("a red apple", n=0)


def test_detoker_beside_the_checkpoint_is_attached(tiny, tmp_path):
    """min-dalle's models_root layout: dalle_bart_mini/ + vqgan/detoker.pt (min-dalle's own names)."""
    import shutil
    root = tmp_path / "root"
    shutil.copytree(tiny[0], root / "dalle_bart_mini")
    (root / "vqgan").mkdir()
    sd = _vq(mmfast.vq_preset("min-dalle-f16-16384").replace(ch=32, z_channels=16, embed_dim=8)).state_dict()
    detoker = {("embedding.weight" if k == "quantize.embedding.weight" else k): v for k, v in sd.items()}
    torch.save(detoker, root / "vqgan" / "detoker.pt")
    g = load_generator(root, device="cpu", dtype="fp32")
    assert g.vq is not None and g.vq.config.n_embed == 2 ** 14 and not g.vq.config.has_encoder
    images = g.generate("a red apple", n=1, seed=0, top_k=2)
    assert images[0].size == (256, 256)


def test_cli_generate(tiny, tmp_path, capsys):
    from mmfast.cli import main as cli
    import shutil
    root = tmp_path / "root"
    shutil.copytree(tiny[0], root / "dalle_bart_mini")
    (root / "vqgan").mkdir()
    sd = _vq().state_dict()
    torch.save({("embedding.weight" if k == "quantize.embedding.weight" else k): v for k, v in sd.items()},
               root / "vqgan" / "detoker.pt")
    cli(["generate", "--model", str(root), "a red apple", "-n", "2", "--seed", "0", "--top-k", "4",
         "--dtype", "fp32", "--out", str(tmp_path / "grid.png")])
    from PIL import Image
    assert Image.open(tmp_path / "grid.png").size == (128, 64)
    assert "grid.png" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="top_k"):
        cli(["generate", "--model", str(root), "a red apple", "--top-k", "0", "--out", str(tmp_path / "x.png")])


def test_prompt_with_no_english_left_is_refused(gen):
    with pytest.raises(ValueError, match=r"prompts\[1\].*English"):
        gen.generate_tokens(["a red apple", "красный круг"])
    assert gen.generate_tokens("🍎 apple", seed=0, top_k=1).shape == (1, 256)   # emoji become words
