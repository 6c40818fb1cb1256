"""retailklip: recognize retail products (SKUs) in photos without retraining.

Data flow: image -> segments (EfficientViT-SAM) -> RGBA crops -> embeddings (OpenCLIP / timm
encoder) -> 1-NN in a FAISS index -> recognitions (SKU, or unknown beyond a cosine-distance
threshold).  See docs/architecture.md.
"""

from .encoders import DEFAULT_ENCODER_SPEC, Encoder, EncoderIdentity, EncoderSpec, create_encoder
from .errors import (
    CatalogError,
    DuplicateSKUError,
    EmptyCatalogError,
    EncoderMismatchError,
    InvalidImageError,
    InvalidSKUError,
    RetailKlipError,
    UnknownSKUError,
    WeightsError,
    WeightsUnavailableError,
)
from .images import load_image
from .matching import Neighbour
from .recognizer import Recognition, Recognizer

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ENCODER_SPEC",
    "CatalogError",
    "DuplicateSKUError",
    "EmptyCatalogError",
    "Encoder",
    "EncoderIdentity",
    "EncoderMismatchError",
    "EncoderSpec",
    "InvalidImageError",
    "InvalidSKUError",
    "Neighbour",
    "Recognition",
    "Recognizer",
    "RetailKlipError",
    "UnknownSKUError",
    "WeightsError",
    "WeightsUnavailableError",
    "create_encoder",
    "load_image",
]
