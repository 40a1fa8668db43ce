"""CLIP: image and text towers, zero-shot classification, retrieval embeddings."""
from .config import CLIP_PRESETS, ClipConfig, clip_preset
from .runtime import Clip, load_clip
from .tokenizer import ClipTokenizer

__all__ = ["CLIP_PRESETS", "Clip", "ClipConfig", "ClipTokenizer", "clip_preset", "load_clip"]
