"""The built-in demo models: a tiny CLIP, VQGAN and DALL·E-style generator trained here.

They were trained by `tools/train_demo.py` on `mmfast.demo.data` (coloured shapes captioned in
English and Russian) and are stored in the layouts the ordinary loaders read, so
`load_clip("demo")`, `load_vq("demo")` and `load_generator("demo")` are the normal loaders
pointed at `weights_path(...)`. `mmfast.demo.evaluate` measures them; `weights/metrics.json`
holds the numbers measured when they were trained.

Example
-------
>>> from mmfast.demo import weights_path
>>> weights_path("clip")                    # .../mmfast/demo/weights/clip (a Hugging Face CLIP folder)
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
# family -> folder under WEIGHTS, and the file that proves it is complete
_LAYOUT = {
    "clip": ("clip", "model.safetensors"),           # HF CLIPModel folder + byte-level BPE tokenizer
    "vq": ("vq", "model.safetensors"),               # taming names + model.yaml
    "generator": ("generator", "decoder.safetensors"),  # min-dalle folder + config.json (-> ../vq)
}


def weights_path(family: str) -> Path:
    """The shipped folder of the demo model `family` ("clip", "vq" or "generator").

    Raises
    ------
    ValueError : an unknown family.
    FileNotFoundError : the weights are not installed (retrain with `python tools/train_demo.py`).
    """
    if family not in _LAYOUT:
        raise ValueError(f"unknown demo family {family!r}; use one of {', '.join(map(repr, _LAYOUT))}")
    folder, marker = _LAYOUT[family]
    path = WEIGHTS / folder
    if not (path / marker).is_file():
        raise FileNotFoundError(
            f"the demo {family} weights are missing ({path / marker} does not exist): this mmfast was "
            f"installed without its package data; reinstall it, or train them with "
            f"`python tools/train_demo.py --out {WEIGHTS}`")
    return path


__all__ = ["WEIGHTS", "weights_path"]
