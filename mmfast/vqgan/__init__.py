"""VQGAN: images <-> discrete tokens (taming, ru-dalle Gumbel, min-dalle detokenizer weights)."""
from .config import VQ_PRESETS, VQConfig, vq_preset
from .model import VQGAN
from .runtime import VQ, load_vq

__all__ = ["VQ", "VQ_PRESETS", "VQConfig", "VQGAN", "load_vq", "vq_preset"]
