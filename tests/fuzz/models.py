"""Tiny random-init models and their checkpoint files, built once per module (a few hundred KB each,
so that a fuzz case can rewrite a whole file cheaply)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from mmfast.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig
from mmfast.clip.model import CLIP
from mmfast.dalle.config import DalleConfig
from mmfast.dalle.model import DalleDecoder, DalleEncoder
from mmfast.vqgan import VQGAN, VQConfig

# 64-wide heads: the loaders infer heads = width / 64, as OpenAI's build_model does
CLIP_CFG = ClipConfig(embed_dim=16, vision=ClipVisionConfig(image_size=16, patch_size=8, width=64, layers=1, heads=1,
                                                            mlp_dim=64),
                      text=ClipTextConfig(context_length=8, vocab_size=64, width=64, layers=1, heads=1, mlp_dim=64))
# The loader fuzz rewrites the file per case, so its text vocabulary is tiny (encode_texts would need
# mmfast's default tokenizer's 49408 ids); the CLI's model has the real vocabulary.
CLI_CLIP_CFG = CLIP_CFG.replace(text=ClipTextConfig(context_length=77, width=64, layers=1, heads=1, mlp_dim=64))
# GroupNorm(32) needs 32-channel multiples; f2 (ch_mult of length 2), no attention: the smallest VQGAN
VQ_CFG = VQConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32,
                  embed_dim=8, n_embed=64)
# the generator's VQGAN: DALL·E samples 2**14 codes; 4 x 4 tokens -> 8 x 8 pixels
VQ16K_CFG = VQ_CFG.replace(embed_dim=4, n_embed=2 ** 14)
# DALL·E with 16 image tokens (a 4 x 4 grid) so that a whole generate call is a few ms
DALLE_CFG = DalleConfig(encoder_layers=1, decoder_layers=1, width=64, heads=1, glu_dim=64, text_vocab=128,
                        text_tokens=16, image_tokens=16)


def _randomize(module: torch.nn.Module, seed: int, skip=("logit_scale",)) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zeros (positional embeddings, projections) would hide wrong wiring
        for name, p in module.named_parameters():
            if name not in skip:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("ln_1.weight") else 0.0))
    return module.eval()


def tiny_clip(cfg: ClipConfig = CLIP_CFG) -> CLIP:
    return _randomize(CLIP(cfg), 0)


def tiny_vq(cfg: VQConfig = VQ_CFG) -> VQGAN:
    return _randomize(VQGAN(cfg), 1)


def tiny_dalle():
    return _randomize(DalleEncoder(DALLE_CFG), 2), _randomize(DalleDecoder(DALLE_CFG), 3)


def openai_names(sd: dict) -> dict:
    """mmfast's CLIP names -> OpenAI / open_clip's (the in_proj Linear is a raw parameter there)."""
    return {k.replace("attn.in_proj.", "attn.in_proj_"): v.contiguous() for k, v in sd.items()}


def write_clip_dir(d: Path, model: CLIP) -> Path:
    """open_clip's layout: open_clip_model.safetensors + open_clip_config.json."""
    d.mkdir(parents=True, exist_ok=True)
    save_file(openai_names(model.state_dict()), d / "open_clip_model.safetensors")
    v, t = model.cfg.vision, model.cfg.text
    model_cfg = {"embed_dim": model.cfg.embed_dim,
                 "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                                "layers": v.layers},
                 "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                              "heads": t.heads, "layers": t.layers}}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return d


def write_vq_run(d: Path, model: VQGAN) -> Path:
    """taming's run folder: ckpts/last.ckpt (Lightning layout) + configs/model.yaml; returns the ckpt."""
    (d / "ckpts").mkdir(parents=True, exist_ok=True)
    (d / "configs").mkdir(exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, d / "ckpts" / "last.ckpt")
    c = VQ_CFG
    dd = dict(double_z=False, z_channels=c.z_channels, resolution=c.resolution, in_channels=3, out_ch=3, ch=c.ch,
              ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks, attn_resolutions=[], dropout=0.0)
    cfg = {"model": {"target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": c.embed_dim, "n_embed": c.n_embed, "ddconfig": dd}}}
    (d / "configs" / "model.yaml").write_text(yaml.safe_dump(cfg))
    return d / "ckpts" / "last.ckpt"


def dalle_vocab() -> tuple[dict, list[str]]:
    """A BART-like vocabulary small enough for DALLE_CFG.text_vocab: specials, Ġ, letters, a few merges."""
    g = chr(ord(" ") + 256)  # "Ġ"
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, g: 4}
    for c in [chr(c) for c in range(33, 127)]:
        vocab[c] = len(vocab)
    merges = [f"{g} a", "t h", f"{g} th", "e r"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    assert len(vocab) <= DALLE_CFG.text_vocab
    return vocab, merges


def write_dalle_dir(d: Path, encoder: DalleEncoder, decoder: DalleDecoder) -> Path:
    """min-dalle's model folder: encoder.pt, decoder.pt, vocab.json, merges.txt."""
    d.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), d / "encoder.pt")
    torch.save(decoder.state_dict(), d / "decoder.pt")
    vocab, merges = dalle_vocab()
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf8")
    return d
