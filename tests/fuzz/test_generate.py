"""Fuzz VQ.decode (tokens of every dtype / shape / range) and Generator.generate (every argument).

VQ.decode of any accepted token format must equal the decode of the same ids as an int64 [B, h, w]
grid. A generate call that returns must give len(prompts) * n images whose tokens equal, image by
image, a fresh generate_tokens of that image's prompt and seed (the documented guarantee: an image
depends on its prompt and seed only, never on its batch).
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmfast.clip.runtime import Clip
from mmfast.dalle.generate import Generator
from mmfast.dalle.tokenizer import DalleTokenizer
from mmfast.vqgan import VQ
from tests.fuzz import models as M
from tests.fuzz.oracle import run_case


@pytest.fixture(scope="module")
def vq16k():
    return VQ(M.tiny_vq(M.VQ16K_CFG), device="cpu", dtype="fp32", backend="torch")


@pytest.fixture(scope="module")
def gen(vq16k):
    enc, dec = M.tiny_dalle()
    vocab, merges = M.dalle_vocab()
    tok = DalleTokenizer(vocab, merges, text_tokens=M.DALLE_CFG.text_tokens)
    g = Generator(enc, dec, tok, device="cpu", dtype="fp32", backend="torch")
    g.attach_vq(vq16k)
    return g


@pytest.fixture(scope="module")
def clip():
    return Clip(M.tiny_clip(M.CLI_CLIP_CFG), device="cpu", dtype="fp32", backend="torch")


@st.composite
def tokens(draw, n_embed: int):
    b, side = draw(st.integers(0, 3)), draw(st.sampled_from([1, 2, 4, 3]))
    lo, hi = draw(st.sampled_from([(0, n_embed - 1)] * 4 + [(-3, 5), (n_embed - 2, n_embed + 2), (0, 2 ** 40)]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    a = rng.integers(lo, hi + 1, (b, side, side), dtype=np.int64)
    shape = draw(st.sampled_from(["grid", "grid", "flat", "one", "4d"]))
    if shape == "flat":
        a = a.reshape(b, side * side)
    elif shape == "one":
        a = a.reshape(-1)[: draw(st.sampled_from([side * side, 5, 0]))]
    elif shape == "4d":
        a = a[None]
    dtype = draw(st.sampled_from([np.int64, np.int32, np.int16, np.uint8, np.uint64, np.float32, np.bool_,
                                  np.int8]))
    with np.errstate(all="ignore"):
        a = a.astype(dtype)
    form = draw(st.sampled_from(["numpy", "torch", "list"]))
    if form == "torch" and dtype != np.uint64:
        return torch.from_numpy(np.ascontiguousarray(a)), a
    return (a.tolist() if form == "list" else a), a


@given(data=st.data())
def test_vq_decode(vq16k, data):
    vq = vq16k
    value, a = data.draw(tokens(vq.config.n_embed))

    def check(images):
        grid = torch.as_tensor(np.asarray(a).astype(np.int64))
        side = int(round(grid.shape[-1] ** 0.5)) if grid.dim() < 3 else grid.shape[-1]
        lo, hi = vq.config.output_range
        with torch.inference_mode():
            want = vq.model.decode(grid.reshape(-1, side, side)).float()
        want = ((want.clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        assert torch.equal(images, want), "decode differs from the decode of the same ids as an int64 grid"

    run_case("VQ.decode", lambda: vq.decode(value), names=["tokens"], check=check)


NON_NUMERIC = [[[1, 2], [3]], np.array([["a"] * 4]), np.array([[1, 2, 3, 4]], dtype=object), "abcd", None,
               [["1", "2", "3", "4"]], {"a": 1}]


@given(value=st.sampled_from(NON_NUMERIC))
def test_vq_decode_non_numeric_tokens(vq16k, value):
    run_case("VQ.decode (non-numeric tokens)", lambda: vq16k.decode(value), names=["tokens"])


PROMPTS = ["a cat", "the red thing", "a" * 500, "", "   ", "кошка", "🐱 a cat", "a\x00b", "{}", "a cat\n" * 30]


@given(data=st.data())
def test_generate(gen, clip, data):
    h = data.draw(st.booleans())

    def pick(good, *bad):
        return data.draw(st.sampled_from([good] * 2 + list(bad))) if h else good

    prompts = pick(data.draw(st.sampled_from([["a cat"], "the red thing", ["a cat", "a dog"]])),
                   data.draw(st.sampled_from(PROMPTS)), [], [1], ["a cat", None], b"a cat", ("a", "b"))
    n = pick(data.draw(st.integers(1, 2)), 0, -1, True, 1.0, 10 ** 30)
    count = (1 if isinstance(prompts, (str, bytes)) else len(prompts)) * (n if isinstance(n, int) and
                                                                          not isinstance(n, bool) and n > 0 else 1)
    count = min(count, 8)
    seed = pick(data.draw(st.sampled_from([None, 0, 7, 2 ** 62])), -1, 2 ** 63, "7", 1.5, [0] * (count + 1),
                [0, -1][:count], list(range(count)))
    top_k = pick(data.draw(st.sampled_from([1, 2, 256, 2 ** 14])), 0, -1, 2 ** 14 + 1, 2.0, None)
    top_p = pick(data.draw(st.sampled_from([1.0, 0.9, 0.01])), 0.0, 1.5, float("nan"), "1")
    temperature = pick(data.draw(st.sampled_from([1.0, 0.5, 3.0])), 0.0, -1.0, float("inf"), float("nan"))
    guidance = pick(data.draw(st.sampled_from([16.0, 1.0, 0.0])), -1.0, float("inf"), float("nan"), None)
    batch_size = pick(data.draw(st.sampled_from([None, 1, 2])), 0, -2, 1.5)
    rerank = pick(data.draw(st.sampled_from([None, None, clip])), "clip", 3)
    names = ["prompts", "n", "seed", "top_k", "top_p", "temperature", "guidance", "batch_size", "rerank_with"]

    def check(result):
        images, toks = result
        plist = [prompts] if isinstance(prompts, str) else list(prompts)
        assert len(images) == len(plist) * n and toks.shape == (len(plist) * n, M.DALLE_CFG.image_tokens)
        assert all(im.size == (8, 8) and im.mode == "RGB" for im in images)
        i = data.draw(st.integers(0, len(images) - 1))
        info = images[i].info
        again = gen.generate_tokens(info["prompt"], n=1, seed=[info["seed"]], top_k=top_k, top_p=top_p,
                                    temperature=temperature, guidance=guidance)
        assert torch.equal(again[0], toks[i]), f"image {i}: tokens depend on more than its prompt and seed"
        if rerank is not None:
            for p in range(len(plist)):
                scores = [im.info["clip_score"] for im in images[p * n:(p + 1) * n]]
                assert scores == sorted(scores, reverse=True), "reranked images are not best first"

    run_case("Generator.generate", lambda: gen.generate(prompts, n=n, seed=seed, top_k=top_k, top_p=top_p,
                                                        temperature=temperature, guidance=guidance,
                                                        batch_size=batch_size, rerank_with=rerank,
                                                        return_tokens=True),
             names=names, check=check)
