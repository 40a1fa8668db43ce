"""The DALL·E generator's parts on ONNX Runtime, as `Generator` drives its torch encoder and decoder.

The decode step binds the KV cache as both input and output of `dalle_step.onnx`: ONNX Runtime's
ScatterND then writes the new position in place, no copy per token. One IO binding per generate
batch (per cache), reused by every step; only `prev` and `pos` are rewritten.
"""
from __future__ import annotations

import copy
import threading
import weakref

import torch

from .onnxruntime import OrtSession


class OrtDalleEncoder:
    """The DALL·E text encoder on ORT: `encoder(text [N, 64]) -> state [N, 64, width]` fp32."""

    def __init__(self, path, *, threads: int | None = None, width: int):
        self.session = OrtSession(path, threads=threads)
        self.width = width

    def __call__(self, text: torch.Tensor) -> torch.Tensor:
        out = torch.empty(text.shape[0], text.shape[1], self.width)
        return self.session.run({"text": text.long().cpu()}, {"state": out})["state"]


class _CrossProjections(torch.nn.Module):
    """Just what `DalleDecoder.cross_kv` reads: cfg, dtype and each layer's cross-attention k / v."""

    def __init__(self, decoder):
        from mmfast.dalle.model import Attention

        super().__init__()
        self.cfg, self.dtype = decoder.cfg, torch.float32
        self.layers = torch.nn.ModuleList()
        for layer in decoder.layers:
            a = Attention.__new__(Attention)
            torch.nn.Module.__init__(a)
            # copies in fp32: the caller may cast or pack its decoder afterwards (backend="auto")
            a.heads = layer.encoder_attn.heads
            a.k_proj, a.v_proj = (copy.deepcopy(getattr(layer.encoder_attn, n)).float() for n in ("k_proj", "v_proj"))
            holder = torch.nn.Module()
            holder.encoder_attn = a
            self.layers.append(holder)

    def cross_kv(self, state, text):
        from mmfast.dalle.model import DalleDecoder
        return DalleDecoder.cross_kv(self, state, text)


class _Bound:
    """One generate batch's IO binding: every input bound once, `prev` / `pos` rewritten per step.
    The caches are held weakly (the entry goes when they do); the other inputs strongly."""

    def __init__(self, session: OrtSession, args: dict, codebook: int):
        B = args["seeds"].shape[0]
        self.prev, self.pos = torch.empty(B, dtype=torch.long), torch.zeros((), dtype=torch.long)
        self.tokens = torch.empty(B, dtype=torch.long)
        self.logits = torch.empty(2 * B, codebook)
        self.binding = session.session.io_binding()
        session.bind(self.binding, {**args, "prev": self.prev, "pos": self.pos},
                     {"tokens": self.tokens, "logits": self.logits,
                      "k_cache_out": args["k_cache"], "v_cache_out": args["v_cache"]})   # in place
        self.caches = (weakref.ref(args["k_cache"]), weakref.ref(args["v_cache"]))
        self.args = {k: v for k, v in args.items() if k not in ("k_cache", "v_cache")}

    def same(self, args: dict) -> bool:
        return self.caches[0]() is args["k_cache"] and self.caches[1]() is args["v_cache"] and \
            all(self.args[k] is v for k, v in args.items() if k not in ("k_cache", "v_cache", "max_top_k")) and \
            int(self.args["max_top_k"]) == int(args["max_top_k"])


class OrtDalleDecoder:
    """The decode step on ORT, as `Generator` drives a `DalleDecoder`: `cross_kv` (PyTorch, once per
    prompt), `new_cache`, and `decode_step` (install it as `Generator.decode_step`). The caches are
    bound as the step's inputs *and* outputs, so each token writes one position in place."""

    STEP_INPUTS = ("k_cache", "v_cache", "cross_k", "cross_v", "cross_len", "seeds", "temperature", "top_k",
                   "top_p", "guidance", "max_top_k")

    def __init__(self, decoder, path, *, threads: int | None = None):
        if not all(isinstance(getattr(layer.encoder_attn, n), torch.nn.Linear) for layer in decoder.layers
                   for n in ("k_proj", "v_proj")):
            raise ValueError("OrtDalleDecoder needs the decoder's fp32 nn.Linear cross-attention projections")
        self.cfg = decoder.cfg
        self.dtype = torch.float32
        self._cross = _CrossProjections(decoder)
        self.session = OrtSession(path, threads=threads)
        self._bound: dict[int, _Bound] = {}                         # id(k_cache) -> its binding, while it lives
        self._lock = threading.Lock()

    def cross_kv(self, state: torch.Tensor, text: torch.Tensor):
        return self._cross.cross_kv(state, text)

    def new_cache(self, rows: int, device=None):
        c = self.cfg
        shape = (c.decoder_layers, rows, c.heads, c.image_tokens, c.head_dim)
        return torch.zeros(shape), torch.zeros(shape)

    def decode_step(self, decoder, prev, pos, k_cache, v_cache, cross_k, cross_v, cross_len, seeds, temperature,
                    top_k, top_p, guidance, max_top_k: int) -> torch.Tensor:
        """`mmfast.dalle.generate.decode_step` on ORT (`decoder` is ignored: it is this object).
        Returns the tokens [B]; the buffer is reused by the next step of the same batch."""
        args = dict(zip(self.STEP_INPUTS, (k_cache, v_cache, cross_k, cross_v, cross_len, seeds, temperature,
                                           top_k, top_p, guidance, max_top_k)))
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("decode_step: the caches must be contiguous (new_cache makes them so): the step "
                             "writes them in place")
        with self._lock:
            b = self._bound.get(id(k_cache))
            if b is None or not b.same(args):
                if b is None:
                    weakref.finalize(k_cache, self._bound.pop, id(k_cache), None)
                args = {k: (torch.tensor(v) if k == "max_top_k" else v.contiguous()) for k, v in args.items()}
                b = self._bound[id(k_cache)] = _Bound(self.session, args, self.cfg.codebook_size)
        b.prev.copy_(prev)
        b.pos.fill_(pos)
        self.session.session.run_with_iobinding(b.binding)
        return b.tokens
