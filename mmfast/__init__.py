"""mmfast — a performance-first inference engine for multimodal models."""
__version__ = "0.1.0"

from .clip import Clip, ClipConfig, clip_preset, load_clip  # noqa: E402
from .dalle import DalleConfig, Generator, dalle_preset, load_generator  # noqa: E402
from .index import SimilarityIndex  # noqa: E402
from .vqgan import VQ, VQConfig, load_vq, vq_preset  # noqa: E402

__all__ = ["Clip", "ClipConfig", "DalleConfig", "Generator", "SimilarityIndex", "VQ", "VQConfig", "clip_preset",
           "dalle_preset", "load_clip", "load_generator", "load_vq", "vq_preset", "__version__"]
