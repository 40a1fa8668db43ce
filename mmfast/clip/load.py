"""CLIP checkpoints as people have them -> (ClipConfig, state dict in mmfast.clip.model's names).

Layouts understood (the config is inferred from the files; nothing is downloaded):
- open_clip directory: `open_clip_config.json` + `open_clip_model.safetensors` (or
  `open_clip_pytorch_model.bin`), as written by open_clip's `save_for_hf` / found on the HF hub;
- Hugging Face `CLIPModel` directory: `config.json` + `model.safetensors` (or `pytorch_model.bin`);
- OpenAI `clip` package file (`ViT-B-32.pt`, a TorchScript archive): weights are read out of the
  archive as data; its code never runs;
- a bare state dict (`.safetensors` / `.bin` / `.pt`) in OpenAI / open_clip names, with a preset
  `name` ("ViT-B-32", "ViT-B-32-quickgelu", ...) that says what activation it was trained with.
"""
from __future__ import annotations

import dataclasses
import math
import zipfile
from pathlib import Path

import torch

from ..io import read_json, read_state_dict
from .config import ClipConfig, ClipTextConfig, ClipVisionConfig, clip_preset

# Keys some checkpoints carry that are not weights (OpenAI's archive stores sizes; open_clip a mask).
_IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask", "logit_bias")


def load_clip_checkpoint(path, name: str | None = None) -> tuple[ClipConfig, dict]:
    """Read a CLIP checkpoint in any supported layout; see the module docstring."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"CLIP checkpoint {str(path)!r} does not exist; pass a directory (open_clip or Hugging "
            f"Face layout) or a checkpoint file")
    if path.is_dir():
        if (path / "open_clip_config.json").exists():
            return _open_clip_dir(path)
        if (path / "config.json").exists():
            return _hf_dir(path)
        raise ValueError(
            f"{str(path)!r} holds neither open_clip_config.json (open_clip layout) nor config.json "
            f"(Hugging Face CLIPModel layout)")
    preset = clip_preset(name) if name is not None else None  # a bad name fails before any I/O
    sd = read_state_dict(path)
    if _is_torchscript(path):
        # the OpenAI `clip` package's TorchScript archive: trained with quick_gelu
        return _from_openai_names(sd, act="quick_gelu", name=str(path))
    if name is None:
        raise ValueError(
            f"{str(path)!r} is a bare state dict, which does not say its architecture; pass "
            f"name=<preset>, e.g. name='ViT-B-32' (open_clip) or 'ViT-B-32-quickgelu' (OpenAI weights)")
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        raise ValueError(f"{str(path)!r} holds Hugging Face CLIP keys; load its directory (with config.json)")
    # the preset is the architecture; load_into then names any key whose shape does not fit it
    sd = {k: v for k, v in sd.items() if k.split(".")[-1] not in _IGNORED}
    return preset, _rename_in_proj(sd)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def _from_openai_names(sd: dict, act: str, name: str) -> tuple[ClipConfig, dict]:
    """Infer the architecture from OpenAI / open_clip parameter shapes (as OpenAI's build_model)."""
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and k.split(".")[-1] not in _IGNORED}
    need = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
            "positional_embedding", "text_projection", "visual.proj", "ln_final.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(
            f"checkpoint {name!r} is not an OpenAI/open_clip ViT CLIP state dict: missing {missing} "
            f"(ResNet towers, timm or HF text towers are not supported)")
    conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    v_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    t_layers = _count_blocks(sd, "transformer.resblocks.")
    v_width, t_width = conv.shape[0], sd["ln_final.weight"].shape[0]
    vision = ClipVisionConfig(
        image_size=conv.shape[-1] * grid, patch_size=conv.shape[-1], width=v_width, layers=v_layers,
        heads=v_width // 64, mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    text = ClipTextConfig(
        context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
        width=t_width, layers=t_layers, heads=t_width // 64,
        mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    cfg = ClipConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text, act=act)
    return cfg, _rename_in_proj(sd)


def _count_blocks(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _rename_in_proj(sd: dict) -> dict:
    # nn.MultiheadAttention's raw in_proj_weight/bias -> our in_proj Linear
    return {k.replace("attn.in_proj_weight", "attn.in_proj.weight")
             .replace("attn.in_proj_bias", "attn.in_proj.bias"): v for k, v in sd.items()}


def _weights_file(d: Path, *names: str) -> Path:
    for n in names:
        if (d / n).exists():
            return d / n
    raise FileNotFoundError(f"{str(d)!r} has none of the weight files {list(names)}")


_OPEN_CLIP_UNSUPPORTED = {
    "vision_cfg": ("timm_model_name", "attentional_pool", "ls_init_value", "no_ln_pre",
                   "final_ln_after_pool", "output_tokens"),
    "text_cfg": ("hf_model_name", "ls_init_value", "no_causal_mask", "proj_bias", "embed_cls"),
}


def _open_clip_dir(d: Path) -> tuple[ClipConfig, dict]:
    raw = read_json(d / "open_clip_config.json")
    mc = raw.get("model_cfg", raw)
    for tower, keys in _OPEN_CLIP_UNSUPPORTED.items():
        for k in keys:
            if mc.get(tower, {}).get(k):
                raise ValueError(f"open_clip config {tower}.{k}={mc[tower][k]!r} is not supported by mmfast")
    for tower, ok in (("vision_cfg", ("tok",)), ("text_cfg", ("argmax", "eos"))):
        pool = mc.get(tower, {}).get("pool_type")
        if pool not in (None, *ok):
            raise ValueError(f"open_clip config {tower}.pool_type={pool!r} is not supported (only {ok})")
    act = "quick_gelu" if mc.get("quick_gelu") else "gelu"
    sd = read_state_dict(_weights_file(d, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    cfg, sd = _from_openai_names(sd, act=act, name=str(d))
    tc = mc.get("text_cfg", {})
    if tc.get("pool_type") == "eos":
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, pool="eos",
                                                    eos_token_id=tc.get("eos_id", cfg.text.eos_token_id)))
    return cfg, sd


# Hugging Face CLIPModel -> OpenAI names; per-layer suffixes first, then the tower-level ones.
_HF_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}
_HF_TOP = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm": "visual.ln_pre",  # sic: HF's spelling
    "vision_model.post_layernorm": "visual.ln_post",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm": "ln_final",
    "logit_scale": "logit_scale",
}


def _hf_dir(d: Path) -> tuple[ClipConfig, dict]:
    raw = read_json(d / "config.json")
    if raw.get("model_type") not in (None, "clip"):
        raise ValueError(f"{str(d / 'config.json')!r} has model_type={raw.get('model_type')!r}; "
                         f"only Hugging Face 'clip' models are supported")
    tc, vc = raw.get("text_config", {}), raw.get("vision_config", {})
    acts = {tc.get("hidden_act", "quick_gelu"), vc.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ValueError(f"unsupported hidden_act {sorted(acts)} in {str(d / 'config.json')!r}")
    eps = {tc.get("layer_norm_eps", 1e-5), vc.get("layer_norm_eps", 1e-5)}
    if len(eps) != 1:
        raise ValueError(f"text and vision layer_norm_eps differ ({sorted(eps)}); not supported")
    eos = tc.get("eos_token_id", 49407)
    text = ClipTextConfig(
        context_length=tc.get("max_position_embeddings", 77), vocab_size=tc.get("vocab_size", 49408),
        width=tc.get("hidden_size", 512), layers=tc.get("num_hidden_layers", 12),
        heads=tc.get("num_attention_heads", 8), mlp_dim=tc.get("intermediate_size", 2048),
        # transformers pools at argmax(ids) when eos_token_id == 2 (legacy configs), else first eos
        pool="argmax" if eos == 2 else "eos", eos_token_id=eos)
    vision = ClipVisionConfig(
        image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 32),
        width=vc.get("hidden_size", 768), layers=vc.get("num_hidden_layers", 12),
        heads=vc.get("num_attention_heads", 12), mlp_dim=vc.get("intermediate_size", 3072))
    cfg = ClipConfig(embed_dim=raw.get("projection_dim", 512), vision=vision, text=text,
                     act=acts.pop(), layer_norm_eps=eps.pop())
    sd = read_state_dict(_weights_file(d, "model.safetensors", "pytorch_model.bin"))
    return cfg, _from_hf_names(sd)


def _from_hf_names(sd: dict) -> dict:
    out, qkv = {}, {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in ("visual_projection.weight", "text_projection.weight"):  # Linear (out, in) -> x @ P
            out["visual.proj" if k.startswith("visual") else "text_projection"] = v.t().contiguous()
            continue
        for hf, ours in _HF_TOP.items():
            if k == hf or k.startswith(hf + "."):
                out[ours + k[len(hf):]] = v
                break
        else:
            tower, _, rest = k.partition(".encoder.layers.")
            if not rest or tower not in ("vision_model", "text_model"):
                out[k] = v  # unknown: reported by the shape/key check
                continue
            i, _, sub = rest.partition(".")
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
            if sub.startswith("self_attn.") and sub.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                proj, kind = sub.split(".")[1:3]
                qkv.setdefault((prefix, kind), {})[proj] = v
                continue
            for hf, ours in _HF_LAYER.items():
                if sub.startswith(hf + "."):
                    sub = ours + sub[len(hf):]
                    break
            out[prefix + sub] = v
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise ValueError(f"{prefix}self_attn has {sorted(parts)} {kind}s; expected q_proj, k_proj, v_proj")
        out[f"{prefix}attn.in_proj.{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def load_into(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Copy `sd` into `model`, first checking every key and shape; errors name the key."""
    own = model.state_dict()
    for k, v in own.items():  # shapes first: a wrong architecture shows up as a named shape
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(
                f"checkpoint {source!r}: {k} has shape {tuple(sd[k].shape)} but the architecture "
                f"needs {tuple(v.shape)}; check the model name / config")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source!r} does not fit the architecture: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}")
    model.load_state_dict(sd, strict=True)
