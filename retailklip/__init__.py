"""retailklip: recognize retail products (SKUs) in photos without retraining.

Data flow: image -> segments (EfficientViT-SAM) -> RGBA crops -> embeddings (OpenCLIP / timm
encoder) -> 1-NN in a FAISS index -> recognitions (SKU, or unknown beyond a cosine-distance
threshold).  See docs/architecture.md.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import (
    EmptyCatalogError,
    EncoderMismatchError,
    InvalidImageError,
    RetailKlipError,
    WeightsError,
    WeightsUnavailableError,
)

if TYPE_CHECKING:  # pragma: no cover
    from .encoders import DEFAULT_ENCODER_SPEC, Encoder, EncoderIdentity, EncoderSpec, create_encoder
    from .images import load_image
    from .matching import Neighbour
    from .recognizer import Recognition, Recognizer

# The public names of the modules that import torch, numpy or FAISS are loaded on first use
# (PEP 562), so that ``import retailklip.errors`` (and commands that need no model) stay light.
_LAZY = {
    "DEFAULT_ENCODER_SPEC": "encoders", "Encoder": "encoders", "EncoderIdentity": "encoders",
    "EncoderSpec": "encoders", "create_encoder": "encoders", "load_image": "images", "Neighbour": "matching",
    "Recognition": "recognizer", "Recognizer": "recognizer",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ENCODER_SPEC",
    "EmptyCatalogError",
    "Encoder",
    "EncoderIdentity",
    "EncoderMismatchError",
    "EncoderSpec",
    "InvalidImageError",
    "Neighbour",
    "Recognition",
    "Recognizer",
    "RetailKlipError",
    "WeightsError",
    "WeightsUnavailableError",
    "create_encoder",
    "load_image",
]
