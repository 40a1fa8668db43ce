"""`mmfast demo`: the mission end to end on the built-in demo models, offline.

English or Russian text -> generated images (DALL·E-style generator + VQGAN) -> CLIP reranking ->
a labelled PNG grid; then zero-shot classification of held-out images, and text -> image search
over a small gallery with `SimilarityIndex`. Every stage is timed; `run` returns what it printed.

Example
-------
>>> from mmfast.demo.run import run
>>> report = run(["синий квадрат справа"], out="demo.png", n=4, seed=0)   # doctest: +SKIP
>>> report["zero_shot_accuracy"]["ru"]                                    # doctest: +SKIP
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import data, evaluate

# Two English and two Russian prompts: two held-out (colour, shape, position) triples the generator
# never saw together, and two seen ones.
DEFAULT_PROMPTS = (data.describe(0, 0, 0, lang="en"),       # a red circle on the left (held out)
                   data.describe(3, 3, 3, lang="en"),       # a yellow star at the bottom
                   data.describe(2, 1, 1, lang="ru"),       # синий квадрат справа
                   data.describe(1, 2, 2, lang="ru"))       # зелёный треугольник сверху (held out)
CELL = 128           # pixels per generated image in the grid (the 32 x 32 images, upscaled nearest)


def _font(size: int):
    """A font that draws Cyrillic: DejaVu Sans from the system or matplotlib, else Pillow's own."""
    from PIL import ImageFont
    candidates = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"]
    try:
        import matplotlib
        candidates.append(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"))
    except ImportError:
        pass
    for c in candidates:
        try:
            return ImageFont.truetype(c, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def _fit(draw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis so that it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid(images: list, prompts: list[str], n: int):
    """A PIL image: one row per prompt (its text above), its `n` images best first, each with its
    CLIP score under it."""
    from PIL import Image, ImageDraw
    pad, head, foot = 8, 26, 20
    W = pad + n * (CELL + pad)
    H = len(prompts) * (head + CELL + foot) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    big, small = _font(16), _font(12)
    for r, prompt in enumerate(prompts):
        y = pad + r * (head + CELL + foot)
        draw.text((pad, y), _fit(draw, prompt, big, W - 2 * pad), fill=(0, 0, 0), font=big)
        for c in range(n):
            im = images[r * n + c]
            x = pad + c * (CELL + pad)
            canvas.paste(im.resize((CELL, CELL), Image.NEAREST), (x, y + head - 4))
            if "clip_score" in im.info:
                draw.text((x, y + head + CELL - 2), f"CLIP {im.info['clip_score']:.3f}", fill=(90, 90, 90), font=small)
    return canvas


def _check(prompts, n: int, seed: int) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompt: every prompt must be a non-empty string, got {prompts!r}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
        raise ValueError(f"n must be an int in 1..16 (images per prompt), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return prompts


def run(prompts=None, *, out="mmfast-demo.png", n: int = 4, seed: int = 0, backend: str | None = None,
        print_fn=print) -> dict:
    """Run the demo; returns the report (also printed line by line through `print_fn`).

    prompts : English or Russian texts (default `DEFAULT_PROMPTS`).
    out : the PNG grid's path (written through a temp file in its folder, then renamed).
    n : images per prompt, reranked by the demo CLIP, best first.
    backend : the loaders' backend (None: $MMFAST_BACKEND, else "auto").
    """
    import torch

    from .. import load_clip, load_generator, load_vq
    from .._atomic import atomic_path
    from ..index import SimilarityIndex

    prompts = _check(prompts, n, seed)
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"out must end in .png, got {str(out)!r}")
    report, t0 = {"prompts": prompts, "timings_s": {}}, time.perf_counter()

    def stage(name: str, t: float) -> None:
        report["timings_s"][name] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    clip = load_clip("demo", backend=backend)
    vq = load_vq("demo", backend=backend)
    gen = load_generator("demo", backend=backend, vqgan=vq)
    stage("load", t)
    report["backends"] = {"clip": clip.backend, "vq": vq.backend, "generator": gen.backend}
    print_fn(f"loaded the demo models ({report['timings_s']['load']:.2f} s): CLIP {clip.backend}; "
             f"VQGAN {vq.backend}; generator {gen.backend}")

    t = time.perf_counter()
    images = gen.generate(prompts, n=n, seed=seed, rerank_with=clip, **evaluate.SAMPLING)
    stage("generate", t)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = grid(images, prompts, n)
    with atomic_path(out) as tmp:
        picture.save(tmp, format="PNG")
    report["grid"] = str(out)
    print_fn(f"generated {len(images)} images ({n} per prompt, reranked by CLIP) in "
             f"{report['timings_s']['generate']:.2f} s -> {out}")
    labels = data.labels("en")
    best = evaluate.predict(clip, np.stack([np.asarray(images[i * n]) for i in range(len(prompts))]), "en")
    report["generated"] = [{"prompt": p, "best_clip_score": round(images[i * n].info["clip_score"], 4),
                            "clip_sees": labels[int(best[i])]} for i, p in enumerate(prompts)]
    for g in report["generated"]:
        print_fn(f"  {g['prompt']!r}: best image scores {g['best_clip_score']:.3f}; CLIP reads it as "
                 f"{g['clip_sees']!r}")

    t = time.perf_counter()
    report["zero_shot_accuracy"] = {lang: evaluate.zero_shot_accuracy(clip, lang, n=256) for lang in ("en", "ru")}
    stage("zero_shot", t)
    print_fn(f"zero-shot on 256 held-out images, 16 bare labels: English {report['zero_shot_accuracy']['en']:.1%}, "
             f"Russian {report['zero_shot_accuracy']['ru']:.1%} ({report['timings_s']['zero_shot']:.2f} s)")

    t = time.perf_counter()
    scenes, captions = data.gallery(seed=seed, n=256)
    index = SimilarityIndex(clip.encode_images(scenes.images.numpy()))
    scores, ids = index.search(clip.encode_texts(prompts), k=3)
    stage("search", t)
    report["search"] = [{"query": p, "top": [{"caption": captions[int(i)], "score": round(float(s), 4)}
                                             for s, i in zip(scores[q], ids[q])]} for q, p in enumerate(prompts)]
    print_fn(f"text -> image search over a 256-image gallery ({report['timings_s']['search']:.2f} s):")
    for r in report["search"]:
        print_fn(f"  {r['query']!r} -> " + "; ".join(f"{x['caption']} ({x['score']:.3f})" for x in r["top"]))
    report["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    print_fn(f"done in {report['timings_s']['total']:.2f} s; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads")
    return report
