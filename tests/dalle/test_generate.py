"""Generator: seeds per image, the sampling rules, streaming, dtypes and bad arguments."""
import threading

import pytest
import torch

from mmfast.dalle import load_generator
from mmfast.dalle.sampling import sample_next, uniform_noise

SAMPLING = dict(top_k=64, top_p=0.9, temperature=0.8, guidance=4.0)


@pytest.fixture(scope="module")
def gen(tiny):
    return load_generator(tiny[0].parent, device="cpu", dtype="fp32")


def test_seed_per_image_independent_of_batch(gen):
    both = gen.generate_tokens(["a cat", "a dog on the moon"], n=2, seed=5, **SAMPLING)
    alone = gen.generate_tokens("a dog on the moon", n=2, seed=7, **SAMPLING)
    assert torch.equal(both[2:], alone)  # image k of a call has seed + k
    one_by_one = gen.generate_tokens(["a cat", "a dog on the moon"], n=2, seed=[5, 6, 7, 8],
                                     batch_size=1, **SAMPLING)
    assert torch.equal(both, one_by_one)
    assert not torch.equal(both[0], both[1])  # different seeds, different images
    assert ((both >= 0) & (both < 2 ** 14)).all()


def test_unseeded_follows_torch_rng(gen):
    torch.manual_seed(3)
    a = gen.generate_tokens("a cat", **SAMPLING)
    torch.manual_seed(3)
    assert torch.equal(a, gen.generate_tokens("a cat", **SAMPLING))


def _draw(logits_cond, count, **kw):
    """`count` draws (one seed each) from the guided distribution of one row of logits."""
    V = logits_cond.shape[0]
    logits = torch.cat([torch.zeros(count, V), logits_cond.expand(count, V)])  # uncond rows = 0
    args = {"temperature": 1.0, "top_k": V, "top_p": 1.0, "guidance": 1.0, **kw}
    t, k, p, g = (torch.full((count,), args[a], dtype=torch.long if a == "top_k" else torch.float32)
                  for a in ("temperature", "top_k", "top_p", "guidance"))
    tok = sample_next(logits, torch.tensor(7), torch.arange(count) * 7919 + 11, t, k, p, g, max_top_k=V)
    return torch.bincount(tok, minlength=V).float() / count


def test_sampling_follows_the_rules():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 20000
    torch.testing.assert_close(_draw(logits, n), logits.softmax(0), atol=0.015, rtol=0)
    hot = (logits / 0.5).softmax(0)
    torch.testing.assert_close(_draw(logits, n, temperature=0.5), hot, atol=0.015, rtol=0)
    torch.testing.assert_close(_draw(logits, n, top_k=2), torch.tensor([0.625, 0.375, 0, 0]), atol=0.015, rtol=0)
    # top-p 0.7: 0.5 < 0.7 so the second token is needed too, and then the mass reaches 0.8
    torch.testing.assert_close(_draw(logits, n, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]), atol=0.015, rtol=0)
    assert _draw(logits, 100, top_p=0.4)[0] == 1
    # guidance f on unconditioned logits 0: cond * f, i.e. temperature 1 / f
    torch.testing.assert_close(_draw(logits, n, guidance=2.0), (logits * 2).softmax(0), atol=0.015, rtol=0)


def test_noise_is_a_function_of_seed_step_and_token():
    ids = torch.arange(1000).expand(3, -1)
    u = uniform_noise(torch.tensor([0, 1, 2 ** 62 + 5]), torch.tensor(4), ids)
    assert u.shape == (3, 1000) and (u > 0).all() and (u < 1).all()
    assert abs(u.mean() - 0.5) < 0.03 and len(set(u[0].tolist())) > 990
    again = uniform_noise(torch.tensor([2 ** 62 + 5]), torch.tensor(4), ids[:1, 500:])
    assert torch.equal(again, u[2:, 500:])
    assert not torch.equal(uniform_noise(torch.tensor([0]), torch.tensor(5), ids[:1]), u[:1])


def test_callback_streams_partial_tokens(gen, capsys):
    seen = []
    out = gen.generate_tokens(["a cat", "a dog"], seed=1, every=100, callback=lambda s, t: seen.append((s, t)),
                              progress=True, **SAMPLING)
    assert "512/512" in capsys.readouterr().err  # the tqdm bar counts image tokens
    assert [s for s, _ in seen] == [100, 200, 256]
    first = seen[0][1]
    assert first.shape == (2, 256) and torch.equal(first[:, :100], out[:, :100])
    assert (first[:, 100:] == gen.config.start_token).all()
    assert torch.equal(seen[-1][1], out)


def test_threads_share_one_generator(gen):
    want = [gen.generate_tokens("a cat", seed=s, **SAMPLING) for s in (1, 2)]
    got = [None, None]

    def run(i):
        got[i] = gen.generate_tokens("a cat", seed=i + 1, **SAMPLING)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_bf16_keeps_logits_fp32(tiny):
    g = load_generator(tiny[0], device="cpu", dtype="bf16")
    assert g.decoder.new_cache(2)[0].dtype == torch.bfloat16
    assert g.decoder.lm_head.weight.dtype == torch.float32 and g.decoder.final_ln.weight.dtype == torch.float32
    text = g.tokenizer(["a cat"])[0]
    with torch.inference_mode():
        ck, cv, cl = g.decoder.cross_kv(g.encoder(text), text)
        k, v = g.decoder.new_cache(2)
        logits = g.decoder.step(torch.full((2,), 16383), torch.tensor(0), k, v, ck, cv, cl)
    assert logits.dtype == torch.float32 and logits.shape == (2, 2 ** 14) and ck.dtype == torch.bfloat16
    assert g.generate_tokens("a cat", seed=0, top_k=1).shape == (1, 256)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=""), r"prompts\[0\] is empty"),
    (dict(prompts=["a cat", "  "]), r"prompts\[1\] is empty"),
    (dict(prompts=[]), "prompts must be a non-empty"),
    (dict(n=0), "n must be an int >= 1"),
    (dict(n=1.5), "n must be an int"),
    (dict(top_k=0), r"top_k must be an int in \[1, 16384\]"),
    (dict(top_k=16385), r"top_k must be an int in \[1, 16384\]"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=0), "temperature must be a number > 0"),
    (dict(temperature=float("nan")), "temperature must be a number > 0"),
    (dict(guidance=-1), "guidance must be a number >= 0"),
    (dict(seed=-1), "seed must be an int in"),
    (dict(seed=[1, 2]), "a list of 1 ints"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(every=0), "every must be"),
])
def test_bad_arguments_name_themselves(gen, kwargs, match):
    kwargs = {"prompts": "a cat", **kwargs}
    with pytest.raises(ValueError, match=match):
        gen.generate_tokens(kwargs.pop("prompts"), **kwargs)


def test_bad_types(gen):
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str"):
        gen.generate_tokens(["a cat", 3])
    with pytest.raises(TypeError, match="callback must be callable"):
        gen.generate_tokens("a cat", callback=3)
