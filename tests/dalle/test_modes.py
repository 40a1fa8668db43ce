"""Decoder modes (dtype=) against plain fp32, the packed linears against their references, the
decode-attention custom op, and dtype validation."""
import pytest
import torch
import torch.nn.functional as F

from mmfast import kernels
from mmfast.dalle import load_generator
from mmfast.dalle.load import build_models, load_dalle_checkpoint
from mmfast.quantize import Fp16Linear, Fp32PairLinear, Int8WeightLinear, has_fbgemm, pack_weight

from ..tolerance import TOL

pytestmark = pytest.mark.skipif(not has_fbgemm(), reason="the CPU weight formats need torch's fbgemm (x86)")

PROMPTS = ["a photo of an astronaut riding a horse", "Portrait of a teacher -- watercolor"]
# mode -> (largest |logit - fp32 logit| over 256 teacher-forced steps, least fraction of identical
# greedy choices). Measured on the tiny test model (logits' std 0.62): fp16 1.3e-3 / 0.999,
# int8 2.6e-2 / 0.98, bf16 3.1e-2 / 0.95; fp32 (fp16 pairs) 3e-6 / 1.
MODE_TOL = {"fp32": (TOL[torch.float32]["atol"] * 10, 1.0), "fp16": (5e-3, 0.99), "int8": (0.1, 0.95),
            "bf16": (0.1, 0.9)}


@pytest.fixture(scope="module")
def plain(tiny):
    """Encoder, decoder (fp32, unpacked: torch's GEMMs) and tokenizer: the reference."""
    enc, dec, tok = build_models(load_dalle_checkpoint(tiny[0]))
    return enc.requires_grad_(False), dec.requires_grad_(False), tok


@torch.inference_mode()
def greedy(encoder, decoder, tokenizer, forced=None):
    """Greedy tokens (guidance 16) [P, 256] and logits [2P, 256, V]; `forced` feeds these tokens instead."""
    P = len(PROMPTS)
    text = tokenizer(PROMPTS).flatten(0, 1)
    ck, cv, cl = decoder.cross_kv(encoder(text), text)
    rows = torch.cat([torch.arange(P) * 2, torch.arange(P) * 2 + 1])
    ck, cv, cl = ck[:, rows], cv[:, rows], cl[rows]
    k, v = decoder.new_cache(2 * P)
    prev, toks, logits = torch.full((P,), decoder.cfg.start_token), [], []
    for i in range(decoder.cfg.image_tokens):
        lg = decoder.step(prev.repeat(2), torch.tensor(i), k, v, ck, cv, cl)
        toks.append((lg[:P] * -15.0 + lg[P:] * 16.0).argmax(1))
        logits.append(lg)
        prev = toks[-1] if forced is None else forced[:, i]
    return torch.stack(toks, 1), torch.stack(logits, 1)


@pytest.fixture(scope="module")
def reference(plain):
    n = torch.get_num_threads()  # conftest's one-thread fixture covers tests, not module fixtures
    torch.set_num_threads(1)
    yield greedy(*plain)
    torch.set_num_threads(n)


@pytest.mark.parametrize("mode", ["fp32", "fp16", "int8", "bf16"])
def test_mode_against_fp32(tiny, plain, reference, mode):
    gen = load_generator(tiny[0], device="cpu", dtype=mode)
    assert gen.mode == mode and gen.dtype == (torch.bfloat16 if mode == "bf16" else torch.float32)
    want_tokens, want_logits = reference
    tokens, logits = greedy(gen.encoder, gen.decoder, gen.tokenizer, forced=want_tokens)  # teacher forcing
    assert logits.dtype == torch.float32
    atol, agree = MODE_TOL[mode]
    assert (logits - want_logits).abs().max() <= atol
    assert (tokens == want_tokens).float().mean() >= agree
    if mode == "fp32":  # the claim that lets auto pick it: free-running greedy tokens identical
        assert torch.equal(greedy(gen.encoder, gen.decoder, gen.tokenizer)[0], want_tokens)


def test_auto_is_packed_fp32_on_cpu(tiny):
    gen = load_generator(tiny[0], device="cpu")
    assert (gen.mode, gen.dtype) == ("fp32", torch.float32)
    layer = gen.decoder.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp32PairLinear) and layer.self_attn.qkv_proj.out_features == 3 * 128
    assert isinstance(layer.glu.fc01, Fp32PairLinear) and not hasattr(layer.glu, "fc0")
    assert isinstance(layer.encoder_attn.k_proj, torch.nn.Linear)  # once per prompt: left as it is
    assert isinstance(gen.decoder.lm_head, Fp32PairLinear) and gen.decoder.lm_head.out_features == 2 ** 14


def test_int8_image_does_not_depend_on_its_batch(tiny):
    # Weight-only int8 quantizes no activation, so a row's result is its own (fbgemm's dynamic int8
    # would share one activation scale across the batch).
    gen = load_generator(tiny[0], device="cpu", dtype="int8")
    sampling = dict(top_k=64, temperature=0.8, guidance=4.0)
    both = gen.generate_tokens(["a cat", "a dog on the moon"], n=2, seed=5, **sampling)
    assert torch.equal(both[2:], gen.generate_tokens("a dog on the moon", n=2, seed=7, **sampling))


@pytest.mark.parametrize("dtype, device, match", [
    ("int4", "cpu", r"dtype='int4' is not supported; use 'auto', 'fp32', 'bf16', 'fp16' or 'int8'"),
    ("int8", "cuda", r"dtype='int8' \(int8 decoder weights\) is a CPU mode"),
    (torch.int8, "cpu", "is not supported"),
])
def test_bad_dtype_names_the_choices(tiny, dtype, device, match):
    if device == "cuda" and not torch.cuda.is_available():   # the device is refused first, naming it
        match = r"device='cuda' but no CUDA GPU is visible"
    with pytest.raises(ValueError, match=match):
        load_generator(tiny[0], device=device, dtype=dtype)


def test_torch_dtypes_and_aliases(tiny):
    assert load_generator(tiny[0], device="cpu", dtype=torch.float16).mode == "fp16"
    assert load_generator(tiny[0], device="cpu", dtype="bfloat16").mode == "bf16"


# ---- the packed linears against their references, odd shapes ----------------------------------
@pytest.mark.parametrize("M, N, K", [(1, 7, 37), (3, 200, 128), (16, 33, 200)])
def test_packed_linears_match_reference(M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    w = torch.randn(N, K, generator=g) * 0.05
    w[0] = 0  # an all-zero row: scale clamps, pair residual 0
    x = torch.randn(M, K, generator=g)
    want = x.double() @ w.double().T
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Fp32PairLinear(w)(x).double(), want, **tol)
    torch.testing.assert_close(Fp16Linear(w)(x).double(), x.double() @ w.half().double().T, **tol)
    q = Int8WeightLinear(w)
    deq = q.weight                                 # int8 * per-channel scale, fp32
    assert ((deq - w).abs() <= q.scale.float()[:, None] / 2 + 1e-7).all()  # half a step
    torch.testing.assert_close(q(x).double(), x.bfloat16().double() @ deq.double().T, **TOL[torch.bfloat16])
    # 2**-22 relative, or far below fp32 resolution of the largest weight for the smallest ones
    torch.testing.assert_close(Fp32PairLinear(w).weight, w, atol=float(w.abs().max()) * 2 ** -30, rtol=2 ** -21)
    y = Fp32PairLinear(w)(x.view(M, 1, K))         # leading dims pass through
    assert y.shape == (M, 1, N) and y.dtype == torch.float32


def test_pack_weight_checks():
    with pytest.raises(ValueError, match="weight format 'int4' is not one of fp32, fp16, int8"):
        pack_weight(torch.zeros(4, 4), "int4")
    lin = torch.nn.Linear(8, 4, bias=False)
    assert isinstance(pack_weight(lin, "fp16"), Fp16Linear)


# ---- decode attention as a torch.library op: same numbers, no graph break -----------------------
def test_decode_attention_custom_op():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 64, generator=g)
    k, v = (torch.randn(2, 3, 2, 20, 64, generator=g)[1] for _ in range(2))  # a view of a bigger cache
    lengths = torch.tensor([1, 7, 20])
    want = kernels.decode_attention(q, k, v, lengths)
    torch.testing.assert_close(torch.ops.mmfast.decode_attention(q, k, v, lengths, 64 ** -0.5), want,
                               atol=0, rtol=0)
    torch.library.opcheck(torch.ops.mmfast.decode_attention.default, (q, k, v, lengths, 0.125))

    def f(q, k, v, lengths):
        return kernels.decode_attention(q * 2, k, v, lengths, check_lengths=False) + 1

    explained = torch._dynamo.explain(f)(q, k, v, lengths)
    assert explained.graph_break_count == 0
    torch.testing.assert_close(torch.compile(f, backend="eager")(q, k, v, lengths), f(q, k, v, lengths),
                               atol=0, rtol=0)
    torch._dynamo.reset()
