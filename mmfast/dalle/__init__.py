"""DALL·E mini / mega (min-dalle's weights): text -> 256 image tokens with a static KV cache."""
from .config import DALLE_PRESETS, DalleConfig, dalle_preset
from .generate import Generator, load_generator
from .tokenizer import DalleTokenizer

__all__ = ["DALLE_PRESETS", "DalleConfig", "DalleTokenizer", "Generator", "dalle_preset", "load_generator"]
