"""The demo models' world: coloured shapes on plain backgrounds, captioned in English and Russian.

Everything is generated on the fly from a seed (no files): `sample(n, seed)` draws scenes,
`render` draws them (vectorised: 4x supersampled coverage masks, averaged down, so edges are
anti-aliased), `captions` describes them with synonyms and varied word order in either language.

A scene is five attributes, each an index into its list below: colour, shape, position, size and
background. 16 of the 80 (colour, shape, position) triples are held out: training never draws them
(`split="train"`), evaluation draws only them (`split="heldout"`), so every held-out image shows a
colour and shape seen together before, but never at that place. Zero-shot classes are the 16
(colour, shape) pairs, `cls = colour * len(SHAPES) + shape`, named bare by `labels("en" | "ru")`.

Example
-------
>>> s = sample(4, seed=0, split="heldout")
>>> s.images.shape, s.images.dtype            # (4, 32, 32, 3) uint8, HWC
>>> captions(s, "ru", seed=0)[0]              # e.g. 'красный круг слева'
>>> labels("ru")[:2]                          # ['красный круг', 'красный квадрат']
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32                       # image side in pixels (the CLIP's input, 4 x 4 VQGAN tokens at f8)
_SS = 4                         # supersampling factor of the coverage masks

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "big")
BACKGROUNDS = ("white", "gray", "black")

_RGB = np.array([[220, 30, 30], [30, 170, 50], [30, 70, 225], [235, 205, 25]], np.float32)
_BG = np.array([[240, 240, 240], [128, 128, 128], [20, 20, 20]], np.float32)
_CENTRES = np.array([[9, 16], [23, 16], [16, 9], [16, 23], [16, 16]], np.float32)  # (x, y); y grows down
_RADII = np.array([5.5, 8.0], np.float32)   # circumscribed-ish radius per size
_JITTER = 2                                  # centres move by up to +-2 whole pixels

# (colour, shape, position) triples never drawn for training: each (colour, shape) pair loses one
# position, and every position loses some pairs.
HELDOUT = frozenset((c, s, (c + 2 * s) % len(POSITIONS)) for c in range(len(COLOURS)) for s in range(len(SHAPES)))

# ---- words -----------------------------------------------------------------------------------------
# English: synonyms per attribute.
_EN_COLOUR = [["red"], ["green"], ["blue"], ["yellow"]]
_EN_SHAPE = [["circle", "disk", "round dot"], ["square", "box"], ["triangle"], ["star"]]
_EN_POS = [["on the left", "at the left", "to the left"], ["on the right", "at the right", "to the right"],
           ["at the top", "on top", "in the upper part"], ["at the bottom", "in the lower part", "below"],
           ["in the center", "in the middle", "in the centre"]]
_EN_SIZE = [["small", "little", "tiny"], ["big", "large"]]
_EN_BG = ["white", "gray", "black"]
# Russian: adjectives agree with the noun's gender; "ё" is written both ways, as people do.
_RU_SHAPE = [[("круг", "m"), ("кружок", "m")], [("квадрат", "m")], [("треугольник", "m")],
             [("звезда", "f"), ("звёздочка", "f"), ("звездочка", "f")]]
_RU_COLOUR = {  # colour -> {"m": [...], "f": [...], "gen": [...]} (genitive: "круг красного цвета")
    0: {"m": ["красный"], "f": ["красная"], "gen": ["красного"]},
    1: {"m": ["зелёный", "зеленый"], "f": ["зелёная", "зеленая"], "gen": ["зелёного", "зеленого"]},
    2: {"m": ["синий"], "f": ["синяя"], "gen": ["синего"]},
    3: {"m": ["жёлтый", "желтый"], "f": ["жёлтая", "желтая"], "gen": ["жёлтого", "желтого"]},
}
_RU_POS = [["слева", "с левой стороны"], ["справа", "с правой стороны"], ["сверху", "вверху", "наверху"],
           ["снизу", "внизу"], ["в центре", "посередине", "по центру"]]
_RU_SIZE = {"m": [["маленький", "небольшой"], ["большой"]], "f": [["маленькая", "небольшая"], ["большая"]]}
_RU_BG = ["на белом фоне", "на сером фоне", "на чёрном фоне"]

# Caption templates. Fields: c colour, s shape, p position, z size, b background. A template's
# fields are what the caption says; the contrastive loss treats as positives all images that match.
_EN_TEMPLATES = ["{c} {s}", "a {c} {s}", "a {c} {s} {p}", "{c} {s} {p}", "{p}, a {c} {s}", "a {z} {c} {s}",
                 "a {z} {c} {s} {p}", "a {s} coloured {c}", "a {s} of {c} colour {p}", "a {c} {s} on {b}",
                 "there is a {c} {s} {p}", "{p} there is a {z} {c} {s}"]
_RU_TEMPLATES = ["{c} {s}", "{c} {s} {p}", "{p} {c} {s}", "{s} {g} цвета", "{s} {g} цвета {p}",
                 "{p} {s} {g} цвета", "{z} {c} {s}", "{z} {c} {s} {p}", "{c} {s} {b}", "{p} находится {c} {s}"]


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes: attribute indices (int64 [N] each) and their pictures (uint8 [N, 32, 32, 3])."""
    colour: torch.Tensor
    shape: torch.Tensor
    position: torch.Tensor
    size: torch.Tensor
    background: torch.Tensor
    offset: torch.Tensor        # int64 [N, 2] (dx, dy) pixel jitter of the centre
    images: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def label(self) -> torch.Tensor:
        """Zero-shot class of each image: colour * len(SHAPES) + shape (int64 [N])."""
        return self.colour * len(SHAPES) + self.shape

    def pixels(self) -> torch.Tensor:
        """Images as float32 [N, 3, 32, 32] in [0, 1]."""
        return self.images.permute(0, 3, 1, 2).float().div(255)


def _triples(split: str) -> np.ndarray:
    all_ = [(c, s, p) for c in range(len(COLOURS)) for s in range(len(SHAPES)) for p in range(len(POSITIONS))]
    if split == "train":
        keep = [t for t in all_ if t not in HELDOUT]
    elif split == "heldout":
        keep = [t for t in all_ if t in HELDOUT]
    elif split == "all":
        keep = all_
    else:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    return np.array(keep, np.int64)


def sample(n: int, seed: int, split: str = "train") -> Scenes:
    """`n` random scenes of `split` ("train", "heldout" or "all"), the same for the same seed.

    Example
    -------
    >>> s = sample(256, seed=1)        # s.images: uint8 [256, 32, 32, 3]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng(seed)
    tri = _triples(split)[rng.integers(0, len(_triples(split)), n)]
    size = rng.integers(0, len(SIZES), n)
    bg = rng.integers(0, len(BACKGROUNDS), n)
    offset = rng.integers(-_JITTER, _JITTER + 1, (n, 2))
    return make(tri[:, 0], tri[:, 1], tri[:, 2], size, bg, offset)


def every(split: str = "train") -> Scenes:
    """Every distinct scene of `split`: all (triple, size, background, jitter) combinations, once
    each (9,600 for "train", 2,400 for "heldout"). A uniform draw of these rows has `sample`'s
    distribution, so trainers render them once instead of every step (cached: a fresh copy per call)."""
    e = _every(split)
    return Scenes(*(getattr(e, f).clone() for f in Scenes.__dataclass_fields__))


@functools.lru_cache(maxsize=3)
def _every(split: str) -> Scenes:
    j = np.arange(-_JITTER, _JITTER + 1)
    tri, size, bg, dx, dy = (a.reshape(-1) for a in np.meshgrid(
        np.arange(len(_triples(split))), np.arange(len(SIZES)), np.arange(len(BACKGROUNDS)), j, j, indexing="ij"))
    tri = _triples(split)[tri]
    return make(tri[:, 0], tri[:, 1], tri[:, 2], size, bg, np.stack([dx, dy], 1))


def make(colour, shape, position, size, background, offset=None) -> Scenes:
    """Scenes with the given attribute indices (array-likes of length N); offset [N, 2] defaults to 0."""
    colour, shape, position, size, background = (np.asarray(a, np.int64).reshape(-1)
                                                  for a in (colour, shape, position, size, background))
    n = len(colour)
    offset = np.zeros((n, 2), np.int64) if offset is None else np.asarray(offset, np.int64).reshape(n, 2)
    images = render(colour, shape, position, size, background, offset)
    t = torch.from_numpy
    return Scenes(t(colour), t(shape), t(position), t(size), t(background), t(offset), t(images))


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean coverage of one shape kind: (u, v) [n, S, S] in units of the radius, v pointing up."""
    if shape == 0:                                                     # circle
        return u * u + v * v < 1.0
    if shape == 1:                                                     # square
        return np.maximum(abs(u), abs(v)) < 0.85
    if shape == 2:  # equilateral triangle, apex up: three half-planes at apothem 0.62
        out = v > -0.62
        for a in (math.pi / 6, 5 * math.pi / 6):
            out &= u * math.cos(a) + v * math.sin(a) < 0.62
        return out
    # five-pointed star, a point up, outer radius 1.25, inner 0.5: fold the angle into the half
    # sector between a tip (angle 0) and the next inner corner (pi/5), then test the side of that edge
    rho = np.hypot(u, v)
    phi = np.abs(np.mod(np.arctan2(v, u) - math.pi / 2 + math.pi / 5, 2 * math.pi / 5) - math.pi / 5)
    R, r = 1.25, 0.5
    x, y = rho * np.cos(phi), rho * np.sin(phi)
    px, py = r * math.cos(math.pi / 5), r * math.sin(math.pi / 5)
    return (x - R) * py - y * (px - R) < 0                             # the centre's side of the edge


def render(colour, shape, position, size, background, offset) -> np.ndarray:
    """uint8 [N, 32, 32, 3] pictures of the scenes (int arrays [N]; offset [N, 2])."""
    n = len(colour)
    S = SIZE * _SS
    grid = (np.arange(S, dtype=np.float32) + 0.5) / _SS                  # pixel-space sample centres
    centre = _CENTRES[position] + offset.astype(np.float32)             # (N, 2) x, y
    radius = _RADII[size][:, None, None]
    u = (grid[None, None, :] - centre[:, 0, None, None]) / radius        # (N, 1, S) -> broadcast
    v = (centre[:, 1, None, None] - grid[None, :, None]) / radius        # (N, S, 1), up is positive
    u, v = np.broadcast_to(u, (n, S, S)), np.broadcast_to(v, (n, S, S))
    cover = np.zeros((n, S, S), np.float32)
    for k in range(len(SHAPES)):                                        # each kind on its own rows
        rows = np.flatnonzero(shape == k)
        if len(rows):
            cover[rows] = _inside(k, u[rows], v[rows])
    alpha = cover.reshape(n, SIZE, _SS, SIZE, _SS).mean((2, 4))[..., None]  # (N, 32, 32, 1)
    img = _BG[background][:, None, None] * (1 - alpha) + _RGB[colour][:, None, None] * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---- text --------------------------------------------------------------------------------------------
def labels(lang: str = "en") -> list[str]:
    """Bare zero-shot class names in class order (colour-major): "red circle" / "красный круг"."""
    _check_lang(lang)
    out = []
    for c in range(len(COLOURS)):
        for s in range(len(SHAPES)):
            if lang == "en":
                out.append(f"{_EN_COLOUR[c][0]} {_EN_SHAPE[s][0]}")
            else:
                noun, g = _RU_SHAPE[s][0]
                out.append(f"{_RU_COLOUR[c][g][0]} {noun}")
    return out


def _check_lang(lang: str) -> None:
    if lang not in ("en", "ru"):
        raise ValueError(f"lang must be 'en' or 'ru', got {lang!r}")


def describe(colour: int, shape: int, position: int | None = None, size: int | None = None,
             background: int | None = None, lang: str = "en") -> str:
    """The plain caption of a scene: "a big red circle on the left" / "большой красный круг слева";
    attributes left None are not mentioned."""
    _check_lang(lang)
    if lang == "en":
        words = ["a"] + ([_EN_SIZE[size][0]] if size is not None else []) + [_EN_COLOUR[colour][0], _EN_SHAPE[shape][0]]
        words += [_EN_POS[position][0]] if position is not None else []
        words += [f"on {_EN_BG[background]}"] if background is not None else []
        return " ".join(words)
    noun, g = _RU_SHAPE[shape][0]
    words = ([_RU_SIZE[g][size][0]] if size is not None else []) + [_RU_COLOUR[colour][g][0], noun]
    words += [_RU_POS[position][0]] if position is not None else []
    words += [_RU_BG[background]] if background is not None else []
    return " ".join(words)


def captions(scenes: Scenes, lang: str, seed: int, *, return_mentions: bool = False):
    """A random caption per scene in `lang` ("en", "ru" or "mix": each caption's language drawn).

    With `return_mentions`, also a bool array [N, 3]: whether each caption names the position,
    size and background (colour and shape are always named), for the multi-positive loss.
    """
    if lang not in ("en", "ru", "mix"):
        raise ValueError(f"lang must be 'en', 'ru' or 'mix', got {lang!r}")
    rng = np.random.default_rng(seed)
    out, mentions = [], np.zeros((len(scenes), 3), bool)
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    cols, shps, poss, szs, bgs = (a.tolist() for a in (scenes.colour, scenes.shape, scenes.position,
                                                       scenes.size, scenes.background))
    for i, (c, s, p, z, b) in enumerate(zip(cols, shps, poss, szs, bgs)):
        ru = lang == "ru" or (lang == "mix" and rng.random() < 0.5)
        template = pick(_RU_TEMPLATES if ru else _EN_TEMPLATES)
        if ru:
            noun, g = pick(_RU_SHAPE[s])
            fields = dict(c=pick(_RU_COLOUR[c][g]), s=noun, g=pick(_RU_COLOUR[c]["gen"]), p=pick(_RU_POS[p]),
                          z=pick(_RU_SIZE[g][z]), b=_RU_BG[b])
        else:
            fields = dict(c=pick(_EN_COLOUR[c]), s=pick(_EN_SHAPE[s]), p=pick(_EN_POS[p]), z=pick(_EN_SIZE[z]),
                          b=f"{_EN_BG[b]}")
        text = template.format(**fields)
        if not ru and "{b}" in template:
            text += " background" if rng.random() < 0.5 else ""
        out.append(text)
        mentions[i] = ("{p}" in template, "{z}" in template, "{b}" in template)
    return (out, mentions) if return_mentions else out


@functools.lru_cache(maxsize=2)
def _corpus(lang: str) -> tuple[str, ...]:
    grid = np.array(np.meshgrid(*(np.arange(len(a)) for a in (COLOURS, SHAPES, POSITIONS, SIZES, BACKGROUNDS)),
                                indexing="ij")).reshape(5, -1)           # every attribute combination
    scenes = make(*grid)
    texts = [t for seed in range(8) for t in captions(scenes, lang, seed=seed)]
    return tuple(texts + labels(lang) + [describe(*(int(a) for a in row), lang=lang) for row in grid.T])


def corpus(lang: str) -> list[str]:
    """Captions of every attribute combination in `lang` (8 draws each), the bare labels and the plain
    descriptions: every word form the captions use (tokenizer training)."""
    _check_lang(lang)
    return list(_corpus(lang))


# ---- evaluation sets ---------------------------------------------------------------------------------
def heldout_prompts(lang: str = "en") -> list[tuple[str, int, int]]:
    """One prompt per held-out (colour, shape, position) triple: (text, colour, shape), e.g.
    ("a red star at the bottom", 0, 3). The generator never saw these combinations."""
    return [(describe(c, s, p, lang=lang), c, s) for c, s, p in sorted(HELDOUT)]


def gallery(seed: int = 0, n: int = 64) -> tuple[Scenes, list[str]]:
    """A small image collection for search demos: `n` scenes of every split and their English
    captions (the ground truth a text query should find)."""
    scenes = sample(n, seed=seed, split="all")
    return scenes, [describe(c, s, p, z, b) for c, s, p, z, b in zip(
        *(a.tolist() for a in (scenes.colour, scenes.shape, scenes.position, scenes.size, scenes.background)))]
