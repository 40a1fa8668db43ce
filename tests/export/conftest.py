"""A tiny random-init CLIP (OpenAI's vocabulary, so mmfast's default tokenizer fits), saved in the
open_clip layout (weights + open_clip_config.json, no open_clip needed), and its ONNX towers."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mmfast.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig
from mmfast.clip.model import CLIP

# 64-wide heads: the loaders infer heads = width / 64, as OpenAI's build_model does
CFG = ClipConfig(embed_dim=16, vision=ClipVisionConfig(image_size=32, patch_size=16, width=64, layers=1, heads=1,
                                                       mlp_dim=128),
                 text=ClipTextConfig(context_length=77, width=64, layers=1, heads=1, mlp_dim=128))


@pytest.fixture(scope="session")
def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    model = CLIP(CFG).eval()
    with torch.no_grad():  # zeros (positional embedding, projection) would hide wrong wiring
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_clip, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_open_clip")
    sd = {k.replace("attn.in_proj.", "attn.in_proj_"): v.contiguous() for k, v in tiny_clip.state_dict().items()}
    save_file(sd, d / "open_clip_model.safetensors")
    v, t = CFG.vision, CFG.text
    model_cfg = {"embed_dim": CFG.embed_dim,
                 "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                                "layers": v.layers},
                 "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                              "heads": t.heads, "layers": t.layers}}
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "resize_mode": "squash"}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pre}))
    return d


@pytest.fixture(scope="session")
def clip_onnx(tiny_clip, tmp_path_factory):
    from mmfast.export.onnx import export_clip
    return export_clip(tiny_clip, tmp_path_factory.mktemp("clip_onnx"))


@pytest.fixture(autouse=True)
def _tiny_models_run_on_one_thread(one_thread):
    pass
