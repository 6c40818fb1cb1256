"""Image preprocessing of EfficientViT-SAM: resize the long side, normalise, pad to a square.

Reproduces the official ``EfficientViTSam.transform`` (``SamResize`` -> ``ToTensor`` ->
``Normalize(SAM mean/255, SAM std/255)`` -> ``SamPad``, ``efficientvit/models/efficientvit/sam.py``)
operation for operation, so that embeddings match the official model to float32 rounding.
SAM's preprocessing (Kirillov et al., "Segment Anything", 2023, appendix A) is the same with
a 1024 long side.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from ..errors import InvalidImageError

#: SAM's pixel mean and std, RGB, in 0-255 units.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def check_rgb_array(rgb: object, label: str = "image") -> np.ndarray:
    """Validate an RGB image array.

    Args:
        rgb: candidate image.
        label: name used in the error message.

    Returns:
        ``rgb`` itself: a numpy ``uint8`` array of shape (H, W, 3), H, W >= 1.

    Raises:
        InvalidImageError: not a numpy array, not uint8, wrong shape or empty.
    """
    if not isinstance(rgb, np.ndarray):
        raise InvalidImageError(f"{label}: expected a numpy uint8 (H, W, 3) RGB array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise InvalidImageError(f"{label}: expected dtype uint8, got {rgb.dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidImageError(f"{label}: expected shape (H, W, 3), got {rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise InvalidImageError(f"{label}: has no pixels ({rgb.shape[1]}x{rgb.shape[0]})")
    return rgb


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size (H', W') in pixels after scaling the longer side to ``long_side`` (rounded half up),
    as ``segment_anything.utils.transforms.ResizeLongestSide.get_preprocess_shape``."""
    return ResizeLongestSide.get_preprocess_shape(height, width, long_side)


def resize_longest_side(rgb: np.ndarray, long_side: int) -> np.ndarray:
    """Resize so that the longer side is ``long_side`` pixels, with PIL bilinear filtering.

    Identical to the official ``SamResize`` (torchvision ``resize`` of a PIL image, which calls
    ``PIL.Image.resize(..., BILINEAR)``); images whose long side already equals ``long_side``
    are returned unchanged, as there.

    Args:
        rgb: uint8 (H, W, 3).
        long_side: target long side in pixels.

    Returns:
        uint8 (H', W', 3) with max(H', W') == long_side.
    """
    h, w = rgb.shape[:2]
    if max(h, w) == long_side:
        return rgb
    new_h, new_w = preprocess_shape(h, w, long_side)
    return np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))


def normalize_and_pad(rgb: np.ndarray, size: int) -> torch.Tensor:
    """Scale to [0, 1], normalise with SAM's mean/std and zero-pad right/bottom to ``size``.

    Args:
        rgb: uint8 (H, W, 3) with H, W <= ``size``.
        size: side of the square output in pixels.

    Returns:
        float32 tensor (1, 3, size, size).

    Raises:
        ValueError: the image is larger than ``size``.
    """
    h, w = rgb.shape[:2]
    if h > size or w > size:
        raise ValueError(f"image of {w}x{h} pixels does not fit the {size}x{size} encoder input; resize it first")
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(torch.float32).div(255)
    mean = torch.tensor([m / 255 for m in PIXEL_MEAN], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor([s / 255 for s in PIXEL_STD], dtype=torch.float32).view(3, 1, 1)
    x = (x - mean) / std
    x = F.pad(x, (0, size - w, 0, size - h), value=0.0)
    return x.unsqueeze(0)


def preprocess(rgb: np.ndarray, size: int) -> torch.Tensor:
    """Full official preprocessing: :func:`resize_longest_side` then :func:`normalize_and_pad`.

    Args:
        rgb: uint8 (H, W, 3) RGB image.
        size: encoder input side in pixels (512 for EfficientViT-SAM-L, 1024 for XL and SAM).

    Returns:
        float32 tensor (1, 3, size, size) on the CPU.

    Raises:
        InvalidImageError: ``rgb`` is not a uint8 (H, W, 3) array.
    """
    check_rgb_array(rgb)
    return normalize_and_pad(resize_longest_side(rgb, size), size)
