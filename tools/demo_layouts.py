"""The demo models' files, in the layouts mmfast's ordinary loaders (and transformers, taming,
min-dalle) read: a Hugging Face CLIPModel folder, a taming VQGAN (names + model.yaml), min-dalle's
generator folder. Weights are stored as fp16 safetensors. Used by tools/train_demo.py; the
tokenizer files come from tools/demo_tokenizers.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mmfast.clip.model import CLIP  # noqa: E402
from mmfast.dalle.model import DalleDecoder, DalleEncoder  # noqa: E402
from mmfast.demo import data  # noqa: E402
from mmfast.preprocess import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from mmfast.vqgan.model import VQGAN  # noqa: E402


def fp16(sd: dict) -> dict:
    """Float tensors stored as fp16 (the loaders copy them into fp32 parameters): half the bytes."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}


def _to_hf_names(sd: dict) -> dict:
    """mmfast / OpenAI CLIP names -> Hugging Face CLIPModel names (the inverse of clip.load's map)."""
    from mmfast.clip.load import _HF_LAYER, _HF_TOP
    top = {v: k for k, v in _HF_TOP.items()}
    layer = {v: k for k, v in _HF_LAYER.items()}
    out = {}
    for k, v in sd.items():
        if k in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if k == "visual.proj" else "text_projection.weight"] = v.t().contiguous()
            continue
        name = next((top[t] + k[len(t):] for t in top if k == t or k.startswith(t + ".")), None)
        if name is None:
            tower = "vision_model" if k.startswith("visual.") else "text_model"
            i, sub = k.split("transformer.resblocks.")[1].split(".", 1)
            prefix = f"{tower}.encoder.layers.{i}."
            if sub.startswith("attn.in_proj."):
                kind = sub.rsplit(".", 1)[1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part.contiguous()
                continue
            ours = next(o for o in layer if sub.startswith(o + "."))
            name = prefix + layer[ours] + sub[len(ours):]
        out[name] = v.contiguous()
    return out


def save_clip(model: CLIP, out: Path) -> None:
    c = model.cfg
    tok = json.loads((out / "tokenizer_config.json").read_text())
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    save_file(fp16(_to_hf_names(model.state_dict())), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {"vocab_size": c.text.vocab_size, "hidden_size": c.text.width,
                        "intermediate_size": c.text.mlp_dim, "num_hidden_layers": c.text.layers,
                        "num_attention_heads": c.text.heads, "max_position_embeddings": c.text.context_length,
                        "hidden_act": c.act, "layer_norm_eps": c.layer_norm_eps, "projection_dim": c.embed_dim,
                        "bos_token_id": vocab[tok["bos_token"]], "eos_token_id": vocab[tok["eos_token"]],
                        "pad_token_id": vocab[tok["pad_token"]]},
        "vision_config": {"image_size": c.vision.image_size, "patch_size": c.vision.patch_size,
                          "hidden_size": c.vision.width, "intermediate_size": c.vision.mlp_dim,
                          "num_hidden_layers": c.vision.layers, "num_attention_heads": c.vision.heads,
                          "num_channels": 3, "hidden_act": c.act, "layer_norm_eps": c.layer_norm_eps,
                          "projection_dim": c.embed_dim},
    }, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": data.SIZE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": data.SIZE, "width": data.SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD), "do_convert_rgb": True}, indent=1))


def save_vq(model: VQGAN, out: Path) -> None:
    """model.safetensors (taming's names) and a taming model.yaml."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(fp16(model.state_dict()), out / "model.safetensors")
    c = model.cfg
    (out / "model.yaml").write_text(
        "# mmfast demo VQGAN (tools/train_demo.py): taming's VQModel config layout\n"
        "model:\n  target: taming.models.vqgan.VQModel\n  params:\n"
        f"    embed_dim: {c.embed_dim}\n    n_embed: {c.n_embed}\n    ddconfig:\n      double_z: false\n"
        f"      z_channels: {c.z_channels}\n      resolution: {c.resolution}\n      in_channels: 3\n"
        f"      out_ch: 3\n      ch: {c.ch}\n      ch_mult: {list(c.ch_mult)}\n"
        f"      num_res_blocks: {c.num_res_blocks}\n      attn_resolutions: {list(c.attn_resolutions)}\n"
        "      dropout: 0.0\n", encoding="utf-8")


def save_generator(enc: DalleEncoder, dec: DalleDecoder, out: Path) -> None:
    """min-dalle's encoder / decoder safetensors and a config.json for what the shapes cannot say
    (its tokenizer files are already in `out`)."""
    save_file(fp16(enc.state_dict()), out / "encoder.safetensors")
    save_file(fp16(dec.state_dict()), out / "decoder.safetensors")
    c = dec.cfg
    (out / "config.json").write_text(json.dumps({
        "comment": "mmfast demo generator (tools/train_demo.py); shapes give the rest of DalleConfig",
        "heads": c.heads, "codebook_size": c.codebook_size, "start_token": c.start_token,
        "text_pad_token": c.text_pad_token, "text_cleaning": "unicode", "vqgan": "../vq"}, indent=1))
