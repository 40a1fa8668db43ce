"""DALL·E mini / mega to ONNX: the text encoder and the single decode step with its KV cache.

`dalle_encoder.onnx`: text i64 [batch, 64] -> state [batch, 64, width] (the model dtype). The
cross-attention keys / values of a prompt are then `DalleDecoder.cross_kv(state, text)`, once per
prompt, in PyTorch (a few matmuls): the step graph takes them as inputs.

`dalle_step.onnx` (opset 18: the counter-based sampling noise hashes int64 with BitwiseAnd /
BitwiseXor, which opset 17 lacks; the step holds no GroupNorm). Rows are the decoder's 2 * batch
rows, [unconditioned; conditioned] as `mmfast.dalle.generate.decode_step` lays them out:

    prev i64 [batch]                       the previous token of every image (start_token at pos 0)
    pos i64 []                             this step's position, 0 <= pos < 256
    k_cache, v_cache [layers, rows, heads, 256, head_dim]   model dtype; positions < pos are read
    cross_k, cross_v [layers, rows, heads, 64, head_dim]    from cross_kv (valid positions first)
    cross_len i64 [rows]
    seeds i64 [batch], temperature f32 [batch], top_k i64 [batch], top_p f32 [batch],
    guidance f32 [batch], max_top_k i64 []  (>= every top_k: the candidates' count)
 -> tokens i64 [batch], logits f32 [rows, codebook_size],
    k_cache_out, v_cache_out               the caches with position pos written (one ScatterND each)

Bind `k_cache_out` to the very buffer bound to `k_cache` (ONNX Runtime's IO binding): ScatterND
then writes the one new position in place and copies nothing; this step never reads the cache at
pos, so the order of that write against the attention reads does not matter. Sampling is
`mmfast.dalle.sampling.sample_next`, traced as it is: the same tokens as PyTorch for the same
logits. `dalle_step_logits.onnx` (opset 17) is the same step without the sampling inputs and the
tokens output, for engines without int64 bitwise ops (TensorRT): sample from its logits outside.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .onnx_common import (OPSET, TOLERANCE, as_numpy, check_parity, check_parts, export_graph, file_name,
                          ort_session)

STEP_OPSET = 18
DALLE_PARTS = ("encoder", "step", "step_logits")
SAMPLING = ("seeds", "temperature", "top_k", "top_p", "guidance", "max_top_k")


class _EncoderGraph(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.encoder(text)


def _attend(q, k, v, keep):
    # q: (R, H, Dh); k, v: (R, H, T, Dh); keep: broadcasts to (R, H, 1, T). fp32 math, as decode_attention.
    s = (q.float()[:, :, None] @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5     # (R, H, 1, T)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
    return (p @ v.float())[:, :, 0]                                                     # (R, H, Dh)


def _attend_with_new(q, k_cache, v_cache, past, k, v):
    # Self-attention over the cache's positions < pos plus this step's own key / value, without
    # writing them into the cache first: the cache is updated once, after every layer.
    scale = q.shape[-1] ** -0.5
    qf = q.float()[:, :, None]                                                          # (R, H, 1, Dh)
    s_old = (qf @ k_cache.float().transpose(-1, -2)) * scale                            # (R, H, 1, T)
    s_new = (qf * k.float()[:, :, None]).sum(-1, keepdim=True) * scale                  # (R, H, 1, 1)
    p = torch.softmax(torch.cat([s_old.masked_fill(~past, float("-inf")), s_new], -1), dim=-1)
    out = p[..., :-1] @ v_cache.float() + p[..., -1:] * v.float()[:, :, None]          # (R, H, 1, Dh)
    return out[:, :, 0]


class _StepGraph(nn.Module):
    """`DalleDecoder.step` (+ `sample_next`) as a function of its inputs, the caches returned updated."""

    def __init__(self, decoder, sample: bool):
        super().__init__()
        self.decoder, self.sample = decoder, sample

    def forward(self, prev, pos, k_cache, v_cache, cross_k, cross_v, cross_len, *sampling):
        dec = self.decoder
        cfg = dec.cfg
        tokens = prev.repeat(2)                                                         # (R,)
        x = dec.layernorm_embedding(dec.embed_tokens(tokens) + F.embedding(pos.view(1), dec.embed_positions.weight))
        past = (torch.arange(k_cache.shape[3]) < pos).view(1, 1, 1, -1)                 # positions written before
        keep = (torch.arange(cross_k.shape[3]) < cross_len[:, None]).view(cross_len.shape[0], 1, 1, -1)
        new_k, new_v = [], []
        for i, layer in enumerate(dec.layers):
            sa, ca = layer.self_attn, layer.encoder_attn
            h = layer.pre_self_attn_layer_norm(x)
            q, k, v = (sa.split(p(h)[:, None])[:, :, 0] for p in (sa.q_proj, sa.k_proj, sa.v_proj))  # (R, H, Dh)
            new_k.append(k)
            new_v.append(v)
            a = _attend_with_new(q, k_cache[i], v_cache[i], past, k, v).to(x.dtype)
            x = x + layer.self_attn_layer_norm(sa.out_proj(a.flatten(1)))
            q = ca.split(ca.q_proj(layer.pre_encoder_attn_layer_norm(x))[:, None])[:, :, 0]
            a = _attend(q, cross_k[i], cross_v[i], keep).to(x.dtype)
            x = x + layer.encoder_attn_layer_norm(ca.out_proj(a.flatten(1)))
            x = x + layer.glu(x)
        ln = dec.final_ln
        x = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
        logits = F.linear(x, dec.lm_head.weight[: cfg.codebook_size].float())            # (R, V) fp32
        # one ScatterND per cache: indices (layers, rows, heads) x pos -> this step's (L, R, H, Dh)
        L, R, H = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
        where = (torch.arange(L).view(-1, 1, 1), torch.arange(R).view(1, -1, 1), torch.arange(H).view(1, 1, -1),
                 pos.view(1, 1, 1))
        k_out = torch.index_put(k_cache, where, torch.stack(new_k))
        v_out = torch.index_put(v_cache, where, torch.stack(new_v))
        if not self.sample:
            return logits, k_out, v_out
        from mmfast.dalle.sampling import sample_next
        seeds, temperature, top_k, top_p, guidance, max_top_k = sampling
        return sample_next(logits, pos, seeds, temperature, top_k, top_p, guidance, max_top_k), logits, k_out, v_out


def _plain_linears(dec) -> bool:
    """False once `DalleDecoder.pack_weights` has swapped the step's nn.Linear modules for packed ones."""
    linears = ("q_proj", "k_proj", "v_proj", "out_proj", "fc0", "fc1", "fc2")
    return isinstance(dec.lm_head, nn.Linear) and all(isinstance(m, nn.Linear) for layer in dec.layers
                                                      for n, m in layer.named_modules() if n.split(".")[-1] in linears)


def dalle_modules(src, fp16: bool = False):
    """(encoder, decoder) CPU copies in fp32 (fp16: `half()` / `cast`) of a path, `Generator` or pair."""
    from mmfast.dalle.generate import Generator
    from mmfast.dalle.load import build_models, load_dalle_checkpoint
    from mmfast.dalle.model import DalleDecoder, DalleEncoder

    if isinstance(src, (str, os.PathLike)):
        enc, dec, _ = build_models(load_dalle_checkpoint(src))
    else:
        if isinstance(src, Generator):
            src = (src.encoder, src.decoder)
        if not (isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], DalleEncoder)
                and isinstance(src[1], DalleDecoder)):
            raise TypeError("export_generator: expected a min-dalle path, an mmfast Generator (torch backend) or "
                            f"(DalleEncoder, DalleDecoder), got {type(src).__name__}")
        if not _plain_linears(src[1]) or any(p.dtype != torch.float32 for m in src for p in m.parameters()):
            raise ValueError("export_generator needs fp32 nn.Linear weights, and a Generator on the CPU packs "
                             "its step's weights (dtype modes): pass the checkpoint path, or (encoder, decoder) "
                             "as load.build_models returns them; fp16 files come from fp16=True")
        enc, dec = (copy.deepcopy(m).cpu() for m in src)
    enc, dec = enc.eval().requires_grad_(False), dec.eval().requires_grad_(False)
    if fp16:
        enc, dec = enc.half(), dec.cast(torch.float16)
    return enc, dec


def step_inputs(dec, batch: int, pos: int, *, seed: int = 0) -> dict:
    """Example feeds of the step graph (the caches filled before `pos`), as torch tensors."""
    c, g = dec.cfg, torch.Generator().manual_seed(seed)
    R, k = 2 * batch, min(256, c.codebook_size)
    shape = (c.decoder_layers, R, c.heads, c.image_tokens, c.head_dim)
    kc, vc = (torch.randn(shape, generator=g).mul_(torch.arange(c.image_tokens).lt(pos).view(-1, 1))
              .to(dec.dtype) for _ in range(2))
    text_shape = (c.decoder_layers, R, c.heads, c.text_tokens, c.head_dim)
    return {"prev": torch.randint(0, c.codebook_size, (batch,), generator=g), "pos": torch.tensor(pos),
            "k_cache": kc, "v_cache": vc,
            "cross_k": torch.randn(text_shape, generator=g).to(dec.dtype),
            "cross_v": torch.randn(text_shape, generator=g).to(dec.dtype),
            "cross_len": torch.randint(1, c.text_tokens + 1, (R,), generator=g),
            "seeds": torch.arange(batch) * (2 ** 40 + 7), "temperature": torch.linspace(0.7, 1.3, batch),
            "top_k": torch.tensor([1, 50, 7, 256] * (batch // 4 + 1))[:batch].clamp(max=k),
            "top_p": torch.linspace(1.0, 0.8, batch), "guidance": torch.linspace(16.0, 2.0, batch),
            "max_top_k": torch.tensor(k)}


def torch_step(dec, feeds: dict, sample: bool = True) -> dict:
    """The PyTorch answer for `feeds` (`DalleDecoder.step`, `sample_next`); the feeds stay untouched."""
    from mmfast.dalle.sampling import sample_next

    kc, vc = feeds["k_cache"].clone(), feeds["v_cache"].clone()
    with torch.no_grad():
        logits = dec.step(feeds["prev"].repeat(2), feeds["pos"], kc, vc, feeds["cross_k"], feeds["cross_v"],
                          feeds["cross_len"])
    out = {"logits": logits, "k_cache_out": kc, "v_cache_out": vc}
    if sample:
        s = [feeds[k] for k in SAMPLING[:-1]]
        out["tokens"] = sample_next(logits, feeds["pos"], *s, max_top_k=int(feeds["max_top_k"]))
    return out


def export_generator(src, out_dir, *, parts=("encoder", "step"), fp16: bool = False,
                     check: bool = True) -> dict[str, Path]:
    """Write `dalle_encoder.onnx`, `dalle_step.onnx` (and `dalle_step_logits.onnx`; `*_fp16.onnx` with
    fp16=True) for a min-dalle path, a `Generator` (torch backend, fp32) or (encoder, decoder).

    Example
    -------
    >>> paths = export_generator("pretrained/dalle_bart_mini", "out/")   # doctest: +SKIP
    >>> sorted(paths)
    ['encoder', 'step']
    """
    parts = check_parts("export_generator", parts, DALLE_PARTS)
    enc, dec = dalle_modules(src, fp16)
    cfg, out, dtype = dec.cfg, Path(out_dir), "fp16" if fp16 else "fp32"
    meta = {"family": "dalle", "dtype": dtype, "config": dataclasses.asdict(cfg)}
    paths = {}
    if "encoder" in parts:
        g = torch.Generator().manual_seed(0)
        text = torch.randint(3, cfg.text_vocab, (2, cfg.text_tokens), generator=g)
        text[0, 9:], text[1, 2:] = cfg.text_pad_token, cfg.text_pad_token          # padded like real prompts
        module = _EncoderGraph(enc)
        paths["encoder"] = export_graph(module, (text,), out / file_name("encoder", fp16, "dalle"),
                                        inputs={"text": {0: "batch"}}, outputs={"state": {0: "batch"}},
                                        meta={**meta, "part": "encoder"}, check=check)
        if check:
            with torch.no_grad():
                want = as_numpy(module(text))
            check_parity(paths["encoder"], {"text": as_numpy(text)}, {"state": want}, TOLERANCE[dtype],
                         "DALL·E text encoder")
    for part in ("step", "step_logits"):
        if part in parts:
            paths[part] = _export_step(dec, out / file_name(part, fp16, "dalle"), part == "step", meta, dtype, check)
    return paths


def _export_step(dec, path: Path, sample: bool, meta: dict, dtype: str, check: bool) -> Path:
    feeds = step_inputs(dec, batch=2, pos=3)
    names = ["prev", "pos", "k_cache", "v_cache", "cross_k", "cross_v", "cross_len"]
    names += list(SAMPLING) if sample else []
    batch, rows, cache = {0: "batch"}, {0: "rows"}, {1: "rows"}
    inputs = {"prev": batch, "pos": {}, "k_cache": cache, "v_cache": cache, "cross_k": cache, "cross_v": cache,
              "cross_len": rows, **({k: (batch if k != "max_top_k" else {}) for k in SAMPLING} if sample else {})}
    outputs = {**({"tokens": batch} if sample else {}), "logits": rows, "k_cache_out": cache, "v_cache_out": cache}
    part = "step" if sample else "step_logits"
    export_graph(_StepGraph(dec, sample), tuple(feeds[k] for k in names), path, inputs=inputs, outputs=outputs,
                 meta={**meta, "part": part}, opset=STEP_OPSET if sample else OPSET, check=check)
    if check:
        want = {k: as_numpy(v) for k, v in torch_step(dec, feeds, sample).items()}
        tokens = want.pop("tokens", None)
        sess = ort_session(path)
        np_feeds = {k: as_numpy(feeds[k]) for k in names}
        check_parity(path, np_feeds, want, TOLERANCE[dtype], "DALL·E decode step", session=sess)
        if tokens is not None and dtype == "fp32":      # fp16 logits may flip a near-tie: logits checked above
            got = sess.run(["tokens"], np_feeds)[0]
            if not (got == tokens).all():
                raise RuntimeError(f"ONNX DALL·E decode step ({path.name}) samples other tokens than PyTorch: "
                                   f"{got.tolist()} vs {tokens.tolist()}")
    return path
