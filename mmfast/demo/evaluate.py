"""What the demo models can do, measured on held-out data (`mmfast.demo.data`).

Each function takes loaded runtime objects (`mmfast.load_clip("demo")`, ...), so the same numbers
can be taken on any backend or dtype. The evaluation sets are fixed by their seeds; the test suite,
`tools/train_demo.py` (into `metrics.json`) and the `mmfast demo` command all call these.

Example
-------
>>> import mmfast
>>> from mmfast.demo import evaluate
>>> clip = mmfast.load_clip("demo", backend="torch")
>>> evaluate.zero_shot_accuracy(clip, lang="ru")          # share of held-out images named right
"""
from __future__ import annotations

import torch

from . import data
from ..vqgan.runtime import psnr

# How the demo generator samples by default: a small top-k and mild guidance keep the tiny model on
# the prompt (min-dalle's top_k=256, guidance=16 suit a 16384-code model, not a 256-code one).
SAMPLING = {"top_k": 8, "temperature": 1.0, "guidance": 3.0}

_SEEDS = {"zero_shot": 1001, "psnr": 1002, "generation": 1003, "search": 1004}


def predict(clip, images, lang: str = "en") -> torch.Tensor:
    """Zero-shot class of each image with the bare labels of `lang` (no template): int64 [N].

    `images`: uint8 [N, 32, 32, 3] (e.g. `Scenes.images` or `VQ.decode` output).
    """
    probs = clip.classify(images.numpy() if isinstance(images, torch.Tensor) else images,
                          data.labels(lang), templates=("{}",))
    return probs.argmax(-1)


def zero_shot_accuracy(clip, lang: str = "en", n: int = 512, seed: int = _SEEDS["zero_shot"]) -> float:
    """Share of `n` held-out images (unseen colour x shape x position) whose colour and shape the
    CLIP names right among the 16 bare labels of `lang` ("en": "red circle", "ru": "красный круг")."""
    scenes = data.sample(n, seed=seed, split="heldout")
    return float((predict(clip, scenes.images, lang) == scenes.label).float().mean())


def reconstruction_psnr(vq, n: int = 256, seed: int = _SEEDS["psnr"]) -> float:
    """PSNR (dB, over all pixels) of encode -> decode on `n` held-out images."""
    scenes = data.sample(n, seed=seed, split="heldout")
    px = scenes.pixels()
    out = vq.decode_pixels(vq.encode_pixels(px, batch_size=64), batch_size=64)
    return psnr(out, px)


def seen_prompts(lang: str = "en") -> list[tuple[str, int, int]]:
    """The validation prompts: one training-split (colour, shape, position) triple per (colour,
    shape) pair, in `heldout_prompts`' format (the generator saw these combinations)."""
    return [(data.describe(c, s, (c + 2 * s + 1) % len(data.POSITIONS), lang=lang), c, s)
            for c in range(len(data.COLOURS)) for s in range(len(data.SHAPES))]


def generate_heldout(gen, n: int = 4, seed: int = _SEEDS["generation"], vq=None, lang: str = "en",
                     split: str = "heldout", **sampling):
    """Images for every held-out prompt (`data.heldout_prompts(lang)`; split="seen": `seen_prompts`),
    n each: (uint8 images [16 * n, 32, 32, 3], target classes int64 [16 * n], prompts). `sampling`
    overrides `SAMPLING`."""
    vq = vq if vq is not None else gen.vq
    prompts = data.heldout_prompts(lang) if split == "heldout" else seen_prompts(lang)
    tokens = gen.generate_tokens([p for p, _, _ in prompts], n=n, seed=seed, **{**SAMPLING, **sampling})
    images = vq.decode(tokens, batch_size=64)
    target = torch.tensor([c * len(data.SHAPES) + s for _, c, s in prompts]).repeat_interleave(n)
    return images, target, [p for p, _, _ in prompts]


def rerank(clip, images, prompts: list[str], n: int) -> torch.Tensor:
    """The DALL·E pipeline's last step: of each prompt's `n` candidates (`images` uint8
    [P * n, S, S, 3], prompt-major), the index of the one the CLIP scores highest against its
    prompt: int64 [P] (into 0..n-1)."""
    P = len(prompts)
    sim = clip.similarity(images.numpy() if isinstance(images, torch.Tensor) else images, list(prompts))
    own = sim.view(P, n, P)[torch.arange(P), :, torch.arange(P)]        # (P, n): candidate vs its own prompt
    return own.argmax(1)


def generation_accuracy(gen, clip, n: int = 8, rounds: int = 6, seed: int = _SEEDS["generation"], vq=None,
                        lang: str = "en", reranked: bool = True, split: str = "heldout", **sampling) -> float:
    """Share of images generated for the held-out prompts in `lang` ("en" or "ru") that the CLIP
    classifies as the prompt's colour and shape (English bare labels), over `rounds` seeds (6 x 16
    prompts: one prompt moves the figure by ~1 point, two standard errors are ~8 points).

    reranked=True (the DALL·E pipeline, what `mmfast demo` shows): `n` candidates per prompt, the
    one the CLIP ranks first against the prompt is the prompt's image. reranked=False: every
    candidate counts (the generator's raw hit rate). split="seen": the validation prompts instead
    (`seen_prompts`: combinations the generator was trained on)."""
    hits = []
    for r in range(rounds):
        images, target, prompts = generate_heldout(gen, n=n, seed=seed + 7919 * r, vq=vq, lang=lang, split=split,
                                                    **sampling)
        if reranked:
            best = rerank(clip, images, prompts, n)
            images = images.view(len(prompts), n, *images.shape[1:])[torch.arange(len(prompts)), best]
            target = target.view(len(prompts), n)[:, 0]
        hits.append(predict(clip, images, "en") == target)
    return float(torch.cat(hits).float().mean())


def search_precision(clip, lang: str = "en", k: int = 5, seed: int = _SEEDS["search"]) -> float:
    """Text -> image search over `data.gallery` (256 scenes) with a `SimilarityIndex`: the share of
    the top `k` results that show the query's colour and shape, over the 16 bare labels of `lang`."""
    from ..index import SimilarityIndex
    scenes, _ = data.gallery(seed=seed, n=256)
    index = SimilarityIndex(clip.encode_images(scenes.images.numpy()))
    _, ids = index.search(clip.encode_texts(data.labels(lang)), k=k)      # (16, k)
    return float((scenes.label[ids] == torch.arange(len(data.labels(lang)))[:, None]).float().mean())


def evaluate_all(clip, vq, gen) -> dict[str, float]:
    """Every metric above, as `metrics.json` records them."""
    return {
        "zero_shot_accuracy_en": zero_shot_accuracy(clip, "en"),
        "zero_shot_accuracy_ru": zero_shot_accuracy(clip, "ru"),
        "search_precision_at_5_en": search_precision(clip, "en"),
        "search_precision_at_5_ru": search_precision(clip, "ru"),
        "vq_psnr_db": reconstruction_psnr(vq),
        "generation_accuracy": generation_accuracy(gen, clip, vq=vq),
        "generation_accuracy_ru": generation_accuracy(gen, clip, vq=vq, lang="ru"),
        "generation_raw_hit_rate": generation_accuracy(gen, clip, vq=vq, reranked=False),
        "generation_raw_hit_rate_ru": generation_accuracy(gen, clip, vq=vq, lang="ru", reranked=False),
        "generation_accuracy_seen": generation_accuracy(gen, clip, vq=vq, split="seen"),
        "generation_accuracy_seen_ru": generation_accuracy(gen, clip, vq=vq, lang="ru", split="seen"),
    }
