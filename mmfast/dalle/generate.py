"""The DALL·E generator: prompts -> image tokens (`Generator.generate_tokens`), `load_generator`.

One call encodes every prompt once (its conditioned text and min-dalle's unconditioned one),
projects the cross-attention keys / values once, then decodes all images of a batch together:
rows [unconditioned of every image; conditioned of every image] share one KV cache, allocated once
at its final size. Each of the 256 steps is `decode_step`, a function of tensors only.
Image i of prompt p gets seed `seed + p * n + i`, and its tokens depend on that seed and its
prompt only (see `sampling`), so any batch composition gives the same images.

`Generator.generate` is where the families meet: the VQGAN (`mmfast.vqgan`, attached by
`load_generator` or `attach_vq`) turns tokens into pixels and a `mmfast.Clip` reranks them.
"""
from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch

from .load import build_models, load_dalle_checkpoint
from .model import DalleDecoder, DalleEncoder
from .sampling import sample_next
from .tokenizer import DalleTokenizer, clean_text

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_MAX_SEED = 2 ** 63 - 1


def decode_step(decoder: DalleDecoder, prev, pos, k_cache, v_cache, cross_k, cross_v, cross_len,
                seeds, temperature, top_k, top_p, guidance, max_top_k: int) -> torch.Tensor:
    """One token for every image: prev [B] -> next [B]. Tensors only; caches are written in place.

    Decoder rows are [unconditioned; conditioned] (2B), both fed the image's previous token, as
    min-dalle does; the sampling arguments are [B] tensors (see `sampling.sample_next`).
    """
    logits = decoder.step(prev.repeat(2), pos, k_cache, v_cache, cross_k, cross_v, cross_len)
    return sample_next(logits, pos, seeds, temperature, top_k, top_p, guidance, max_top_k)


def _device(device) -> torch.device:
    from ..quantize import resolve_device   # "auto", or a usable cpu / cuda device; anything else named
    return resolve_device(device)


def _mode(dtype, device: torch.device) -> tuple[str, torch.dtype]:
    """(mode name, dtype of activations and caches). On the CPU, "fp32" / "fp16" / "int8" name the
    format the step streams its weights in (`DalleDecoder.pack_weights`), activations stay fp32;
    "bf16" is bf16 throughout (fp32 logits), as on a GPU."""
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if isinstance(dtype, torch.dtype) and dtype in names:
        dtype = names[dtype]
    if dtype == "auto":
        if device.type == "cuda":  # bf16: fp16's range is tight for mega's GLU; logits stay fp32 anyway
            return ("bf16", torch.bfloat16) if torch.cuda.is_bf16_supported() else ("fp16", torch.float16)
        # CPU: the fastest mode whose greedy tokens equal fp32's on the test models, which only fp32
        # (its GEMMs on fp16 pairs) does; fp16 / int8 / bf16 are faster and change a few tokens
        # (benchmarks/suites/dalle.py measures both).
        return "fp32", torch.float32
    if dtype == "int8" and device.type != "cpu":
        raise ValueError("dtype='int8' (int8 decoder weights) is a CPU mode; use 'bf16' or 'fp16' on a GPU")
    if dtype not in _DTYPES and dtype != "int8":
        raise ValueError(f"dtype={dtype!r} is not supported; use 'auto', 'fp32', 'bf16', 'fp16' or 'int8' (CPU)")
    name = names.get(_DTYPES.get(dtype), dtype)
    return name, (torch.float32 if device.type == "cpu" and name in ("fp16", "int8") else _DTYPES[name])


def _check_number(name, value, ok, rule, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'} {rule}, got {value!r}")
    return value


def _check_prompts(prompts, cleaning: str = "min-dalle") -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty str or list of str, got {prompts!r:.80}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"prompts[{i}] is empty; describe the image to generate, e.g. 'a red apple'")
        if cleaning == "min-dalle" and not clean_text(p).strip():  # it drops every non-ASCII character
            raise ValueError(f"prompts[{i}]={p[:40]!r} has no text left after DALL·E mini / mega's cleaning, "
                             "which keeps ASCII only (the models are English-only); write it in English")
    return list(prompts)


def _image_seeds(seed, count: int) -> list[int]:
    if seed is None:  # from torch's RNG, so torch.manual_seed makes a run repeatable
        seed = int(torch.randint(0, 2 ** 62, ()))
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not 0 <= seed <= _MAX_SEED - count:
            raise ValueError(f"seed must be an int in [0, 2**63 - 1 - number of images], got {seed}")
        return [int(seed) + i for i in range(count)]
    seeds = list(seed) if isinstance(seed, Sequence) else None
    if seeds is None or len(seeds) != count:
        raise ValueError(f"seed must be None, an int, or a list of {count} ints (one per image, "
                         f"len(prompts) * n), got {seed!r:.80}")
    for i, s in enumerate(seeds):
        _check_number(f"seed[{i}]", s, lambda v: 0 <= v <= _MAX_SEED, "in [0, 2**63)", integer=True)
    return [int(s) for s in seeds]


class Generator:
    """DALL·E mini / mega text -> image tokens; see `load_generator`. Safe to call from several
    threads: weights are read-only and every call allocates its own caches.

    Attributes
    ----------
    vq : the `mmfast.VQ` that turns tokens into pixels (`attach_vq`; `load_generator` attaches
        min-dalle's `vqgan/detoker.pt` when it is beside the checkpoint), or None.
    detoker_path : Path or None, min-dalle's `vqgan/detoker.pt` found beside the checkpoint.
    decode_step : the per-token function; replace it with e.g. `torch.compile(decode_step)`.
    """

    def __init__(self, encoder: DalleEncoder, decoder: DalleDecoder, tokenizer: DalleTokenizer, *,
                 device="auto", dtype="auto", detoker_path=None, backend: str = "torch"):
        if backend != "torch":  # ONNX Runtime parts, or per part the faster engine: mmfast.backends.auto
            from ..backends.auto import generator_backend
            generator_backend(self, encoder, decoder, tokenizer, backend=backend, device=device, dtype=dtype,
                              detoker_path=detoker_path)
            return
        self.backend, self.info = "torch", {}  # backend="auto" says per part what it chose and why
        self.config = decoder.cfg
        self.device = _device(device)
        self.mode, self.dtype = _mode(dtype, self.device)  # e.g. ("int8", float32 activations)
        self.encoder = encoder.eval().requires_grad_(False).to(self.device, self.dtype)
        self.decoder = decoder.eval().requires_grad_(False).to(self.device).cast(self.dtype)
        if self.device.type == "cpu":  # in place, like .to / .cast: the step's weights as the mode streams them
            self.decoder.pack_weights(None if self.mode == "bf16" else self.mode)
        self.tokenizer = tokenizer
        self.detoker_path = detoker_path
        self.vq = None  # the VQGAN (mmfast.VQ) that turns tokens into pixels; see attach_vq
        self.decode_step = decode_step

    def generate_tokens(self, prompts: str | Sequence[str], *, n: int = 1, seed=None, top_k: int = 256,
                        top_p: float = 1.0, temperature: float = 1.0, guidance: float = 16.0,
                        batch_size: int | None = None, progress: bool = False,
                        callback: Callable[[int, torch.Tensor], None] | None = None,
                        every: int = 32) -> torch.Tensor:
        """Sample `n` images' tokens for every prompt.

        Parameters
        ----------
        prompts : str or list of str, each non-empty.
        n : images per prompt, >= 1.
        seed : None (drawn from torch's RNG), an int (image k of the call gets seed + k, k =
            prompt index * n + image index), or a list of len(prompts) * n ints in [0, 2**63).
        top_k : keep the top_k most likely tokens, in [1, codebook_size] (min-dalle's default 256).
        top_p : then the most likely of those until their mass reaches top_p, in (0, 1].
        temperature : > 0; guidance : >= 0, min-dalle's "supercondition factor" (1 = none).
        batch_size : images decoded together (default: all); results do not depend on it.
        progress : show a tqdm bar over the tokens.
        callback, every : `callback(step, tokens)` after every `every` tokens and at the end, with
            tokens [N, 256] int64 on CPU; positions not written yet hold `config.start_token`.

        Returns
        -------
        LongTensor [len(prompts) * n, 256] on CPU, codebook ids in [0, codebook_size); rows grouped
        by prompt.

        Example
        -------
        >>> tokens = gen.generate_tokens(["a red apple", "a blue car"], n=2, seed=0)   # [4, 256]
        """
        prompts = _check_prompts(prompts, getattr(self.tokenizer, "cleaning", "min-dalle"))
        cfg = self.config
        _check_number("n", n, lambda v: v >= 1, ">= 1", integer=True)
        _check_number("top_k", top_k, lambda v: 1 <= v <= cfg.codebook_size,
                      f"in [1, {cfg.codebook_size}] (the image vocabulary)", integer=True)
        _check_number("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1]; 1 turns it off")
        _check_number("temperature", temperature, lambda v: 0 < v < float("inf"), "> 0 and finite")
        _check_number("guidance", guidance, lambda v: 0 <= v < float("inf"),
                      ">= 0 and finite (min-dalle uses 16; 1 is plain conditional sampling)")
        if batch_size is not None:
            _check_number("batch_size", batch_size, lambda v: v >= 1, ">= 1 or None", integer=True)
        _check_number("every", every, lambda v: v >= 1, ">= 1", integer=True)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        count = len(prompts) * n
        seeds = torch.tensor(_image_seeds(seed, count), dtype=torch.long, device=self.device)
        dev, f32 = self.device, torch.float32
        params = (torch.full((count,), float(temperature), dtype=f32, device=dev),
                  torch.full((count,), int(top_k), dtype=torch.long, device=dev),
                  torch.full((count,), float(top_p), dtype=f32, device=dev),
                  torch.full((count,), float(guidance), dtype=f32, device=dev))
        text = self.tokenizer(prompts).to(dev).flatten(0, 1)  # (2P, T): p0 uncond, p0 cond, p1 uncond, ...
        out = torch.full((count, cfg.image_tokens), cfg.start_token, dtype=torch.long, device=dev)
        bar = _progress_bar(count * cfg.image_tokens) if progress else None
        with torch.inference_mode():
            cross = self.decoder.cross_kv(self.encoder(text), text)  # once per prompt
            bs = batch_size or count
            for a in range(0, count, bs):
                img = torch.arange(a, min(a + bs, count), device=dev)
                p = img // n
                rows = torch.cat([2 * p, 2 * p + 1])  # (2B,): unconditioned rows first, as min-dalle
                ck, cv, cl = cross[0][:, rows], cross[1][:, rows], cross[2][rows]
                self._decode(out, a, img, ck, cv, cl, seeds[img], [t[img] for t in params], int(top_k),
                             bar, callback, every)
        if bar is not None:
            bar.close()
        return out.cpu()

    def _decode(self, out, a, img, ck, cv, cl, seeds, params, max_top_k, bar, callback, every):
        cfg, B = self.config, img.shape[0]
        k_cache, v_cache = self.decoder.new_cache(2 * B)  # once per batch, final size
        positions = torch.arange(cfg.image_tokens, device=out.device)
        tokens = out[a:a + B]  # a view: the rows of this batch
        prev = torch.full((B,), cfg.start_token, dtype=torch.long, device=out.device)
        for i in range(cfg.image_tokens):
            prev = self.decode_step(self.decoder, prev, positions[i], k_cache, v_cache, ck, cv, cl, seeds,
                                    *params, max_top_k=max_top_k)
            tokens[:, i] = prev
            if bar is not None:
                bar.update(B)
            if callback is not None and ((i + 1) % every == 0 or i + 1 == cfg.image_tokens):
                callback(i + 1, out.to("cpu", copy=True))  # a snapshot; the only host sync of the loop


    # ---- images: the VQGAN turns tokens into pixels, CLIP ranks them ------------------------------
    def generate(self, prompts: str | Sequence[str], *, n: int = 1, seed=None, top_k: int = 256,
                 top_p: float = 1.0, temperature: float = 1.0, guidance: float = 16.0, rerank_with=None,
                 return_tokens: bool = False, batch_size: int | None = None, progress: bool = False,
                 callback: Callable[[int, list], None] | None = None, every: int = 32):
        """Sample `n` images for every prompt and decode them with the VQGAN.

        Arguments as in `generate_tokens`; in addition:

        rerank_with : a loaded `mmfast.Clip`: each prompt's images are scored by the cosine
            similarity of their CLIP embedding to the prompt's and returned best first.
        return_tokens : also return the tokens [len(prompts) * n, 256] in the returned order.
        callback, every : `callback(step, images)` with partial images (PIL, not-yet-written
            tokens decoded as the start token) every `every` tokens: a stream of previews.

        Returns
        -------
        list of PIL images (grouped by prompt), or (images, tokens) with `return_tokens`. Each
        image's `info` holds "prompt", "seed" and, when reranked, "clip_score".

        Example
        -------
        >>> images = gen.generate("a watercolor fox", n=4, seed=0, rerank_with=clip)   # doctest: +SKIP
        >>> images[0].info["clip_score"], images[0].save("best.png")
        """
        if self.vq is None:
            raise ValueError("this generator has no VQGAN to turn tokens into pixels: pass "
                             "vqgan='path/to/detoker.pt' (or a loaded mmfast.VQ) to load_generator, or use "
                             "generate_tokens()")
        if rerank_with is not None and not (hasattr(rerank_with, "encode_images")
                                            and hasattr(rerank_with, "encode_texts")):
            raise TypeError(f"rerank_with must be a loaded mmfast.Clip (mmfast.load_clip(...)), got "
                            f"{type(rerank_with).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        prompts = _check_prompts(prompts, getattr(self.tokenizer, "cleaning", "min-dalle"))
        count = len(prompts) * (n if isinstance(n, int) and not isinstance(n, bool) else 1)
        seeds = _image_seeds(seed, count)
        preview = None if callback is None else (lambda step, t: callback(step, self._pil(t)))
        tokens = self.generate_tokens(prompts, n=n, seed=seeds, top_k=top_k, top_p=top_p,
                                      temperature=temperature, guidance=guidance, batch_size=batch_size,
                                      progress=progress, callback=preview, every=every)
        images = self._pil(tokens)
        owner = [p for p in prompts for _ in range(n)]
        for im, prompt, s in zip(images, owner, seeds):
            im.info.update(prompt=prompt, seed=s)
        if rerank_with is not None:
            order = _rerank(rerank_with, images, prompts, n)
            images, tokens = [images[i] for i in order], tokens[order]
        return (images, tokens) if return_tokens else images

    def _pil(self, tokens: torch.Tensor) -> list:
        return self.vq.to_pil(self.vq.decode(tokens))

    def attach_vq(self, vq) -> None:
        """Use `vq` (an `mmfast.VQ`, or a path for `mmfast.load_vq`) to decode tokens into pixels."""
        from ..vqgan import VQ, load_vq
        if not isinstance(vq, VQ):
            vq = load_vq(vq, device=self.device)
        if vq.config.n_embed != self.config.codebook_size:
            raise ValueError(f"vqgan: its codebook has n_embed={vq.config.n_embed} codes but this DALL·E "
                             f"decoder samples {self.config.codebook_size} image tokens; use the VQGAN the "
                             "decoder was trained with (min-dalle's vqgan/detoker.pt, 16384 codes)")
        self.vq = vq


def _rerank(clip, images: list, prompts: list[str], n: int) -> torch.Tensor:
    """Order (a permutation of range(len(images))) putting each prompt's images best first by the
    cosine similarity of their CLIP embeddings to the prompt's; writes info["clip_score"]."""
    img = clip.encode_images(images)                                     # (P*n, D), normalised
    txt = clip.encode_texts(prompts)                                     # (P, D)
    scores = (img.view(len(prompts), n, -1) * txt[:, None]).sum(-1)     # (P, n)
    for im, s in zip(images, scores.flatten().tolist()):
        im.info["clip_score"] = s
    best = scores.argsort(dim=1, descending=True, stable=True)          # (P, n)
    return (best + torch.arange(len(prompts))[:, None] * n).flatten()


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from None
    return tqdm(total=total, unit="tok", desc="generating image tokens")


def load_generator(path, *, variant: str | None = None, device="auto", dtype="auto",
                   vqgan="auto", backend: str | None = None) -> Generator:
    """Load DALL·E mini / mega from min-dalle's files.

    Parameters
    ----------
    path : min-dalle's models_root (`dalle_bart_mini/`, `dalle_bart_mega/`, `vqgan/`) or a model folder
        (`encoder.pt`, `decoder.pt`, `vocab.json`, `merges.txt`); "demo" for the small generator shipped
        in the package (trained here on coloured shapes; English and Russian prompts; its VQGAN attached).
    variant : "mini" or "mega" when the models_root holds both.
    device : "auto" (CUDA when available) | "cpu" | "cuda" | torch.device.
    dtype : "auto" (fp32 on CPU, bf16 on CUDA) | "fp32" | "bf16" | "fp16" | "int8" (CPU); logits are
        fp32 always. On the CPU, "fp16" and "int8" are weight-only (fp32 activations and caches):
        faster, and a few greedy tokens differ from fp32's (`benchmarks/suites/dalle.py`).
    vqgan : "auto" (min-dalle's `vqgan/detoker.pt` beside the checkpoint, if any), a path for
        `mmfast.load_vq`, a loaded `mmfast.VQ`, or None (tokens only).
    backend : None (default: $MMFAST_BACKEND, else "auto") | "torch" | "onnxruntime" | "auto".
        "onnxruntime" exports the text encoder and the decode
        step (sampling inside) once, checked against PyTorch and cached by weights, and runs them on
        ORT's CPU provider (dtype "auto"/"fp32", or "int8": ORT's dynamic int8); the loop stays
        mmfast's and the KV cache is written in place. "auto" keeps per part the faster engine whose
        greedy tokens equal fp32's (measured once, cached); `Generator.info` says why.

    Example
    -------
    >>> gen = load_generator("pretrained", variant="mini")               # doctest: +SKIP
    >>> gen.generate_tokens("a watercolor fox", n=4, seed=0).shape       # doctest: +SKIP
    torch.Size([4, 256])
    """
    from ..backends.auto import resolve_backend
    backend = resolve_backend(backend)
    if isinstance(path, str) and path == "demo":
        from ..demo import weights_path
        path = weights_path("generator")
    ckpt = load_dalle_checkpoint(path, variant)
    encoder, decoder, tokenizer = build_models(ckpt)
    gen = Generator(encoder, decoder, tokenizer, device=device, dtype=dtype, detoker_path=ckpt.detoker,
                    backend=backend)
    vqgan = ckpt.detoker if isinstance(vqgan, str) and vqgan == "auto" else vqgan
    if vqgan is not None:
        gen.attach_vq(vqgan)
    return gen
