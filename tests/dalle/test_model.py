"""mmfast's DALL·E model against min-dalle's own modules, on the same random weights (fp32, CPU)."""
import pytest
import torch

from mmfast.dalle import load_generator

from ..tolerance import TOL
from .conftest import min_dalle_loop, min_dalle_text_tokens

PROMPTS = ["a photo of an astronaut riding a horse", "Portrait of a teacher -- watercolor 🐱", "word " * 80]


@pytest.fixture(scope="module")
def gen(tiny):
    return load_generator(tiny[0].parent, device="cpu", dtype="fp32")


def test_encoder_matches(tiny, gen):
    _, enc, _, ref_tok, *_ = tiny
    for prompt in PROMPTS:
        text = min_dalle_text_tokens(ref_tok, prompt)
        with torch.no_grad():
            want = enc(text)
        torch.testing.assert_close(gen.encoder(text), want, **TOL[torch.float32])


def test_step_logits_match_min_dalle_loop(tiny, gen):
    # Teacher forcing: both decoders are fed the same (random) previous tokens, so every one of the
    # 256 steps is compared, not only the ones a sampled sequence happens to visit.
    _, enc, dec, ref_tok, *_ = tiny
    n, prompt = 2, PROMPTS[1]
    forced = torch.randint(0, 2 ** 14, (n, 256), generator=torch.Generator().manual_seed(0))
    text = gen.tokenizer([prompt])[0]  # (2, 64): unconditioned, conditioned
    with torch.inference_mode():
        ck, cv, cl = gen.decoder.cross_kv(gen.encoder(text), text)
    rows = torch.tensor([0] * n + [1] * n)
    ck, cv, cl = ck[:, rows], cv[:, rows], cl[rows]
    k_cache, v_cache = gen.decoder.new_cache(2 * n)
    prev = torch.full((n,), 2 ** 14 - 1)
    worst = []

    def compare(i, want):
        nonlocal prev
        with torch.inference_mode():
            got = gen.decoder.step(prev.repeat(2), torch.tensor(i), k_cache, v_cache, ck, cv, cl)
        torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"step {i}: {m}")
        worst.append((got - want).abs().max())
        prev = forced[:, i]

    min_dalle_loop(enc, dec, ref_tok, prompt, n, forced=forced, on_logits=compare)
    assert len(worst) == 256


def test_greedy_tokens_identical(tiny, gen):
    # top_k = 1, guidance 16: no randomness left, so the sequences must be equal token for token;
    # three prompts (one cut at 64 text tokens) with two images each, decoded in one batch.
    _, enc, dec, ref_tok, *_ = tiny
    with pytest.warns(UserWarning, match="text tokens"):
        got = gen.generate_tokens(PROMPTS, n=2, seed=0, top_k=1, guidance=16.0)
    assert got.shape == (6, 256) and got.dtype == torch.long
    for p, prompt in enumerate(PROMPTS):
        want = min_dalle_loop(enc, dec, ref_tok, prompt, 2, top_k=1, guidance=16.0)
        assert torch.equal(got[2 * p: 2 * p + 2], want), prompt
    assert len({tuple(r) for r in got[::2].tolist()}) == 3  # the prompts lead to different images


def test_cross_kv_compacts_padding(gen):
    with pytest.warns(UserWarning, match="prompt 1"):
        text = gen.tokenizer(["a cat", "word " * 80]).flatten(0, 1)
    with torch.inference_mode():
        ck, cv, cl = gen.decoder.cross_kv(gen.encoder(text), text)
    c = gen.config
    assert ck.shape == cv.shape == (c.decoder_layers, 4, c.heads, c.text_tokens, c.head_dim)
    assert cl.tolist() == (text != 1).sum(1).tolist() and cl[3] == 64
