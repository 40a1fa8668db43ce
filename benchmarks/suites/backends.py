"""Backends: ONNX Runtime vs PyTorch per model part, fp32 and the fast modes, with `backend="auto"`'s
choice beside each case.

Parts: the CLIP towers (ViT-B-32), VQGAN decode (f16, 16384 codes, a 16 x 16 grid -> 256 px) and
the DALL·E decode step (mini, one image = 2 rows, at position 128 of 256). Random-init weights,
seeded (no checkpoints can be downloaded here); `--quick` runs tiny models of the same shapes'
kinds. Providers per part: torch fp32, torch in what `dtype="auto"` picks on this machine, ONNX
Runtime fp32 and, for CLIP and the step, ORT dynamic int8. Quality beside the speed: CLIP cosine
min vs torch fp32, VQGAN PSNR vs torch fp32, the step's max |logit - fp32| and whether its greedy
token is fp32's. The "auto_choice" column is what `backend="auto"` picked for that part, and why.
Both engines use torch's thread count (ORT sessions take it from torch.get_num_threads()).
The exported graphs and the auto measurement are cached in mmfast's cache folder: a second run
skips the exports. Providers take turns in blocks (the first call of a turn untimed): ONNX Runtime's
and OpenMP's thread pools spin after a call, and single alternating calls would time each engine
against the other's spinning threads.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..harness import Case, Provider


def _randomize(model: torch.nn.Module, std: float, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if p.dim() == 1:  # norms near 1 / 0 so activations stay in a trained model's range
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _auto_note(info: dict, part: str) -> str:
    i = info[part]
    return f"{i['backend']} {i['dtype']}: {i['why']}"


# ---- CLIP -------------------------------------------------------------------------------------------------
def _clip_cases(quick: bool):
    from mmfast.clip import clip_preset
    from mmfast.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig
    from mmfast.clip.model import CLIP
    from mmfast.clip.runtime import Clip

    cfg = (ClipConfig(embed_dim=64, vision=ClipVisionConfig(64, 16, 128, 2, 2, 512),
                      text=ClipTextConfig(width=128, heads=2, layers=2, mlp_dim=512)) if quick
           else clip_preset("ViT-B-32"))
    model = _randomize(CLIP(cfg), 0.02, 0)
    name = "tiny" if quick else "ViT-B-32"
    modes = {"torch fp32": Clip(copy.deepcopy(model), device="cpu", dtype="fp32"),
             "torch auto": Clip(copy.deepcopy(model), device="cpu", dtype="auto"),
             "onnxruntime fp32": Clip(copy.deepcopy(model), device="cpu", dtype="fp32", backend="onnxruntime"),
             "onnxruntime int8": Clip(copy.deepcopy(model), device="cpu", dtype="int8", backend="onnxruntime")}
    auto = Clip(copy.deepcopy(model), device="cpu", backend="auto")
    B = 4 if quick else 32
    g = torch.Generator().manual_seed(1)
    px = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    texts = [f"a photo of a {w} number {i}" for i, w in zip(range(B), ["cat", "dog", "teacher", "car"] * B)]
    for part, x, fn in (("image", px, "encode_images"), ("text", texts, "encode_texts")):
        want = getattr(modes["torch fp32"], fn)(x)
        providers = []
        for label, clip in modes.items():
            cos = float(F.cosine_similarity(getattr(clip, fn)(x), want).min())
            label = f"{label} ({clip.dtype})" if label == "torch auto" else label
            providers.append(Provider(label, (lambda c=clip: getattr(c, fn)(x)), clip.dtype, {"cosine_min": cos}))
        yield Case(f"clip.{fn}", f"{name} B={B}", providers, baseline="torch fp32", items=B, block=3,
                   extra={"auto_choice": _auto_note(auto.info, part)})


# ---- VQGAN ------------------------------------------------------------------------------------------------
def _vq_cases(quick: bool):
    from mmfast.vqgan import VQ, VQConfig, VQGAN, vq_preset
    from mmfast.vqgan.runtime import psnr

    cfg = (VQConfig(resolution=64, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(8,),
                    z_channels=32, embed_dim=16, n_embed=1024) if quick else vq_preset("vqgan-f16-16384"))
    model = _randomize(VQGAN(cfg), 0.03, 2)
    modes = {"torch fp32": VQ(copy.deepcopy(model), device="cpu", dtype="fp32"),
             "torch auto": VQ(copy.deepcopy(model), device="cpu", dtype="auto"),
             "onnxruntime fp32": VQ(copy.deepcopy(model), device="cpu", backend="onnxruntime")}
    auto = VQ(copy.deepcopy(model), device="cpu", backend="auto")
    grid = 4 if quick else 16
    B = 1 if not quick else 2
    ids = torch.randint(0, cfg.n_embed, (B, grid, grid), generator=torch.Generator().manual_seed(3))
    want = modes["torch fp32"].decode_pixels(ids)
    providers = []
    for label, vq in modes.items():
        q = psnr(vq.decode_pixels(ids), want)
        label = f"{label} ({vq.dtype})" if label == "torch auto" else label
        providers.append(Provider(label, (lambda v=vq: v.decode_pixels(ids)), vq.dtype,
                                  {"psnr_db": round(q, 2) if q != float("inf") else "inf"}))
    yield Case("vq.decode", f"{'tiny' if quick else 'f16-16384'} B={B} {grid}x{grid} -> {grid * cfg.factor} px",
               providers, baseline="torch fp32", items=B, block=3,
               extra={"auto_choice": _auto_note(auto.info, "decoder")})


# ---- DALL·E decode step -------------------------------------------------------------------------------------
def _tokenizer():
    from mmfast.dalle.tokenizer import DalleTokenizer
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(ord(" ") + 256)] + [chr(c) for c in range(33, 127)]:
        vocab[c] = len(vocab)
    return DalleTokenizer(vocab, [])


def _step_state(dec, text_len: int, pos: int, seed: int):
    """Inputs of one step at `pos` for 1 image (2 rows): caches filled before pos, cross K/V."""
    from mmfast.export.onnx_dalle import step_inputs
    f = step_inputs(dec, batch=1, pos=pos, seed=seed)
    f["cross_len"] = torch.full((2,), text_len)
    for k in ("temperature", "top_p"):
        f[k] = torch.ones(1)
    f["top_k"], f["guidance"] = torch.full((1,), 256), torch.full((1,), 16.0)
    return f


def _dalle_cases(quick: bool):
    from mmfast.backends.auto import ort_generator_parts
    from mmfast.backends.onnxruntime import exported
    from mmfast.dalle import dalle_preset
    from mmfast.dalle.generate import Generator, decode_step
    from mmfast.dalle.model import DalleDecoder, DalleEncoder

    cfg = dalle_preset("dalle-tiny" if quick else "dalle-mini")
    enc, dec = _randomize(DalleEncoder(cfg), 0.02, 4), _randomize(DalleDecoder(cfg), 0.02, 5)
    feeds = _step_state(dec, text_len=12, pos=cfg.image_tokens // 2, seed=6)
    args = lambda f: (f["prev"], f["pos"], f["k_cache"], f["v_cache"], f["cross_k"], f["cross_v"],  # noqa: E731
                      f["cross_len"], f["seeds"], f["temperature"], f["top_k"], f["top_p"], f["guidance"])
    with torch.inference_mode():
        want = dec.step(feeds["prev"].repeat(2), feeds["pos"], feeds["k_cache"].clone(), feeds["v_cache"].clone(),
                        feeds["cross_k"], feeds["cross_v"], feeds["cross_len"])
    paths = exported("dalle", (enc, dec), ("encoder", "step"))
    ort = {"onnxruntime fp32": ort_generator_parts(paths, dec, "fp32")["step"],
           "onnxruntime int8": ort_generator_parts({"step": paths["step"]}, dec, "int8")["step"]}
    torch_modes = {"torch fp32": "fp32", "torch auto": "auto"}
    providers = []
    for label, mode in torch_modes.items():
        g = Generator(copy.deepcopy(enc), copy.deepcopy(dec), None, device="cpu", dtype=mode)
        m = getattr(g, "mode", str(g.dtype).removeprefix("torch."))
        f = {k: (v.to(g.dtype) if v.is_floating_point() and v.dim() == 5 else v) for k, v in feeds.items()}
        with torch.inference_mode():
            logits = g.decoder.step(f["prev"].repeat(2), f["pos"], f["k_cache"].clone(), f["v_cache"].clone(),
                                    f["cross_k"], f["cross_v"], f["cross_len"])

        def run(g=g, f=f):
            with torch.inference_mode():
                return decode_step(g.decoder, *args(f), max_top_k=256)
        q = {"max_abs_logit_err": float((logits.float() - want).abs().max()),
             "greedy_same": bool(torch.equal(logits.argmax(-1), want.argmax(-1)))}
        providers.append(Provider(f"{label} ({m})" if mode == "auto" else label, run, m, q))
    for label, o in ort.items():
        f = {k: v.clone() for k, v in feeds.items()}
        o.decode_step(None, *args(f), max_top_k=256)
        b = o._bound[id(f["k_cache"])]
        q = {"max_abs_logit_err": float((b.logits - want).abs().max()),
             "greedy_same": bool(torch.equal(b.logits.argmax(-1), want.argmax(-1)))}
        providers.append(Provider(label, (lambda o=o, f=f: o.decode_step(None, *args(f), max_top_k=256)),
                                  label.split()[1], q))
    g = Generator(enc, dec, _tokenizer(), device="cpu", backend="auto")
    name = "tiny" if quick else "mini"
    yield Case("dalle.decode_step", f"{name} 1 image (2 rows), pos {cfg.image_tokens // 2}", providers,
               baseline="torch fp32", items=1, block=4, extra={"auto_choice": _auto_note(g.info, "step"),
                                                      "auto_encoder": _auto_note(g.info, "encoder")})


def cases(args):
    yield from _clip_cases(args.quick)
    yield from _vq_cases(args.quick)
    yield from _dalle_cases(args.quick)
