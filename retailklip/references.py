"""Reference image -> K views -> K embeddings: the one function every gallery is built with.

A catalog stores, for each reference image of an SKU, K unit vectors: the encoder's embedding
of the image itself (view 0) and of K-1 augmented views (:func:`retailklip.augment.augment_reference`,
RetailKLIP §4.2: one reference image per class plus augmented copies).  ``catalog add``,
``catalog import``, ``catalog rebuild`` (in this process or in Ray actors), the zero-shot
evaluation and the finetune's held-out evaluation all call :func:`embed_reference`, so the
promise that a rebuild gives bitwise the vectors ``add`` stored rests on one function, not on
copies staying alike: the K views of one reference are forwarded together through
:meth:`Encoder.embed <retailklip.encoders.Encoder.embed>`, so a vector does not depend on which
other references were embedded next to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .augment import DEFAULT_AUGMENTATIONS, augment_reference
from .images import ImageSource, load_image

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .encoders import Encoder


def embed_reference(encoder: Encoder, image: ImageSource, k: int = DEFAULT_AUGMENTATIONS, seed: int = 0) -> np.ndarray:
    """Embed one reference image as K views.

    Args:
        encoder: the image encoder.
        image: the reference image: a path, encoded bytes, a PIL image or a uint8 array (anything
            :func:`retailklip.images.load_image` reads; decoded images are used as they are).
        k: views per reference, >= 1 (view 0 is the image itself).
        seed: augmentation seed (a catalog's ``seed`` setting; default 0).

    Returns:
        float32 array (K, D), rows of unit L2 norm; row v is view v.

    Raises:
        InvalidImageError: the image cannot be decoded.
        ValueError: ``k < 1``.
    """
    return encoder.embed(augment_reference(load_image(image), k, seed))
