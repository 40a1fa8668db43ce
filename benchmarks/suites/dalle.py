"""DALL·E mini decoding: mmfast's generator, each mode, vs min-dalle's own token loop, in one process.

Same random weights for everyone (no weights can be downloaded here): min-dalle's DalleBartEncoder /
DalleBartDecoder / VQGanDetokenizer are built at mini size with their constructors' random init,
saved as min-dalle's files (models_root layout) and loaded by `mmfast.load_generator`; the
min-dalle peer runs MinDalle.generate_raw_image_stream's token loop (`decoder.sample_tokens` per
step) on the very modules that were saved. Sampling as min-dalle's defaults: top_k 256,
temperature 1, guidance ("supercondition factor") 16; --quick: the tiny test model, 16 tokens.

Cases
- dalle.generate_tokens, n = 1 and 4 images: one call = all 256 tokens of n images; items/s is
  tokens/s; quality = greedy agreement with fp32 (below). A provider's first call (the harness's
  warmup) decodes 16 tokens only: min-dalle's 256 take minutes.
- dalle.decode_step, one case per provider: one call = 8 steps at positions 124..131 (the average
  attention length), bytes = what a step must read (weights in the provider's format, the valid
  KV-cache positions, the cross K/V; min-dalle: its fp32 weights incl. the cross K/V projections
  it recomputes, and its whole 256-position cache) -> achieved GB/s against the machine's ~39 GB/s.
- dalle.text_to_png: `Generator.generate` (tokens, VQGAN decode, PIL) + PNG encoding, seconds.

Quality (random weights make noise images, so a CLIP score would measure nothing): greedy decoding
(top_k 1, guidance 16, two prompts) in each mode against mmfast with plain fp32 weights (torch's
sgemm): `greedy_identical` = fraction of the 256 tokens identical when each mode runs on its own
tokens, `greedy_first_diff` = first differing step (256: none), `teacher_forced_agree` = fraction of
steps whose greedy choice is identical when both are fed fp32's tokens, `max_abs_dlogit` = largest
logit difference over those steps (logits' std ~0.6 on this model).

Threads: one, for every provider (torch.set_num_threads(1)). On this shared 2-vCPU machine a
second thread made torch's GEMMs 5-10x slower whenever another process held the other vCPU
(both OpenMP threads wait for the slower one at every op), and that is most of the time.
"""
from __future__ import annotations

import copy
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..harness import Case, Provider

PROMPT = "a watercolor painting of a fox in the snow"
QUALITY_PROMPTS = [PROMPT, "portrait of a teacher, oil on canvas"]
SAMPLING = dict(top_k=256, temperature=1.0, guidance=16.0)
MODES = ["auto", "fp16", "int8", "bf16"]           # mmfast dtype= names ("auto": fp32 on CPU)
_G = chr(ord(" ") + 256)                            # BPE's "Ġ" word start


def _min_dalle():
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    import min_dalle  # noqa: F401 - switches autograd off and sets the thread count: put both back
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder, VQGanDetokenizer
    from min_dalle.text_tokenizer import TextTokenizer
    return DalleBartEncoder, DalleBartDecoder, VQGanDetokenizer, TextTokenizer


def _write_models(root: Path, preset: str):
    """min-dalle's modules, random init, saved in its models_root layout; returns them and the tokenizer."""
    from mmfast.dalle import dalle_preset
    Enc, Dec, VQ, TextTokenizer = _min_dalle()
    c = dalle_preset(preset)
    torch.manual_seed(0)
    enc = Enc(layer_count=c.encoder_layers, embed_count=c.width, attention_head_count=c.heads,
              text_vocab_count=c.text_vocab, text_token_count=c.text_tokens, glu_embed_count=c.glu_dim,
              device="cpu").eval().requires_grad_(False)
    dec = Dec(image_vocab_count=c.image_vocab, embed_count=c.width, attention_head_count=c.heads,
              glu_embed_count=c.glu_dim, layer_count=c.decoder_layers, device="cpu").eval().requires_grad_(False)
    vq = VQ().eval().requires_grad_(False)
    # A character-level BART vocabulary (no merges): enough for both tokenizers to agree on ids.
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in [_G] + [chr(i) for i in range(33, 127)]:
        vocab[ch] = len(vocab)
    d = root / "dalle_bart_mini"
    (root / "vqgan").mkdir(parents=True)
    d.mkdir()
    torch.save(enc.state_dict(), d / "encoder.pt")
    torch.save(dec.state_dict(), d / "decoder.pt")
    torch.save(vq.state_dict(), root / "vqgan" / "detoker.pt")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf8")
    (d / "merges.txt").write_text("#version: 0.2\n", encoding="utf8")
    return enc, dec, TextTokenizer(vocab, [])


@torch.inference_mode()
def min_dalle_tokens(enc, dec, tokenizer, text: str, n: int, steps: int, seed: int, top_k=256,
                     temperature=1.0, guidance=16.0) -> torch.Tensor:
    """MinDalle.generate_raw_image_stream's token loop (CPU, fp32), stopped after `steps` tokens."""
    tokens = tokenizer.tokenize(text)[:64]
    text_tokens = torch.ones((2, 64), dtype=torch.long)
    text_tokens[0, :2] = torch.tensor([tokens[0], tokens[-1]])
    text_tokens[1, :len(tokens)] = torch.tensor(tokens)
    encoder_state = enc.forward(text_tokens)
    expanded_indices = [0] * n + [1] * n
    text_tokens = text_tokens[expanded_indices]
    encoder_state = encoder_state[expanded_indices]
    attention_mask = text_tokens.not_equal(1)[:, None, None, :]
    attention_state = torch.zeros(size=(dec.layer_count, n * 4, 256, dec.embed_count))
    image_tokens = torch.full((n, 256 + 1), 2 ** 14 - 1, dtype=torch.long)
    torch.manual_seed(seed)
    token_indices = torch.arange(256)
    settings = torch.tensor([temperature, top_k, guidance], dtype=torch.float32)
    for i in range(steps):
        image_tokens[:, i + 1], attention_state = dec.sample_tokens(
            settings=settings, attention_mask=attention_mask, encoder_state=encoder_state,
            attention_state=attention_state, prev_tokens=image_tokens[:, [i]], token_index=token_indices[[i]])
    return image_tokens[:, 1:steps + 1]


def _mmfast_tokens(gen, text: str, n: int, steps: int, seed: int, top_k=256, temperature=1.0, guidance=16.0):
    """`gen.generate_tokens` (the public call) for 256 tokens; its loop stopped early for fewer."""
    if steps == gen.config.image_tokens:
        return gen.generate_tokens(text, n=n, seed=seed, top_k=top_k, temperature=temperature, guidance=guidance)
    from mmfast.dalle.generate import decode_step
    cfg = gen.config
    with torch.inference_mode():
        t = gen.tokenizer([text]).flatten(0, 1)
        ck, cv, cl = gen.decoder.cross_kv(gen.encoder(t), t)
        rows = torch.tensor([0] * n + [1] * n)
        ck, cv, cl = ck[:, rows], cv[:, rows], cl[rows]
        k, v = gen.decoder.new_cache(2 * n)
        full = lambda x, dt=torch.float32: torch.full((n,), x, dtype=dt)  # noqa: E731
        params = (full(temperature), full(top_k, torch.long), full(1.0), full(guidance))
        prev, seeds, out = full(cfg.start_token, torch.long), torch.arange(n) + seed, []
        for i in range(steps):
            prev = decode_step(gen.decoder, prev, torch.tensor(i), k, v, ck, cv, cl, seeds, *params, max_top_k=top_k)
            out.append(prev)
    return torch.stack(out, 1)


def _warm_first(run_full, run_short):
    """A provider function whose first call (the harness's warmup) is the short run."""
    calls = [0]

    def fn():
        calls[0] += 1
        return (run_short if calls[0] == 1 else run_full)()
    return fn


@torch.inference_mode()
def _greedy(encoder, decoder, tokenizer, prompts, steps: int, forced=None):
    """Greedy (guidance 16) tokens [P, steps] and fp32 logits [2P, steps, V]; `forced` feeds given tokens."""
    P = len(prompts)
    t = tokenizer(prompts).flatten(0, 1)
    ck, cv, cl = decoder.cross_kv(encoder(t), t)
    rows = torch.cat([torch.arange(P) * 2, torch.arange(P) * 2 + 1])   # [uncond of each; cond of each]
    ck, cv, cl = ck[:, rows], cv[:, rows], cl[rows]
    k, v = decoder.new_cache(2 * P)
    prev, toks, logits = torch.full((P,), decoder.cfg.start_token), [], []
    for i in range(steps):
        lg = decoder.step(prev.repeat(2), torch.tensor(i), k, v, ck, cv, cl)
        toks.append((lg[:P] * (1 - 16.0) + lg[P:] * 16.0).argmax(1))
        logits.append(lg)
        prev = toks[-1] if forced is None else forced[:, i]
    return torch.stack(toks, 1), torch.stack(logits, 1)


def _agreement(gen, ref_tokens, ref_logits, steps: int) -> dict:
    free, _ = _greedy(gen.encoder, gen.decoder, gen.tokenizer, QUALITY_PROMPTS, steps)
    forced, logits = _greedy(gen.encoder, gen.decoder, gen.tokenizer, QUALITY_PROMPTS, steps, forced=ref_tokens)
    same = free == ref_tokens
    first = [int((~row).nonzero()[0, 0]) if (~row).any() else steps for row in same]
    return {"greedy_identical": float(same.float().mean()), "greedy_first_diff": min(first),
            "teacher_forced_agree": float((forced == ref_tokens).float().mean()),
            "max_abs_dlogit": float((logits - ref_logits).abs().max())}


def step_bytes(decoder, rows: int, pos: int, cross_len: torch.Tensor) -> int:
    """Bytes a mmfast decoding step must read at position `pos`: every step weight once (in its
    format), lm_head's sampled rows, positions 0..pos of the KV cache and the valid cross K/V."""
    from mmfast.quantize import Fp16Linear, Fp32PairLinear, Int8WeightLinear
    per_weight = {Fp32PairLinear: 4, Fp16Linear: 2, Int8WeightLinear: 1}
    c = decoder.cfg
    total = 0
    for name, m in decoder.named_modules():
        if name.startswith("layers.") and ".encoder_attn.k_proj" not in name and ".encoder_attn.v_proj" not in name \
                or name == "lm_head":
            if isinstance(m, torch.nn.Linear):
                rows_read = c.codebook_size if name == "lm_head" else m.out_features
                total += rows_read * m.in_features * m.weight.element_size()
            elif type(m) in per_weight:
                total += m.out_features * m.in_features * per_weight[type(m)]
    item = decoder.dtype.itemsize
    total += c.decoder_layers * rows * c.heads * (pos + 1) * c.head_dim * 2 * item        # self K/V
    total += c.decoder_layers * int(cross_len.sum()) * c.heads * c.head_dim * 2 * item    # cross K/V
    return total


def min_dalle_step_bytes(dec, rows: int, text_len: int) -> int:
    """min-dalle's step: all decoder weights in fp32 (cross K/V projections every step, lm_head's
    16385 rows), its whole 256-position fp32 cache and the fp32 encoder state in every layer."""
    weights = sum(p.numel() for n, p in dec.named_parameters() if n.startswith("layers.") or n == "lm_head.weight")
    return 4 * (weights + dec.layer_count * rows * (2 * 256 * dec.embed_count + text_len * dec.embed_count))


def cases(args):
    from mmfast.dalle import load_generator
    from mmfast.dalle.load import build_models, load_dalle_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see the module docstring
    preset, steps = ("dalle-tiny", 16) if args.quick else ("dalle-mini", 256)
    root = Path(tempfile.mkdtemp(prefix="mmfast-bench-dalle-"))
    md_enc, md_dec, md_tok = _write_models(root, preset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gens = {m: load_generator(root, device="cpu", dtype=m) for m in MODES}
        # fp32 without packing: torch's own sgemm, the reference of the agreement columns
        ref_enc, ref_dec, ref_tok = (m.requires_grad_(False) if isinstance(m, torch.nn.Module) else m
                                     for m in build_models(load_dalle_checkpoint(root)))
        _, head8_dec, _ = build_models(load_dalle_checkpoint(root))
    for g in gens.values():  # one fp32 encoder for every mode that runs it in fp32 (~0.8 GB each)
        if g.dtype == torch.float32:
            g.encoder = ref_enc
    plain = copy.copy(gens["auto"])
    plain.decoder = ref_dec
    head8 = copy.copy(gens["int8"])  # int8 weights and an int8 lm_head: the issue asks what it costs
    head8.decoder = head8_dec.pack_weights("int8", head="int8")
    extra = {"torch_threads": 1, "preset": preset, "tokens": steps, "sampling": "top_k 256, T 1, guidance 16"}

    # Quality: greedy agreement with plain fp32 (shared by both image counts: greedy images are identical)
    ref_tokens, ref_logits = _greedy(ref_enc, ref_dec, ref_tok, QUALITY_PROMPTS, steps)
    quality = {m: _agreement(g, ref_tokens, ref_logits, steps) for m, g in gens.items()}
    head8_quality = _agreement(head8, ref_tokens, ref_logits, steps)
    md_greedy = torch.cat([min_dalle_tokens(md_enc, md_dec, md_tok, p, 1, steps, 0, top_k=1) for p in QUALITY_PROMPTS])
    md_quality = {"greedy_identical": float((md_greedy == ref_tokens).float().mean())}
    providers = {f"mmfast {g.mode}{' (auto)' if m == 'auto' else ''}": (g, quality[m]) for m, g in gens.items()}
    for n in ([1, 2] if args.quick else [1, 4]):
        def md_run(k, n=n):
            return lambda: min_dalle_tokens(md_enc, md_dec, md_tok, PROMPT, n, k, 0, **SAMPLING)

        def mm_run(g, k, n=n):
            return lambda: _mmfast_tokens(g, PROMPT, n, k, 0, **SAMPLING)

        short = min(16, steps)
        ps = [Provider("min-dalle loop (fp32)", _warm_first(md_run(steps), md_run(short)), "fp32", md_quality)]
        ps.append(Provider("mmfast fp32, torch sgemm (unpacked)", _warm_first(mm_run(plain, steps), mm_run(plain, short)),
                           "fp32", {"greedy_identical": 1.0}))
        for name, (g, q) in providers.items():
            ps.append(Provider(name, _warm_first(mm_run(g, steps), mm_run(g, short)), g.mode, q))
        yield Case("dalle.generate_tokens", f"{preset} n={n} {steps} tokens", ps, baseline="min-dalle loop (fp32)",
                   items=n * steps, extra=extra)

        # GB/s: 8 steps at mid-run positions, one case per provider (each reads different bytes)
        for name, g, q in [("mmfast fp32, torch sgemm (unpacked)", plain, {}),
                           *((k, g, {}) for k, (g, _) in providers.items()),
                           ("mmfast int8, int8 lm_head", head8, head8_quality)]:
            yield _step_case(name, g, n, preset, {**extra, **q})
        yield _min_dalle_step_case(md_enc, md_dec, md_tok, n, preset, extra)

    for n in ([1, 2] if args.quick else [1, 4]):
        ps = []
        for name, (g, _) in providers.items():
            if name.endswith("(auto)") or g.mode == "int8":
                ps.append(Provider(name, lambda g=g, n=n: _png(g, n), g.mode))
        yield Case("dalle.text_to_png", f"{preset} n={n} 256 tokens + VQGAN + PNG", ps, baseline=ps[0].name,
                   items=n, extra={**extra, "tokens": 256, "vqgan_decode_s": _vq_seconds(gens["auto"], n)})
    torch.set_num_threads(threads)


def _step_case(name, gen, n, preset, extra):
    cfg, R = gen.config, 2 * n
    with torch.inference_mode():
        t = gen.tokenizer([PROMPT]).flatten(0, 1)
        ck, cv, cl = gen.decoder.cross_kv(gen.encoder(t), t)
        rows = torch.tensor([0] * n + [1] * n)
        ck, cv, cl = ck[:, rows], cv[:, rows], cl[rows]
    k, v = gen.decoder.new_cache(R)
    positions = range(124, 132)
    prev = torch.full((R,), 5)

    def run():
        with torch.inference_mode():
            for p in positions:
                gen.decoder.step(prev, torch.tensor(p), k, v, ck, cv, cl)

    nbytes = sum(step_bytes(gen.decoder, R, p, cl) for p in positions)
    return Case("dalle.decode_step", f"{preset} R={R} (n={n}) pos 124..131", [Provider(name, run, gen.mode)],
                baseline=name, items=len(positions) * n, bytes=nbytes,
                extra={**extra, "MB_per_step": nbytes / len(positions) / 1e6})


def _min_dalle_step_case(enc, dec, tokenizer, n, preset, extra):
    tokens = tokenizer.tokenize(PROMPT)[:64]
    text = torch.ones((2, 64), dtype=torch.long)  # min-dalle's encoder takes exactly these 2 rows
    text[0, :2] = torch.tensor([tokens[0], tokens[-1]])
    text[1, :len(tokens)] = torch.tensor(tokens)
    with torch.inference_mode():
        state = enc.forward(text)[[0] * n + [1] * n]
    mask = text[[0] * n + [1] * n].not_equal(1)[:, None, None, :]
    att = torch.zeros(dec.layer_count, n * 4, 256, dec.embed_count)
    prev = torch.full((n, 1), 5)
    settings = torch.tensor([1.0, 256, 16.0])
    positions = range(124, 132)

    def run():
        with torch.inference_mode():
            for p in positions:
                dec.sample_tokens(settings=settings, attention_mask=mask, encoder_state=state,
                                  attention_state=att, prev_tokens=prev, token_index=torch.tensor([p]))

    nbytes = len(positions) * min_dalle_step_bytes(dec, 2 * n, 64)
    name = "min-dalle loop (fp32)"
    return Case("dalle.decode_step", f"{preset} R={2 * n} (n={n}) pos 124..131", [Provider(name, run, "fp32")],
                baseline=name, items=len(positions) * n, bytes=nbytes,
                extra={**extra, "MB_per_step": nbytes / len(positions) / 1e6})


def _png(gen, n: int):
    images = gen.generate(PROMPT, n=n, seed=0, **SAMPLING)
    for im in images:
        im.save(io.BytesIO(), format="PNG")
    return images


def _vq_seconds(gen, n: int) -> float:
    tokens = torch.randint(0, gen.config.codebook_size, (n, gen.config.image_tokens))
    gen.vq.decode(tokens)
    t = time.perf_counter()
    gen.vq.decode(tokens)
    return time.perf_counter() - t
