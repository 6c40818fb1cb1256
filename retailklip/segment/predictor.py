"""Promptable mask prediction with EfficientViT-SAM through ``segment_anything.SamPredictor``.

``SamPredictor`` resizes an image to SAM's 1024 long side and lets ``Sam.preprocess`` pad it;
EfficientViT-SAM's L variants instead resize the original image straight to 512 (official
``EfficientViTSamPredictor.set_image``). This subclass swaps in that image path and keeps
everything else of ``SamPredictor``: prompt coordinates still go to the 1024 frame through
``self.transform`` (``ResizeLongestSide(1024)``), and ``predict`` / ``predict_torch`` /
``get_image_embedding`` are inherited unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor

from .modeling.efficientvit_sam import EfficientViTSam
from .transforms import check_rgb_array, preprocess_shape


class EfficientViTSamPredictor(SamPredictor):
    """``SamPredictor`` for :class:`~retailklip.segment.modeling.EfficientViTSam`.

    Args:
        sam_model: the EfficientViT-SAM model.

    Raises:
        TypeError: ``sam_model`` is not an :class:`EfficientViTSam`.
    """

    def __init__(self, sam_model: EfficientViTSam) -> None:
        if not isinstance(sam_model, EfficientViTSam):
            raise TypeError(f"EfficientViTSamPredictor needs an EfficientViTSam model, got {type(sam_model).__name__}")
        super().__init__(sam_model)

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute and cache the image embedding of ``image`` for later prompts.

        Args:
            image: uint8 (H, W, 3) image in ``image_format`` channel order.
            image_format: ``"RGB"`` or ``"BGR"``.

        Raises:
            InvalidImageError: ``image`` is not a uint8 (H, W, 3) array.
            ValueError: unknown ``image_format``.
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        check_rgb_array(image)
        if image_format != self.model.image_format:
            image = np.ascontiguousarray(image[..., ::-1])
        self.reset_image()
        self.original_size = image.shape[:2]
        self.input_size = preprocess_shape(*self.original_size, self.transform.target_length)
        self.features = self.model.image_encoder(self.model.preprocess(image))
        self.is_image_set = True

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Cache the embedding of an image already preprocessed by ``EfficientViTSam.preprocess``.

        Args:
            transformed_image: float32 (1, 3, S, S), S = the model's ``input_size``.
            original_image_size: (H, W) of the image before preprocessing, pixels.

        Raises:
            ValueError: wrong tensor shape.
        """
        size = self.model.image_encoder.input_size
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3 or tuple(transformed_image.shape[2:]) != (size, size):
            raise ValueError(f"expected a preprocessed (B, 3, {size}, {size}) tensor, got {tuple(transformed_image.shape)}")
        self.reset_image()
        self.original_size = tuple(original_image_size)
        self.input_size = preprocess_shape(*self.original_size, self.transform.target_length)
        self.features = self.model.image_encoder(transformed_image.to(self.device))
        self.is_image_set = True
