"""Segment everything: ``segment_anything.SamAutomaticMaskGenerator`` driven by any SAM-like model.

Source: Kirillov et al., "Segment Anything" (2023), section 7.1 / appendix B ("automatic mask
generation"): prompt the model with a regular point grid in batches, keep masks whose
predicted IoU and stability score pass thresholds, remove duplicates with box NMS, optionally
repeat on overlapping zoomed-in image crops. The implementation is segment_anything's; for
EfficientViT-SAM only the predictor is swapped (:class:`EfficientViTSamAutomaticMaskGenerator`),
as in the official ``EfficientViTSamAutomaticMaskGenerator``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from segment_anything import SamAutomaticMaskGenerator
from torch import nn

from .errors import SegmenterOptionError
from .modeling.efficientvit_sam import EfficientViTSam
from .predictor import EfficientViTSamPredictor


@dataclass(frozen=True)
class MaskGeneratorOptions:
    """Parameters of automatic mask generation (``SamAutomaticMaskGenerator``'s, same defaults).

    Attributes:
        points_per_side: the point grid is ``points_per_side`` x ``points_per_side`` over the image
            (default 32 = 1024 prompts). Cost of the decoder stage grows with its square.
        points_per_batch: prompts decoded together (memory vs. speed; results do not change).
        pred_iou_thresh: keep masks whose predicted IoU is > this, in [0, 1] (0.88).
        stability_score_thresh: keep masks whose stability score (IoU of the mask thresholded
            at +/- ``stability_score_offset`` logits) is >= this, in [0, 1] (0.95).
        stability_score_offset: logit offset of the stability score (1.0).
        box_nms_thresh: box IoU above which the lower-scored duplicate mask is dropped (0.7).
        crop_n_layers: extra layers of zoomed-in crops (0 = whole image only; layer i has
            (2**i)**2 crops).
        crop_nms_thresh: box IoU for NMS between masks of different crops (0.7).
        crop_overlap_ratio: overlap of neighbouring crops as a fraction of the image side (512/1500).
        crop_n_points_downscale_factor: grid side in crop layer i is divided by this**i (1).
        min_mask_region_area: if > 0, fill holes and remove islands smaller than this many
            pixels (needs ``opencv-python``); 0 disables (default).

    Raises:
        SegmenterOptionError: a value out of range.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise SegmenterOptionError(
                f"points_per_side and points_per_batch must be >= 1, got {self.points_per_side}, {self.points_per_batch}"
            )
        for field in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh", "crop_overlap_ratio"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise SegmenterOptionError(f"{field} must be in [0, 1], got {value}")
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1 or self.min_mask_region_area < 0:
            raise SegmenterOptionError(
                "crop_n_layers and min_mask_region_area must be >= 0 and crop_n_points_downscale_factor >= 1"
            )

    def as_kwargs(self) -> dict[str, Any]:
        """The options as ``SamAutomaticMaskGenerator`` keyword arguments."""
        return dataclasses.asdict(self)


class EfficientViTSamAutomaticMaskGenerator(SamAutomaticMaskGenerator):
    """``SamAutomaticMaskGenerator`` whose predictor is :class:`EfficientViTSamPredictor`.

    Args:
        model: an :class:`EfficientViTSam`.
        **kwargs: ``SamAutomaticMaskGenerator`` options (see :class:`MaskGeneratorOptions`).

    ``generate(image)`` takes a uint8 (H, W, 3) RGB array and returns SAM's records
    (``segmentation`` bool (H, W), ``bbox`` XYWH, ``area``, ``predicted_iou``,
    ``stability_score``, ``point_coords``, ``crop_box``).
    """

    def __init__(self, model: EfficientViTSam, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.predictor = EfficientViTSamPredictor(model)


def build_mask_generator(model: nn.Module, options: MaskGeneratorOptions | None = None) -> SamAutomaticMaskGenerator:
    """Automatic mask generator for an EfficientViT-SAM or an original SAM model.

    Args:
        model: :class:`EfficientViTSam` or ``segment_anything.modeling.Sam``.
        options: generation parameters (defaults: :class:`MaskGeneratorOptions`).

    Returns:
        A generator producing binary masks (``output_mode="binary_mask"``).

    Raises:
        ImportError: ``min_mask_region_area > 0`` without ``opencv-python`` installed.
    """
    options = options or MaskGeneratorOptions()
    if options.min_mask_region_area > 0:
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise ImportError(
                "min_mask_region_area > 0 needs opencv-python (pip install opencv-python-headless); "
                "or set min_mask_region_area=0"
            ) from None
    cls = EfficientViTSamAutomaticMaskGenerator if isinstance(model, EfficientViTSam) else SamAutomaticMaskGenerator
    return cls(model, output_mode="binary_mask", **options.as_kwargs())

