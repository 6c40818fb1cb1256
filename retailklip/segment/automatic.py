"""Segment everything: automatic mask generation driven by any SAM-like model.

Source: Kirillov et al., "Segment Anything" (2023), section 7.1 / appendix B ("automatic mask
generation"): prompt the model with a regular point grid in batches, keep masks whose
predicted IoU and stability score pass thresholds, remove duplicates with box NMS, optionally
repeat on overlapping zoomed-in image crops. The implementation is segment_anything's; for
EfficientViT-SAM only the predictor is swapped (:class:`EfficientViTSamAutomaticMaskGenerator`),
as in the official ``EfficientViTSamAutomaticMaskGenerator``.

Three modes (:attr:`MaskGeneratorOptions.mode`): ``"fast"`` (default) and ``"exact"`` run
:class:`~retailklip.segment.bounded.BoundedMaskGenerator` (bounded memory; exact = SAM's masks
for the same prompts), with a prompt strategy of :mod:`~retailklip.segment.prompts`; ``"sam"``
runs ``segment_anything.SamAutomaticMaskGenerator`` itself (the reference; also the only mode
with zoomed-in crop layers and small-region cleanup).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from segment_anything import SamAutomaticMaskGenerator
from torch import nn

from .bounded import MODES as BOUNDED_MODES
from .bounded import BoundedMaskGenerator, BoundedOptions, SamPromptDecoder
from .errors import SegmenterOptionError
from .factored_decoder import FactoredMaskDecoder
from .fast_decoder import ImageSharedMaskDecoder
from .modeling.efficientvit_sam import EfficientViTSam
from .onnx_runtime import OnnxMaskDecoder, onnxruntime_available
from .predictor import EfficientViTSamPredictor
from .prompts import CoarseToFinePrompts, FarthestPointPrompts, GridPrompts, RetryPrompts

#: Generator modes: the bounded ones and segment_anything's own.
MODES = (*BOUNDED_MODES, "sam")
#: Prompt strategies by name.
PROMPT_STRATEGIES = ("retry", "farthest", "coarse-to-fine", "grid")
#: Runtimes of fast mode's mask decoder.
RUNTIMES = ("auto", "factored", "onnxruntime", "torch")


@dataclass(frozen=True)
class MaskGeneratorOptions:
    """Parameters of automatic mask generation (``SamAutomaticMaskGenerator``'s, same defaults).

    Attributes:
        points_per_side: the point grid is ``points_per_side`` x ``points_per_side`` over the image
            (default 32 = 1024 prompts). Cost of the decoder stage grows with its square.
        points_per_batch: prompts decoded together (memory vs. speed; results do not change); 16,
            not SAM's 64: the decoder's activations are ~35 MB per prompt, and 16 is as fast on a CPU.
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
        mode: ``"fast"`` (default), ``"exact"`` or ``"sam"`` (module docstring); crop layers and
            ``min_mask_region_area`` need ``"sam"``.
        prompts: ``"retry"`` (default: :class:`~retailklip.segment.prompts.RetryPrompts`, the
            ``"farthest"`` strategy plus up to 4 generations of re-prompts inside a compact
            rejected mask, i.e. where the decoder saw something small but no answer passed the
            filters, such places ranking as unexplored; chosen by the simulation of
            docs/segmentation.md, "Third round"), ``"farthest"``
            (:class:`~retailklip.segment.prompts.FarthestPointPrompts`, an 8 x 8 grid, then
            rounds of 16 farthest points weighted by coverage (0.25)), ``"coarse-to-fine"``
            (:class:`~retailklip.segment.prompts.CoarseToFinePrompts` over grids of 8, 16 and
            ``points_per_side``) or ``"grid"`` (SAM's grid); ``"sam"`` mode always uses the grid.
        max_prompts: most prompts per photo of the retry, farthest and coarse-to-fine strategies
            (128 = 1/8 of SAM's 1024).
        max_masks: fast mode: most masks kept and upsampled per photo.
        runtime: what runs fast mode's mask decoder: ``"factored"``
            (:class:`~retailklip.segment.factored_decoder.FactoredMaskDecoder`: the image tokens
            kept in factored form, per prompt only low-rank work, and only the photo's valid
            area upscaled; as accurate as SAM's float32 decoder; ~0.23x the torch decoder's
            segment time and ~0.4x ONNX Runtime's on a 1080p photo, with less memory), ``"onnxruntime"``
            (:class:`~retailklip.segment.onnx_runtime.OnnxMaskDecoder`, the image-shared decoder
            exported to ONNX; needs ``pip install 'retailklip[onnx]'``), ``"torch"``
            (:class:`~retailklip.segment.fast_decoder.ImageSharedMaskDecoder`) or ``"auto"``
            (default: factored). Exact and sam modes always run SAM's decoder. Measured in
            ``benchmarks/bench_checkout.py`` and docs/segmentation.md.

    Raises:
        SegmenterOptionError: a value out of range.
    """

    points_per_side: int = 32
    points_per_batch: int = 16
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    mode: str = "fast"
    prompts: str = "retry"
    max_prompts: int = 128
    max_masks: int = 48
    runtime: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SegmenterOptionError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.prompts not in PROMPT_STRATEGIES:
            raise SegmenterOptionError(f"prompts must be one of {', '.join(PROMPT_STRATEGIES)}, got {self.prompts!r}")
        check_runtime(self.runtime)
        if self.max_prompts < 1 or self.max_masks < 1:
            raise SegmenterOptionError(f"max_prompts and max_masks must be >= 1, got {self.max_prompts}, {self.max_masks}")
        if self.mode != "sam" and (self.crop_n_layers > 0 or self.min_mask_region_area > 0):
            raise SegmenterOptionError("crop_n_layers and min_mask_region_area need mode='sam' (segment_anything's own generator)")
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
        """The options ``SamAutomaticMaskGenerator`` takes, as keyword arguments."""
        own = ("mode", "prompts", "max_prompts", "max_masks", "runtime")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in own}

    def strategy(self) -> GridPrompts | CoarseToFinePrompts | FarthestPointPrompts | RetryPrompts:
        """The prompt strategy these options name."""
        if self.prompts == "grid":
            return GridPrompts(self.points_per_side)
        if self.prompts == "retry":
            return RetryPrompts(first=min(8, self.points_per_side), batch=16, max_prompts=self.max_prompts,
                                candidates=2 * self.points_per_side)
        if self.prompts == "farthest":
            return FarthestPointPrompts(first=min(8, self.points_per_side), batch=16, max_prompts=self.max_prompts,
                                        candidates=self.points_per_side, covered_weight=0.25)
        levels = tuple(n for n in (8, 16) if n < self.points_per_side) + (self.points_per_side,)
        return CoarseToFinePrompts(levels, self.max_prompts)


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


class BoundedAutomaticMaskGenerator:
    """The bounded generator (modes ``fast`` / ``exact``) for a SAM-like model: ``generate(rgb)``
    sets the photo on the predictor, decodes the strategy's prompts through
    :class:`~retailklip.segment.bounded.SamPromptDecoder` and returns SAM-style records.

    Args:
        model: :class:`EfficientViTSam` or ``segment_anything`` ``Sam``.
        options: generation parameters.

    Attributes:
        predictor: the model's predictor (reusable for prompted segmentation).
        prompts_used: prompts decoded for the last photo.
    """

    def __init__(self, model: nn.Module, options: MaskGeneratorOptions) -> None:
        from segment_anything import SamPredictor

        # fast mode: the decoder of options.runtime (default: factored, SAM's arithmetic up to
        # rounding; benchmarks/bench_decoder.py); exact mode keeps SAM's decoder so its masks are SAM's.
        self.mask_decoder = fast_mask_decoder(model, options.runtime) if options.mode == "fast" else None
        self.predictor = EfficientViTSamPredictor(model) if isinstance(model, EfficientViTSam) else SamPredictor(model)
        self.options = options
        self._generator = BoundedMaskGenerator(
            BoundedOptions(mode=options.mode, points_per_batch=options.points_per_batch,
                           pred_iou_thresh=options.pred_iou_thresh, stability_score_thresh=options.stability_score_thresh,
                           stability_score_offset=options.stability_score_offset, box_nms_thresh=options.box_nms_thresh,
                           max_masks=options.max_masks),
            options.strategy(),
        )
        self.prompts_used = 0

    def generate(self, rgb: Any) -> list[dict[str, Any]]:
        """Records of a uint8 (H, W, 3) RGB photo (as ``SamAutomaticMaskGenerator.generate``)."""
        self.predictor.set_image(rgb)
        try:
            records = self._generator.generate(SamPromptDecoder(self.predictor, self.mask_decoder))
        finally:
            self.predictor.reset_image()
        self.prompts_used = self._generator.prompts_used
        return records


def fast_mask_decoder(model: nn.Module, runtime: str = "auto"
                      ) -> FactoredMaskDecoder | ImageSharedMaskDecoder | OnnxMaskDecoder:
    """Fast mode's mask decoder for ``model`` (see :attr:`MaskGeneratorOptions.runtime`).

    Args:
        model: :class:`EfficientViTSam` or ``segment_anything`` ``Sam``.
        runtime: ``"auto"``, ``"factored"``, ``"onnxruntime"`` or ``"torch"``.

    Returns:
        A :class:`~retailklip.segment.factored_decoder.FactoredMaskDecoder` (auto, factored),
        an :class:`~retailklip.segment.onnx_runtime.OnnxMaskDecoder` (onnxruntime) or an
        :class:`ImageSharedMaskDecoder` (torch), each around ``model.mask_decoder``.

    Raises:
        SegmenterOptionError: unknown ``runtime``, or ``"onnxruntime"`` without onnxruntime.
    """
    check_runtime(runtime)
    d = model.mask_decoder
    if runtime in ("auto", "factored"):
        return FactoredMaskDecoder(d)
    shared = d if isinstance(d, ImageSharedMaskDecoder) else ImageSharedMaskDecoder(d)
    return OnnxMaskDecoder(shared) if runtime == "onnxruntime" else shared


def check_runtime(runtime: str) -> None:
    """Raise :class:`SegmenterOptionError` (one line) for an unknown ``runtime`` or for
    ``"onnxruntime"`` without onnxruntime and onnx installed."""
    if runtime not in RUNTIMES:
        raise SegmenterOptionError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime" and not onnxruntime_available():
        raise SegmenterOptionError("runtime='onnxruntime' needs onnxruntime and onnx: pip install 'retailklip[onnx]'")


def build_mask_generator(model: nn.Module, options: MaskGeneratorOptions | None = None
                         ) -> SamAutomaticMaskGenerator | BoundedAutomaticMaskGenerator:
    """Automatic mask generator for an EfficientViT-SAM or an original SAM model.

    Args:
        model: :class:`EfficientViTSam` or ``segment_anything.modeling.Sam``.
        options: generation parameters (defaults: :class:`MaskGeneratorOptions`).

    Returns:
        :class:`BoundedAutomaticMaskGenerator` (modes fast / exact), or a
        ``SamAutomaticMaskGenerator`` producing binary masks (mode sam).

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
    if options.mode != "sam":
        return BoundedAutomaticMaskGenerator(model, options)
    cls = EfficientViTSamAutomaticMaskGenerator if isinstance(model, EfficientViTSam) else SamAutomaticMaskGenerator
    return cls(model, output_mode="binary_mask", **options.as_kwargs())

