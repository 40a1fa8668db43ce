"""CLIP towers: mmfast vs open_clip (eager fp32, bf16 autocast), ONNX Runtime fp32, transformers.

Same random-init ViT-B-32 weights for everyone (no weights can be downloaded here): open_clip
builds the model, it is saved in open_clip's own layout, and mmfast loads that directory.
Quality: the minimum cosine of each provider's embeddings to open_clip fp32's.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..harness import Case, Provider

ARCH = "ViT-B-32"
PROMPTS = ["a photo of a {}.", "a blurry photo of a {}.", "an origami {}.", "a sketch of the {}.",
           "itap of my {}.", "a low resolution photo of the {} on a table in the kitchen."]
LABELS = ["cat", "dog", "golden retriever", "tabby cat", "car", "airplane", "teacher", "кошка"]


def _open_clip():
    import tests.torchvision_shim  # noqa: F401 - lets open_clip import torchvision
    import open_clip
    return open_clip


def vit_flops(cfg, n_tokens: int, width: int, layers: int, mlp: int) -> float:
    """FLOPs of one sequence through a pre-LN transformer (matmuls only; 2 FLOPs per MAC)."""
    per_layer = 2 * n_tokens * (4 * width * width + 2 * width * mlp) + 4 * n_tokens * n_tokens * width
    return layers * per_layer


def _peaks(quick: bool):
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    ab, bb = a.bfloat16(), b.bfloat16()
    from mmfast.quantize import Int8Linear
    q = Int8Linear(torch.nn.Linear(n, n, bias=False))
    yield Case("peak.matmul", f"{n}^3", [
        Provider("torch fp32 matmul", lambda: a @ b, "fp32"),
        Provider("torch bf16 matmul", lambda: ab @ bb, "bf16"),
        Provider("fbgemm int8 (mmfast Int8Linear)", lambda: q(a), "int8"),
    ], baseline="torch fp32 matmul", flops=2 * n ** 3)


def cases(args):
    yield from _peaks(args.quick)
    import mmfast
    open_clip = _open_clip()
    torch.manual_seed(0)
    ref = open_clip.create_model(ARCH, pretrained=None).eval()
    tmp = Path(tempfile.mkdtemp(prefix="mmfast-bench-"))
    from safetensors.torch import save_file
    save_file(ref.state_dict(), tmp / "open_clip_model.safetensors")
    from open_clip.push_to_hf_hub import save_config_for_hf
    save_config_for_hf(ref, tmp / "open_clip_config.json",
                                                 open_clip.get_model_config(ARCH))
    fast = mmfast.load_clip(tmp)                # dtype="auto"
    fast32 = mmfast.load_clip(tmp, dtype="fp32")
    fast_ort = mmfast.load_clip(tmp, backend="onnxruntime", dtype="int8")
    ort_img = _ort_session(ref, tmp)
    v = fast.config.vision
    img_flops = vit_flops(None, v.tokens, v.width, v.layers, v.mlp_dim) + 2 * v.grid ** 2 * 3 * v.patch_size ** 2 * v.width

    for B in ([1, 4] if args.quick else [1, 32]):
        torch.manual_seed(1)
        x = torch.randn(B, 3, v.image_size, v.image_size)
        with torch.inference_mode():
            want = F.normalize(ref.encode_image(x), dim=-1)

        def cos(fn):
            with torch.inference_mode():
                return {"cosine_min": float(F.cosine_similarity(fn().float(), want).min())}

        def oc32():
            with torch.inference_mode():
                return F.normalize(ref.encode_image(x), dim=-1)

        def oc_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return F.normalize(ref.encode_image(x).float(), dim=-1)

        def ort():
            return F.normalize(torch.from_numpy(ort_img.run(None, {"pixels": x.numpy()})[0]), dim=-1)

        providers = [
            Provider("open_clip eager fp32", oc32, "fp32", cos(oc32)),
            Provider("open_clip bf16 autocast", oc_bf16, "bf16", cos(oc_bf16)),
            Provider("onnxruntime fp32", ort, "fp32", cos(ort)),
            Provider("mmfast fp32", lambda: fast32.encode_images(x), "fp32", cos(lambda: fast32.encode_images(x))),
            Provider(f"mmfast auto ({fast.dtype})", lambda: fast.encode_images(x), fast.dtype,
                     cos(lambda: fast.encode_images(x))),
            Provider("mmfast onnxruntime int8", lambda: fast_ort.encode_images(x), "int8",
                     cos(lambda: fast_ort.encode_images(x))),
        ]
        yield Case("clip.encode_images", f"{ARCH} B={B}", providers, baseline="open_clip eager fp32",
                   items=B, flops=B * img_flops)

    t = fast.config.text
    for B in ([1, 8] if args.quick else [1, 32]):
        texts = [PROMPTS[i % len(PROMPTS)].format(LABELS[(i // len(PROMPTS)) % len(LABELS)]) for i in range(B)]
        ids = open_clip.tokenize(texts)
        with torch.inference_mode():
            want = F.normalize(ref.encode_text(ids), dim=-1)
        used = int(ids.argmax(-1).max()) + 1

        def cos_t(fn):
            return {"cosine_min": float(F.cosine_similarity(fn().float(), want).min())}

        def oct32():
            with torch.inference_mode():
                return F.normalize(ref.encode_text(ids), dim=-1)

        def oct_bf16():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return F.normalize(ref.encode_text(ids).float(), dim=-1)

        providers = [
            Provider("open_clip eager fp32", oct32, "fp32", cos_t(oct32)),
            Provider("open_clip bf16 autocast", oct_bf16, "bf16", cos_t(oct_bf16)),
            Provider("mmfast fp32", lambda: fast32.encode_texts(texts), "fp32", cos_t(lambda: fast32.encode_texts(texts))),
            Provider(f"mmfast auto ({fast.dtype})", lambda: fast.encode_texts(texts), fast.dtype,
                     cos_t(lambda: fast.encode_texts(texts))),
            Provider("mmfast onnxruntime int8", lambda: fast_ort.encode_texts(texts), "int8",
                     cos_t(lambda: fast_ort.encode_texts(texts))),
        ]
        yield Case("clip.encode_texts", f"{ARCH} B={B} ({used} of {t.context_length} tokens used)",
                   providers, baseline="open_clip eager fp32", items=B,
                   flops=B * vit_flops(None, t.context_length, t.width, t.layers, t.mlp_dim),
                   extra={"flops_note": "counted at the full 77-token context the peers run"})


def _ort_session(ref, tmp: Path):
    import onnxruntime as ort
    path = tmp / "visual.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # batch >= 2 in the example and a dynamic axis: the dynamo exporter froze batch 1 (see ENVIRONMENT)
        torch.onnx.export(ref.visual, (torch.randn(2, 3, 224, 224),), str(path), input_names=["pixels"],
                          output_names=["emb"], dynamic_axes={"pixels": {0: "b"}, "emb": {0: "b"}},
                          opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
