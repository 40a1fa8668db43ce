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

_SEEDS = {"zero_shot": 1001, "psnr": 1002, "generation": 1003}


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


def generate_heldout(gen, n: int = 4, seed: int = _SEEDS["generation"], vq=None, **sampling):
    """Images for every held-out prompt (`data.heldout_prompts("en")`, n each): (uint8 images
    [16 * n, 32, 32, 3], target classes int64 [16 * n], prompts). `sampling` overrides `SAMPLING`."""
    vq = vq if vq is not None else gen.vq
    prompts = data.heldout_prompts("en")
    tokens = gen.generate_tokens([p for p, _, _ in prompts], n=n, seed=seed, **{**SAMPLING, **sampling})
    images = vq.decode(tokens, batch_size=64)
    target = torch.tensor([c * len(data.SHAPES) + s for _, c, s in prompts]).repeat_interleave(n)
    return images, target, [p for p, _, _ in prompts]


def generation_accuracy(gen, clip, n: int = 4, seed: int = _SEEDS["generation"], vq=None, **sampling) -> float:
    """Share of images generated for the held-out prompts that the CLIP classifies as the prompt's
    colour and shape (English bare labels)."""
    images, target, _ = generate_heldout(gen, n=n, seed=seed, vq=vq, **sampling)
    return float((predict(clip, images, "en") == target).float().mean())


def evaluate_all(clip, vq, gen) -> dict[str, float]:
    """Every metric above, as `metrics.json` records them."""
    return {
        "zero_shot_accuracy_en": zero_shot_accuracy(clip, "en"),
        "zero_shot_accuracy_ru": zero_shot_accuracy(clip, "ru"),
        "vq_psnr_db": reconstruction_psnr(vq),
        "generation_accuracy": generation_accuracy(gen, clip, vq=vq),
    }
