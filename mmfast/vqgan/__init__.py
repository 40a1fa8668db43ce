"""VQGAN: images <-> discrete tokens (taming, ru-dalle Gumbel, min-dalle detokenizer weights)."""
from .config import VQ_PRESETS, VQConfig, vq_preset
from .model import VQGAN

__all__ = ["VQ_PRESETS", "VQConfig", "VQGAN", "vq_preset"]
