"""A tiny random-init CLIP (OpenAI's vocabulary, so mmfast's default tokenizer fits) and its ONNX towers."""
import pytest
import torch

from mmfast.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig
from mmfast.clip.model import CLIP


@pytest.fixture(scope="session")
def tiny_clip() -> CLIP:
    cfg = ClipConfig(embed_dim=16, vision=ClipVisionConfig(image_size=32, patch_size=16, width=32, layers=1,
                                                           heads=2, mlp_dim=64),
                     text=ClipTextConfig(context_length=77, width=32, layers=1, heads=2, mlp_dim=64))
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    with torch.no_grad():  # zeros (positional embedding, projection) would hide wrong wiring
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def clip_onnx(tiny_clip, tmp_path_factory):
    from mmfast.export.onnx import export_clip
    return export_clip(tiny_clip, tmp_path_factory.mktemp("clip_onnx"))
