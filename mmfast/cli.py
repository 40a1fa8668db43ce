"""`mmfast ...` / `python -m mmfast ...`: demo, info, classify, embed, vq encode / decode, generate, export."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def _load(args):
    from .clip import load_clip
    return load_clip(args.checkpoint, name=args.name, device=args.device, dtype=args.dtype, backend=args.backend)


def _info(args) -> None:
    import torch

    from . import __version__, kernels
    from .quantize import cpu_flags
    out = {"mmfast": __version__, "torch": torch.__version__,
           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "cpu_threads": torch.get_num_threads(),
           "cpu_features": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx_vnni"))),
           "cpu_kernels": kernels.backend_for(torch.zeros(1))}
    if args.checkpoint:
        clip = _load(args)
        cfg = clip.config
        out["model"] = {"repr": repr(clip), "dtype": clip.dtype, "embed_dim": cfg.embed_dim,
                        "image_size": cfg.vision.image_size, "context_length": cfg.text.context_length,
                        "act": cfg.act, "text_pool": cfg.text.pool,
                        "parameters": sum(p.numel() for p in clip.model.parameters()) if hasattr(clip.model, "parameters")
                        else None, "backend": clip.backend, "parts": clip.info}
    print(json.dumps(out, indent=2, ensure_ascii=False))


def _positive_int(text: str) -> int:
    """argparse type of counts such as --top: an int >= 1, else a usage error naming the value."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {v}")
    return v


def _classify(args) -> None:
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        sys.exit("mmfast classify: --labels is empty; pass comma-separated class names, e.g. --labels cat,dog")
    clip = _load(args)
    probs = clip.classify([str(p) for p in args.images], labels, templates=args.template or ["a photo of a {}."])
    k = min(args.top, len(labels))
    rows = []
    for path, p in zip(args.images, probs):
        top = p.topk(k)
        rows.append({"image": str(path), "top": [{"label": labels[i], "prob": round(float(v), 6)}
                                                  for v, i in zip(top.values, top.indices)]})
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for r in rows:
            print(r["image"] + ": " + ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"]))


def _embed(args) -> None:
    if bool(args.images) == bool(args.texts or args.texts_file):
        sys.exit("mmfast embed: pass either --images or --texts/--texts-file (exactly one kind)")
    out = Path(args.output)
    if out.suffix not in (".npy", ".safetensors"):
        sys.exit(f"mmfast embed: --output {out} must end in .npy or .safetensors")
    texts = list(args.texts or [])
    if args.texts_file:
        texts += [line for line in Path(args.texts_file).read_text(encoding="utf-8").splitlines() if line]
    clip = _load(args)
    emb = clip.encode_images([str(p) for p in args.images]) if args.images else clip.encode_texts(texts)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, emb.numpy())
    else:
        from safetensors.torch import save_file
        meta = {"model": str(args.checkpoint), "kind": "image" if args.images else "text",
                "normalized": "true", "dtype_mode": clip.dtype}
        save_file({"embeddings": emb.contiguous()}, str(out), metadata=meta)
    print(f"wrote {tuple(emb.shape)} float32 embeddings to {out}")


def _vq_encode(args) -> None:
    from .vqgan import load_vq
    out = Path(args.output)
    if out.suffix != ".npy":
        sys.exit(f"mmfast vq encode: --output {out} must end in .npy")
    vq = load_vq(args.model, name=args.name, config=args.config, device=args.device, dtype=args.dtype,
                 backend=args.backend)
    tokens = vq.encode([str(p) for p in args.images], size=args.size)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, tokens.numpy())
    print(f"wrote {tuple(tokens.shape)} int64 tokens of {len(args.images)} image(s) to {out}")


def _vq_decode(args) -> None:
    from .vqgan import load_vq
    tokens = np.load(args.tokens, allow_pickle=False)
    vq = load_vq(args.model, name=args.name, config=args.config, device=args.device, dtype=args.dtype,
                 backend=args.backend)
    images = vq.decode(tokens).numpy()                                  # (B, H, W, 3) uint8
    b, h, w, _ = images.shape
    cols = min(b, args.columns) if args.columns else math.ceil(math.sqrt(b))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    _grid(list(images), cols).save(out)                                 # one PNG: a grid of B images
    print(f"wrote {b} image(s) of {w}x{h} as a {cols}x{math.ceil(b / cols)} grid to {out}")


def _generate(args) -> None:
    from .dalle import load_generator
    gen = load_generator(args.model, variant=args.variant, device=args.device, dtype=args.dtype,
                         vqgan=args.vqgan or "auto", backend=args.backend)
    clip = None
    if args.rerank_with:
        from .clip import load_clip
        clip = load_clip(args.rerank_with, device=args.device, backend=args.backend)
    images = gen.generate(args.prompts, n=args.n, seed=args.seed, top_k=args.top_k, top_p=args.top_p,
                          temperature=args.temperature, guidance=args.guidance, rerank_with=clip,
                          progress=args.progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _grid([np.asarray(im) for im in images], args.n).save(out)        # a row per prompt
    for im in images:
        score = f"  clip {im.info['clip_score']:.4f}" if "clip_score" in im.info else ""
        print(f"{im.info['prompt']!r} seed {im.info['seed']}{score}")
    print(f"wrote {len(images)} image(s), {args.n} per prompt, to {out}")


def _demo(args) -> None:
    from .demo.run import run
    report = run(args.prompt, out=args.out, n=args.n, seed=args.seed, backend=args.backend,
                 print_fn=(lambda *a: None) if args.json else print)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))


def _export_onnx(args) -> None:
    from .export.onnx import export
    parts = [q for p in args.parts or [] for q in p.split(",") if q] or None
    paths = export(args.path, args.out, family=args.family, parts=parts, fp16=args.fp16)
    for part, path in paths.items():
        print(f"{part:<12} {path}  (checked against PyTorch)")


def _export_triton_repo(args) -> None:
    from .export.triton_server import export_triton_repo
    models = export_triton_repo(args.path, args.out, family=args.family, backends=args.backend or ["onnxruntime"],
                                fp16=args.fp16, max_batch_size=args.max_batch_size,
                                queue_delay_us=args.queue_delay_us, instances=args.instances, device=args.device,
                                overwrite=args.overwrite)
    for name, d in models.items():
        print(f"{name:<20} {d}")
    if (Path(args.out) / "build_trt_plans.sh").exists():
        print(f"TensorRT plans: run {Path(args.out) / 'build_trt_plans.sh'} on the serving GPU first")
    print(f"serve: tritonserver --model-repository {args.out}")


def _grid(images: list, cols: int):
    from PIL import Image

    h, w, _ = images[0].shape
    rows = math.ceil(len(images) / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return Image.fromarray(grid)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="mmfast", description="Fast multimodal inference (CLIP, VQGAN, DALL·E).")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def backend_arg(p, choices=("torch", "onnxruntime", "tensorrt", "auto")):
        p.add_argument("--backend", choices=choices, help="engine per model part (default: $MMFAST_BACKEND, else "
                       "auto: the fastest measured here that keeps fp32's fidelity bar; cached)")

    def model_args(p, required=True):
        p.add_argument("checkpoint", nargs=None if required else "?",
                       help="open_clip dir, Hugging Face dir, OpenAI .pt, or state dict file")
        p.add_argument("--name", help="preset for bare state dicts, e.g. ViT-B-32")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"])
        backend_arg(p)

    p = sub.add_parser("info", help="machine, kernels and (optionally) model summary")
    model_args(p, required=False)
    p.set_defaults(fn=_info)
    p = sub.add_parser("classify", help="zero-shot classify images against labels")
    model_args(p)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--labels", required=True, help="comma-separated class names")
    p.add_argument("--template", action="append", help="prompt template with {} (repeatable)")
    p.add_argument("--top", type=_positive_int, default=5, help="labels shown per image (>= 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_classify)
    p = sub.add_parser("embed", help="write L2-normalised embeddings of images or texts")
    model_args(p)
    p.add_argument("--images", nargs="+", type=Path)
    p.add_argument("--texts", nargs="+")
    p.add_argument("--texts-file", help="UTF-8 file, one text per line")
    p.add_argument("-o", "--output", required=True, help="out.npy or out.safetensors")
    p.set_defaults(fn=_embed)

    p = sub.add_parser("vq", help="VQGAN: images <-> discrete tokens")
    vq_sub = p.add_subparsers(dest="vq_cmd", required=True)

    def vq_model_args(p):
        p.add_argument("--model", required=True, help="taming .ckpt (or its folder), ru-dalle Gumbel "
                       ".ckpt, min-dalle detoker.pt, or a state dict with --name")
        p.add_argument("--name", help="preset for bare state dicts, e.g. vqgan-f16-16384")
        p.add_argument("--config", help="the run's model.yaml when it is not beside the checkpoint")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        backend_arg(p)

    p = vq_sub.add_parser("encode", help="images -> tokens.npy (int64 [B, h, w])")
    vq_model_args(p)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--size", type=int, help="side after resize + centre crop (default: the model's)")
    p.add_argument("-o", "--output", required=True, help="tokens.npy")
    p.set_defaults(fn=_vq_encode)
    p = vq_sub.add_parser("decode", help="tokens.npy -> one PNG (a grid when B > 1)")
    vq_model_args(p)
    p.add_argument("tokens", type=Path, help=".npy of int tokens [B, h, w] or flat [B, h*w]")
    p.add_argument("--columns", type=int, default=0, help="grid columns (default: about sqrt(B))")
    p.add_argument("-o", "--output", required=True, help="out.png")
    p.set_defaults(fn=_vq_decode)

    p = sub.add_parser("generate", help="DALL·E mini / mega: prompts -> a PNG grid (a row per prompt)")
    p.add_argument("prompts", nargs="+")
    p.add_argument("--model", required=True, help="min-dalle's models_root or a dalle_bart_mini/mega folder")
    p.add_argument("--variant", choices=["mini", "mega"], help="when the models_root holds both")
    p.add_argument("--vqgan", help="VQGAN file (default: vqgan/detoker.pt beside the model)")
    p.add_argument("-n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, help="image k of the run gets seed + k (default: random)")
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=16.0, help="supercondition factor (1 = none)")
    p.add_argument("--rerank-with", help="a CLIP checkpoint: each prompt's images best first")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    backend_arg(p, choices=["torch", "onnxruntime", "auto"])
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", required=True, help="grid.png")
    p.set_defaults(fn=_generate)

    p = sub.add_parser("demo", help="the built-in demo models end to end, offline: English / Russian text -> images "
                       "-> CLIP rerank -> PNG grid; zero-shot classification; gallery search")
    p.add_argument("--prompt", action="append", help="a prompt in English or Russian, repeatable (default: four "
                   "built-in ones), e.g. --prompt 'синий квадрат справа'")
    p.add_argument("-n", type=int, default=4, help="images per prompt, reranked by the demo CLIP (1..16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="mmfast-demo.png", help="the PNG grid (default: mmfast-demo.png)")
    backend_arg(p, choices=["torch", "onnxruntime", "auto"])
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of lines")
    p.set_defaults(fn=_demo)

    # one subcommand per export target: `mmfast export <target> PATH --out DIR ...`
    p = sub.add_parser("export", help="export model parts (ONNX, NVIDIA Triton Inference Server repository)")
    export_sub = p.add_subparsers(dest="export_cmd", required=True)
    p = export_sub.add_parser("onnx", help="ONNX graphs of a model's parts, opset 17, symbolic batch, each checked "
                              "against PyTorch on ONNX Runtime")
    p.add_argument("path", help="a CLIP checkpoint (open_clip / HF folder, .pt), a VQGAN, or min-dalle's folder")
    p.add_argument("--out", required=True, help="folder for the .onnx files")
    p.add_argument("--family", choices=["clip", "vq", "dalle"], help="default: found from the path's files")
    p.add_argument("--parts", nargs="+", help="clip: image text; vq: encoder decoder; dalle: encoder step "
                   "step_logits (default: clip both, vq both, dalle encoder step)")
    p.add_argument("--fp16", action="store_true", help="write fp16 graphs (*_fp16.onnx) instead of fp32")
    p.set_defaults(fn=_export_onnx)
    p = export_sub.add_parser("triton-repo", help="an NVIDIA Triton Inference Server model repository: ONNX "
                              "Runtime / TensorRT towers, Python-backend tokenizer / preprocessor, ensembles")
    p.add_argument("path", help="a CLIP checkpoint (open_clip / HF folder, .pt), a VQGAN, or min-dalle's folder")
    p.add_argument("--out", required=True, help="the repository folder (must be empty unless --overwrite)")
    p.add_argument("--family", choices=["clip", "vq", "dalle"], help="default: found from the path's files")
    p.add_argument("--backend", action="append", choices=["onnxruntime", "tensorrt"],
                   help="tower backend, repeatable; the first feeds the ensembles (default: onnxruntime)")
    p.add_argument("--fp16", action="store_true", help="fp16 towers (GPU; TensorRT builds them strongly typed)")
    p.add_argument("--max-batch-size", type=int, default=32, help="largest batch Triton's dynamic batcher forms")
    p.add_argument("--queue-delay-us", type=int, default=500, help="how long a request may wait for others")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument("--device", default="gpu", choices=["gpu", "cpu"], help="instance kind of the towers")
    p.add_argument("--overwrite", action="store_true", help="replace the models mmfast writes in --out")
    p.set_defaults(fn=_export_triton_repo)

    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:  # user errors: one line, exit 2
        sys.exit(f"mmfast {args.cmd}: error: {e}")
