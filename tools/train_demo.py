"""Train mmfast's built-in demo models on this CPU: a tiny CLIP, VQGAN and DALL·E-style generator.

    python tools/train_demo.py                       # ~25 min on 2 vCPUs (Zen 5) -> mmfast/demo/weights
    python tools/train_demo.py --out /tmp/demo       # anywhere else
    python tools/train_demo.py --smoke --out /tmp/s  # seconds: every stage, a few steps (tests)

Data: `mmfast.demo.data` (coloured shapes, English and Russian captions): every distinct training
scene (`data.every`, 9,600: never the held-out (colour, shape, position) triples) rendered once,
seeded uniform draws of them per step, fresh captions per step. Stages run VQGAN, CLIP, generator:
a quarter of each CLIP batch shows VQGAN-decoded pictures (the CLIP reranks and judges the
generator's decoded images), and the generator learns the shipped VQGAN's tokens. The models are mmfast's own
classes; the files (written by tools/demo_layouts.py) are the layouts the ordinary loaders read:

- clip/: a Hugging Face CLIPModel folder (config.json, model.safetensors) with a byte-level BPE
  tokenizer trained here on the captions of both languages (vocab.json, merges.txt);
- vq/: taming names (model.safetensors) with a taming model.yaml; f8, 4 x 4 tokens per image;
- generator/: min-dalle's folder (encoder / decoder as safetensors, BART-style vocab.json and
  merges.txt) with config.json for what the shapes cannot say (codebook, start token, heads) and
  "vqgan": "../vq".

Losses: CLIP's symmetric contrastive loss with every matching caption a positive (captions name a
subset of the attributes); the VQGAN's L2 + L1 reconstruction and commitment, EMA codebook with
dead-code restarts (no perceptual or adversarial term); the generator's next-token cross-entropy,
teacher-forced, with 15% of prompts dropped to the unconditioned row (guidance). Every stage is
seeded, threads fixed (2), so a rerun reproduces the metrics (on a CPU of the same kind: the VQGAN's
bf16 autocast is taken only where the CPU has native bf16, fp32 elsewhere, a different rounding).
A loss log goes to train_log.jsonl, the metrics of the saved files (loaded back through the
loaders) to metrics.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmfast.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig  # noqa: E402
from mmfast.clip.model import CLIP  # noqa: E402
from mmfast.dalle.config import DalleConfig  # noqa: E402
from mmfast.dalle.model import DalleDecoder, DalleEncoder  # noqa: E402
from mmfast.demo import data  # noqa: E402
from mmfast.preprocess import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from mmfast.vqgan.config import VQConfig  # noqa: E402
from mmfast.vqgan.model import VQGAN  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_layouts import save_clip, save_generator, save_vq  # noqa: E402
from demo_tokenizers import (CLIP_CONTEXT, GEN_TEXT_TOKENS, build_clip_tokenizer,  # noqa: E402,F401
                             build_dalle_tokenizer)


@dataclass(frozen=True)
class Plan:
    """Steps and batch sizes per stage (the architectures are fixed: see the build_* functions)."""
    clip_steps: int = 1500
    clip_batch: int = 128
    clip_lr: float = 2e-3
    clip_decoded: int = 9600   # training scenes passed through the trained VQGAN once (9600: every one);
                               # a quarter of each CLIP batch
    vq_steps: int = 3600
    vq_batch: int = 64
    vq_lr: float = 2e-3
    vq_bf16: str = "auto"      # bf16 autocast for the VQGAN's convs: "auto" = where the CPU has native
                               # bf16 dot products (AVX512_BF16 / AMX; ~1.4x a step measured on Zen 5)
    gen_steps: int = 2500
    gen_batch: int = 128
    gen_lr: float = 2e-3
    gen_pool: int = 9600       # training scenes tokenized once by the trained VQGAN (9600: every one)


SMOKE = Plan(clip_steps=3, clip_batch=16, clip_decoded=32, vq_steps=3, vq_batch=8, gen_steps=3, gen_batch=16,
             gen_pool=64)


class Log:
    """One JSON line per logged step: {"stage", "step", "loss", ...}."""

    def __init__(self, path: Path):
        self.f = open(path, "w", encoding="utf-8")

    def __call__(self, **row) -> None:
        self.f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}) + "\n")
        self.f.flush()


def _schedule(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    warm = min(warmup, max(1, steps // 10))
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _optimizer(model: torch.nn.Module, lr: float, wd: float = 0.01) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


# ---- CLIP ------------------------------------------------------------------------------------------
def build_clip(vocab_size: int, eot_id: int) -> CLIP:
    cfg = ClipConfig(
        embed_dim=64,
        vision=ClipVisionConfig(image_size=data.SIZE, patch_size=4, width=96, layers=3, heads=3, mlp_dim=384),
        text=ClipTextConfig(context_length=CLIP_CONTEXT, vocab_size=vocab_size, width=96, layers=2, heads=3,
                            mlp_dim=384, pool="eos", eos_token_id=eot_id),
        act="gelu")
    model = CLIP(cfg)
    # CLIP's init: small embeddings, learnable temperature starting at 1 / 0.07
    torch.nn.init.normal_(model.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(model.positional_embedding, std=0.01)
    torch.nn.init.normal_(model.visual.positional_embedding, std=0.01)
    torch.nn.init.normal_(model.visual.class_embedding, std=0.02)
    torch.nn.init.normal_(model.visual.proj, std=cfg.vision.width ** -0.5)
    torch.nn.init.normal_(model.text_projection, std=cfg.text.width ** -0.5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
    return model


def _clip_pixels(images: torch.Tensor) -> torch.Tensor:
    # uint8 [N, S, S, 3] -> normalised [N, 3, S, S], as ImagePreprocessor does
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def _positives(s: data.Scenes, mentions) -> torch.Tensor:
    """[N_images, N_captions] bool: image i fits caption j (every attribute the caption names)."""
    m = torch.from_numpy(mentions)
    fit = (s.colour[:, None] == s.colour[None]) & (s.shape[:, None] == s.shape[None])
    for k, attr in enumerate((s.position, s.size, s.background)):
        fit &= (attr[:, None] == attr[None]) | ~m[None, :, k]
    return fit


def _cat(a: data.Scenes, b: data.Scenes) -> data.Scenes:
    return data.Scenes(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in data.Scenes.__dataclass_fields__))


def _take(s: data.Scenes, idx: torch.Tensor) -> data.Scenes:
    return data.Scenes(*(getattr(s, f)[idx] for f in data.Scenes.__dataclass_fields__))


class _Pool:
    """Every distinct training scene (`data.every`), rendered once; `draw` picks uniform rows, which
    is `data.sample`'s distribution without rendering every step."""

    def __init__(self, seed: int):
        self.scenes = data.every("train")
        self.rng = torch.Generator().manual_seed(seed)

    def subset(self, n: int) -> data.Scenes:
        """`n` distinct rows in a seeded order (all of them for n >= len)."""
        return _take(self.scenes, torch.randperm(len(self.scenes), generator=self.rng)[:n])

    def draw(self, n: int) -> data.Scenes:
        return _take(self.scenes, torch.randint(0, len(self.scenes), (n,), generator=self.rng))


def decoded_scenes(vq_model: VQGAN | None, n: int, seed: int) -> data.Scenes | None:
    """`n` distinct training scenes whose pictures went through the VQGAN (encode -> decode,
    uint8): the pictures the generator's images will look like, so that the CLIP that reranks and
    judges them has seen the decoder's softening of small shapes."""
    if vq_model is None or n == 0:
        return None
    s = _Pool(seed).subset(n)
    n = len(s)
    with torch.no_grad():
        vq_model.quantize.refresh()
        x = s.pixels() * 2 - 1
        px = torch.cat([vq_model.decode(vq_model.encode(x[i:i + 512])) for i in range(0, n, 512)])
    images = ((px.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return data.Scenes(s.colour, s.shape, s.position, s.size, s.background, s.offset, images)


def train_clip(out: Path, plan: Plan, log: Log, seed: int, vq_model: VQGAN | None = None) -> None:
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(out)
    model = build_clip(tokenizer.vocab_size, tokenizer.eot_id).train()
    opt = _optimizer(model, plan.clip_lr, wd=0.05)
    decoded = decoded_scenes(vq_model, plan.clip_decoded, seed * 4_000_003)
    rng = torch.Generator().manual_seed(seed + 4)
    pool = _Pool(seed * 1_000_003)
    bar = tqdm(range(plan.clip_steps), desc="clip", mininterval=2)
    for step in bar:
        s = pool.draw(plan.clip_batch)
        if decoded is not None:      # a quarter of the batch: VQGAN-decoded pictures
            k = plan.clip_batch // 4
            s = _cat(_take(s, torch.arange(plan.clip_batch - k)),
                     _take(decoded, torch.randint(0, len(decoded), (k,), generator=rng)))
        text, mentions = data.captions(s, "mix", seed=seed * 1_000_003 + step, return_mentions=True)
        img = F.normalize(model.encode_image(_clip_pixels(s.images)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(text)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()              # (N_img, N_txt)
        pos = _positives(s, mentions).float()
        loss = 0.5 * (torch.sum(-pos / pos.sum(1, keepdim=True) * logits.log_softmax(1), 1).mean()
                      + torch.sum(-pos / pos.sum(0, keepdim=True) * logits.log_softmax(0), 0).mean())
        _set_lr(opt, _schedule(step, plan.clip_steps, plan.clip_lr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == plan.clip_steps - 1:
            log(stage="clip", step=step, loss=loss.item(), logit_scale=model.logit_scale.exp().item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    save_clip(model.eval(), out)


# ---- VQGAN -----------------------------------------------------------------------------------------
VQ_CONFIG = VQConfig(resolution=data.SIZE, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                     z_channels=64, embed_dim=32, n_embed=256)


class _EmaCodebook:
    """Training-time codebook: nearest code, EMA updates, dead codes restarted from batch vectors."""

    def __init__(self, weight: torch.Tensor, decay: float = 0.97):
        self.w = weight                                   # the model's quantize.embedding.weight (data)
        self.decay = decay
        self.count = torch.ones(weight.shape[0])
        self.sum = weight.detach().clone()
        self.usage = torch.zeros(weight.shape[0])

    def __call__(self, z: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # z: (B, D, h, w) -> nearest codes (B, h, w) and their vectors (B, D, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).detach()   # (M, D)
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.w.t() + self.w.pow(2).sum(1)[None]
        ids = d.argmin(1)
        if update:
            onehot = F.one_hot(ids, self.w.shape[0]).float()            # (M, K)
            self.count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
            self.sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
            n = self.count.sum()
            count = (self.count + 1e-5) / (n + self.w.shape[0] * 1e-5) * n
            self.w.data.copy_(self.sum / count[:, None])
            self.usage.mul_(0.99).add_(onehot.sum(0) > 0, alpha=0.01)
            dead = (self.usage < 1e-3).nonzero()[:, 0]
            if len(dead):                                                # restart from random batch vectors
                pick = flat[torch.randint(0, flat.shape[0], (len(dead),))]
                self.w.data[dead] = pick
                self.sum[dead], self.count[dead], self.usage[dead] = pick, 1.0, 1.0
        q = F.embedding(ids, self.w.detach()).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        return ids.view(z.shape[0], z.shape[2], z.shape[3]), q


def _use_bf16(mode: str) -> bool:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"vq_bf16={mode!r}: use 'auto', 'on' or 'off'")
    from mmfast.quantize import has_fast_bf16
    return mode == "on" or (mode == "auto" and has_fast_bf16())


def train_vq(out: Path, plan: Plan, log: Log, seed: int) -> None:
    torch.manual_seed(seed + 1)
    model = VQGAN(VQ_CONFIG).train()
    params = [p for n, p in model.named_parameters() if not n.startswith("quantize.")]
    opt = torch.optim.Adam(params, lr=plan.vq_lr, betas=(0.9, 0.99))
    codebook = None
    bf16 = _use_bf16(plan.vq_bf16)
    pool = _Pool(seed * 2_000_003)
    bar = tqdm(range(plan.vq_steps), desc="vq (bf16 autocast)" if bf16 else "vq", mininterval=2)
    for step in bar:
        s = pool.draw(plan.vq_batch)
        # taming's [-1, 1], NCHW-contiguous: GroupNorm's differentiable path keeps the layout, no copies
        x = (s.pixels() * 2 - 1).contiguous()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = model.quant_conv(model.encoder(x)).float()                     # (B, D, 4, 4)
        if codebook is None:                                                   # codes start on encoder outputs
            with torch.no_grad():
                flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                model.quantize.embedding.weight.copy_(flat[torch.randint(0, len(flat), (VQ_CONFIG.n_embed,))])
            codebook = _EmaCodebook(model.quantize.embedding.weight)
        _, q = codebook(z, update=True)
        commit = F.mse_loss(z, q)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model.decoder(model.post_quant_conv(z + (q - z).detach())).float()   # straight-through
        rec = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
        loss = rec + 0.25 * commit
        _set_lr(opt, _schedule(step, plan.vq_steps, plan.vq_lr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == plan.vq_steps - 1:
            mse01 = F.mse_loss(y.detach().clamp(-1, 1), x).item() / 4
            log(stage="vq", step=step, loss=loss.item(), commit=commit.item(),
                psnr=10 * math.log10(1 / max(mse01, 1e-10)), codes_used=int((codebook.usage > 1e-3).sum()))
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{10 * math.log10(1 / max(mse01, 1e-10)):.1f}")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_vq(model, out)


# ---- generator ---------------------------------------------------------------------------------------
def build_generator(text_vocab: int) -> tuple[DalleEncoder, DalleDecoder]:
    n = VQ_CONFIG.n_embed
    cfg = DalleConfig(encoder_layers=2, decoder_layers=3, width=128, heads=4, glu_dim=256, text_vocab=text_vocab,
                      text_tokens=GEN_TEXT_TOKENS, image_vocab=n, image_tokens=VQ_CONFIG.grid ** 2,
                      codebook_size=n, start_token=n)  # its own start row: one past the codebook
    enc, dec = DalleEncoder(cfg), DalleDecoder(cfg)
    for m in (enc, dec):
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)
    return enc, dec


def decoder_logits(dec: DalleDecoder, state: torch.Tensor, text: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of every position at once: what `DalleDecoder.step` computes one
    position at a time (checked by `_check_step_parity`). prev: (N, T) tokens fed at positions 0..T-1."""
    T = prev.shape[1]
    x = dec.layernorm_embedding(dec.embed_tokens(prev) + dec.embed_positions.weight[:T])     # (N, T, W)
    key_mask = (text != dec.cfg.text_pad_token)[:, None, None, :]                            # (N, 1, 1, S)
    for layer in dec.layers:
        sa, ca = layer.self_attn, layer.encoder_attn
        h = layer.pre_self_attn_layer_norm(x)
        q, k, v = (sa.split(p(h)) for p in (sa.q_proj, sa.k_proj, sa.v_proj))               # (N, H, T, Dh)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + layer.self_attn_layer_norm(sa.out_proj(a.transpose(1, 2).flatten(2)))
        q = ca.split(ca.q_proj(layer.pre_encoder_attn_layer_norm(x)))
        k, v = ca.split(ca.k_proj(state)), ca.split(ca.v_proj(state))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + layer.encoder_attn_layer_norm(ca.out_proj(a.transpose(1, 2).flatten(2)))
        x = x + layer.glu(x)
    return dec.lm_head(dec.final_ln(x))[..., : dec.cfg.codebook_size]                       # (N, T, K)


def _check_step_parity(enc, dec, text, tokens) -> float:
    """Max |teacher-forced - step-by-step| logit difference on a few rows (the decode loop's view)."""
    with torch.no_grad():
        state = enc(text)
        prev = torch.cat([torch.full_like(tokens[:, :1], dec.cfg.start_token), tokens[:, :-1]], 1)
        full = decoder_logits(dec, state, text, prev)
        ck, cv, cl = dec.cross_kv(state, text)
        kc, vc = dec.new_cache(text.shape[0])
        steps = [dec.step(prev[:, i], torch.tensor(i), kc, vc, ck, cv, cl) for i in range(prev.shape[1])]
        return (torch.stack(steps, 1) - full).abs().max().item()


def train_generator(out: Path, vq_model: VQGAN, plan: Plan, log: Log, seed: int) -> None:
    torch.manual_seed(seed + 2)
    tokenizer = build_dalle_tokenizer(out)
    pool = _Pool(seed * 3_000_003).subset(plan.gen_pool)
    with torch.no_grad():                                       # the scenes' tokens, once: (P, 16)
        vq_model.quantize.refresh()
        x = pool.pixels() * 2 - 1
        codes = torch.cat([vq_model.encode(x[i:i + 512]) for i in range(0, len(pool), 512)]).flatten(1)
    enc, dec = build_generator(max(json.loads((out / "vocab.json").read_text()).values()) + 1)
    enc.train(), dec.train()
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=plan.gen_lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = torch.Generator().manual_seed(seed + 3)
    bar = tqdm(range(plan.gen_steps), desc="generator", mininterval=2)
    for step in bar:
        idx = torch.randint(0, len(pool), (plan.gen_batch,), generator=rng)
        scenes = _take(pool, idx)
        rows = tokenizer(data.captions(scenes, "mix", seed=seed * 3_000_003 + step))  # (N, 2, T)
        drop = torch.rand(plan.gen_batch, generator=rng) < 0.15     # unconditioned row: learns guidance
        text = torch.where(drop[:, None], rows[:, 0], rows[:, 1])
        target = codes[idx]                                           # (N, 16)
        prev = torch.cat([torch.full_like(target[:, :1], dec.cfg.start_token), target[:, :-1]], 1)
        logits = decoder_logits(dec, enc(text), text, prev)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        _set_lr(opt, _schedule(step, plan.gen_steps, plan.gen_lr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == plan.gen_steps - 1:
            log(stage="generator", step=step, loss=loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    enc.eval(), dec.eval()
    gap = _check_step_parity(enc, dec, text[:4], target[:4])
    assert gap < 1e-3, f"teacher-forced logits differ from DalleDecoder.step by {gap}"
    save_generator(enc, dec, out)


# ---- main --------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "mmfast" / "demo" / "weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a few steps per stage (seconds): the trainer's test")
    p.add_argument("--stages", default="vq,clip,generator",
                   help="comma-separated subset; later stages read earlier ones' files from --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = SMOKE if args.smoke else Plan()
    stages = args.stages.split(",")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / ("train_log.jsonl" if stages == ["vq", "clip", "generator"] else f"train_log.{'-'.join(stages)}.jsonl"))
    times = {}
    t0 = time.perf_counter()
    if "vq" in stages:
        train_vq(out / "vq", plan, log, args.seed)
        times["vq_s"] = time.perf_counter() - t0
    vq_model = None
    if "clip" in stages or "generator" in stages:
        # later stages see the VQGAN as shipped (fp16-rounded), read back from its file
        from mmfast.vqgan.load import load_into, load_vq_checkpoint
        cfg, sd = load_vq_checkpoint(out / "vq")
        vq_model = VQGAN(cfg).eval()
        load_into(vq_model, sd, str(out / "vq"))
    t = time.perf_counter()
    if "clip" in stages:
        train_clip(out / "clip", plan, log, args.seed, vq_model)
        times["clip_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if "generator" in stages:
        train_generator(out / "generator", vq_model, plan, log, args.seed)
        times["generator_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    metrics = measure(out, smoke=args.smoke)
    record = {**metrics, "train_seconds": {k: round(v, 1) for k, v in times.items()}, "stages": stages,
              "vq_bf16_autocast": _use_bf16(plan.vq_bf16) if "vq" in stages else None,
              "cpu": _cpu_name(), "threads": args.threads, "torch": torch.__version__, "seed": args.seed,
              "plan": plan.__dict__, "smoke": args.smoke}
    (out / "metrics.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=1, ensure_ascii=False))
    return record


def measure(out: Path, smoke: bool = False) -> dict:
    """The metrics of the saved files, loaded back through mmfast's ordinary loaders (fp32, torch)."""
    from mmfast import load_clip, load_generator, load_vq
    from mmfast.demo import evaluate
    clip = load_clip(out / "clip", device="cpu", dtype="fp32", backend="torch")
    vq = load_vq(out / "vq", device="cpu", dtype="fp32", backend="torch")
    gen = load_generator(out / "generator", device="cpu", dtype="fp32", backend="torch", vqgan=vq)
    if smoke:  # the files load and every metric runs; the numbers mean nothing after 3 steps
        return {"zero_shot_accuracy_en": evaluate.zero_shot_accuracy(clip, "en", n=16),
                "zero_shot_accuracy_ru": evaluate.zero_shot_accuracy(clip, "ru", n=16),
                "vq_psnr_db": evaluate.reconstruction_psnr(vq, n=8),
                "generation_accuracy": evaluate.generation_accuracy(gen, clip, n=2, rounds=1)}
    return {**evaluate.evaluate_all(clip, vq, gen), "sampling": evaluate.SAMPLING}


if __name__ == "__main__":
    main()
