"""Prompted segmentation: one segment per given box or point, decoded in batches.

A POS with its own product detector, or a tray with a fixed layout, already knows where the
products are: SAM then only has to cut each one out. Box prompts are decoded with a single mask
output, as MobileSAMv2 does for its object-aware box prompts (Zhang et al., "MobileSAMv2: Faster
Segment Anything to Everything", 2023, section 3: a box is an unambiguous prompt); a point prompt
is ambiguous (part / object / group), so SAM's three multimask outputs are decoded and the one
with the highest predicted IoU is kept (Kirillov et al., "Segment Anything", 2023, section 3,
"resolving ambiguity").

The prompt encoder and mask decoder run on up to ``batch_size`` prompts at once, exactly the two
calls of ``segment_anything.SamPredictor.predict_torch``; what differs is the last step:
``predict_torch`` upsamples the whole batch to full resolution as float32 (B x H x W x 4 bytes,
about 3 GB for 64 prompts on a 12 MP photo), while here each prompt's one chosen mask is
upsampled alone and kept as a bool (H, W) array, so the transient memory is one float32 (H, W)
mask whatever the number of prompts.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from PIL import Image
from segment_anything import SamPredictor
from segment_anything.utils.amg import calculate_stability_score
from torch import nn

from ..images import to_rgb
from .errors import SegmenterOptionError
from .factored_decoder import FactoredMaskDecoder
from .modeling.efficientvit_sam import EfficientViTSam
from .parsing import Segment, make_segment
from .predictor import EfficientViTSamPredictor


def check_boxes(boxes: object, width: int, height: int) -> np.ndarray:
    """Validate box prompts and clip them to the photo.

    Args:
        boxes: array-like (N, 4) of ``(x0, y0, x1, y1)`` in photo pixels (x1/y1 the far edges),
            N >= 0.
        width, height: the photo's size in pixels.

    Returns:
        float32 (N, 4), clipped to ``[0, width] x [0, height]``.

    Raises:
        SegmenterOptionError: not (N, 4) numbers, a non-finite value, ``x1 <= x0`` or
            ``y1 <= y0``, or a box that lies outside the photo (the message names its row).
    """
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise SegmenterOptionError("boxes must be numbers of shape (N, 4): x0, y0, x1, y1 in pixels") from None
    if arr.size == 0:
        return np.zeros((0, 4), np.float32)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise SegmenterOptionError(f"boxes must have shape (N, 4) (x0, y0, x1, y1 in pixels), got {arr.shape}")
    for i, (x0, y0, x1, y1) in enumerate(arr.tolist()):
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise SegmenterOptionError(f"box {i}: not finite: {[x0, y0, x1, y1]}")
        if x1 <= x0 or y1 <= y0:
            raise SegmenterOptionError(f"box {i}: needs x1 > x0 and y1 > y0, got {[x0, y0, x1, y1]}")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise SegmenterOptionError(f"box {i}: {[x0, y0, x1, y1]} lies outside the {width}x{height} photo")
    arr[:, [0, 2]] = arr[:, [0, 2]].clip(0, width)
    arr[:, [1, 3]] = arr[:, [1, 3]].clip(0, height)
    return arr.astype(np.float32)


def check_points(points: object, width: int, height: int) -> np.ndarray:
    """Validate point prompts (one positive point per object).

    Args:
        points: array-like (N, 2) of ``(x, y)`` photo pixels, N >= 0.
        width, height: the photo's size in pixels.

    Returns:
        float32 (N, 2).

    Raises:
        SegmenterOptionError: not (N, 2) numbers, or a point outside ``[0, width) x [0, height)``.
    """
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise SegmenterOptionError("points must be numbers of shape (N, 2): x, y in pixels") from None
    if arr.size == 0:
        return np.zeros((0, 2), np.float32)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise SegmenterOptionError(f"points must have shape (N, 2) (x, y in pixels), got {arr.shape}")
    for i, (x, y) in enumerate(arr.tolist()):
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < width and 0 <= y < height):
            raise SegmenterOptionError(f"point {i}: {[x, y]} is not inside the {width}x{height} photo")
    return arr.astype(np.float32)


def _box_pixels(box: np.ndarray) -> tuple[int, int, int, int]:
    """Integer pixel range ``(x0, y0, x1, y1)``, x1/y1 exclusive, that a float box covers."""
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    return x0, y0, max(math.ceil(box[2]), x0 + 1), max(math.ceil(box[3]), y0 + 1)


def box_mask(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """bool (height, width) mask of the pixels a (clipped) float box covers: columns
    ``floor(x0) .. ceil(x1) - 1``, rows ``floor(y0) .. ceil(y1) - 1``."""
    x0, y0, x1, y1 = _box_pixels(box)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:min(y1, height), x0:min(x1, width)] = True
    return mask


def box_segments(image: Image.Image, boxes: object) -> list[Segment]:
    """Segments that are the given boxes themselves (rectangular masks, score 1.0): what a
    segmenter without a model (``whole-image``) or a recognizer without a segmenter does with
    box prompts.

    Args:
        image: upright PIL ``RGB``/``RGBA`` photo.
        boxes: (N, 4) ``(x0, y0, x1, y1)`` photo pixels (see :func:`check_boxes`).

    Returns:
        N segments in ``boxes`` order.

    Raises:
        SegmenterOptionError: bad boxes.
    """
    arr = check_boxes(boxes, image.width, image.height)
    return [make_segment(image, box_mask(b, image.width, image.height), 1.0) for b in arr]


def mask_segments(image: Image.Image, masks: object) -> list[Segment]:
    """Segments of given masks (e.g. annotated ground truth), score 1.0, in ``masks`` order.

    Args:
        image: upright PIL ``RGB``/``RGBA`` photo of size (W, H).
        masks: a sequence of bool (H, W) arrays, or one bool (N, H, W) array.

    Raises:
        SegmenterOptionError: a mask that is not bool, not the photo's (H, W), or empty.
    """
    out = []
    for n, mask in enumerate(masks):
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (image.height, image.width) or not mask.any():
            raise SegmenterOptionError(
                f"mask {n}: expected a non-empty bool array of the photo's (H, W) = {(image.height, image.width)}, "
                f"got {'an empty' if mask.dtype == bool and mask.shape == (image.height, image.width) else ''}"
                f"{mask.dtype} {mask.shape}"
            )
        out.append(make_segment(image, mask, 1.0))
    return out


def build_predictor(model: nn.Module) -> SamPredictor:
    """``SamPredictor`` for ``model``: :class:`EfficientViTSamPredictor` for EfficientViT-SAM,
    segment_anything's own for ``Sam``."""
    return EfficientViTSamPredictor(model) if isinstance(model, EfficientViTSam) else SamPredictor(model)


class PromptedSegmenter:
    """Decodes box and point prompts of one photo into one segment each (see module docstring).

    Args:
        model: :class:`EfficientViTSam` or ``segment_anything`` ``Sam``.
        batch_size: prompts decoded together (>= 1; decoder memory vs. overhead; results do not
            change).
        stability_score_offset: logit offset of the stability score stored in each segment
            (SAM's 1.0).
        clip_to_box: keep only the mask pixels inside a box prompt's box (default True: a
            detector's box bounds its product, and what SAM adds outside it belongs to a
            neighbour or the background); False keeps SAM's mask as decoded, pixel for pixel
            ``SamPredictor.predict(box=..., multimask_output=False)`` (up to float rounding).
        mask_decoder: the mask decoder to run (default: a
            :class:`~retailklip.segment.factored_decoder.FactoredMaskDecoder` around the model's,
            SAM's arithmetic up to rounding with per prompt only low-rank work).

    Calls from several threads are serialised (the predictor caches one image).

    Raises:
        SegmenterOptionError: ``batch_size < 1``.
    """

    def __init__(
        self, model: nn.Module, *, batch_size: int = 64, stability_score_offset: float = 1.0, clip_to_box: bool = True,
        mask_decoder: nn.Module | None = None,
    ) -> None:
        if batch_size < 1:
            raise SegmenterOptionError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.mask_decoder = mask_decoder if mask_decoder is not None else FactoredMaskDecoder(model.mask_decoder)
        self.predictor = build_predictor(model)
        self.batch_size = batch_size
        self.stability_score_offset = stability_score_offset
        self.clip_to_box = clip_to_box
        self._lock = threading.Lock()

    @torch.no_grad()
    def segment_image(self, image: Image.Image, boxes: object = None, points: object = None) -> list[Segment]:
        """One segment per prompt of a decoded photo.

        Args:
            image: upright PIL ``RGB``/``RGBA`` image (``retailklip.images.load_image``);
                transparent pixels are composited onto grey for the model.
            boxes: (N, 4) ``(x0, y0, x1, y1)`` photo pixels, float, or None.
            points: (M, 2) ``(x, y)`` photo pixels, one positive point per object, or None.

        Returns:
            N + M segments: the boxes' in order, then the points'. ``score`` is SAM's predicted
            IoU of the decoded mask, ``stability_score`` the kept mask's stability at full
            resolution. A
            prompt whose mask comes out empty gets a stand-in so that every prompt has a
            segment: a box its own rectangle, a point its one pixel (stability 0.0).

        Raises:
            SegmenterOptionError: neither boxes nor points given, or bad prompts.
        """
        if boxes is None and points is None:
            raise SegmenterOptionError("prompted segmentation needs boxes or points")
        w, h = image.width, image.height
        box_arr = check_boxes(boxes if boxes is not None else [], w, h)
        point_arr = check_points(points if points is not None else [], w, h)
        if len(box_arr) + len(point_arr) == 0:
            return []
        rgb = np.asarray(to_rgb(image))
        with self._lock:
            self.predictor.set_image(rgb)
            try:
                segments = []
                for kind, prompts in (("box", box_arr), ("point", point_arr)):
                    for start in range(0, len(prompts), self.batch_size):
                        segments += self._decode(image, kind, prompts[start:start + self.batch_size])
            finally:
                self.predictor.reset_image()
        return segments

    def _decode(self, image: Image.Image, kind: str, prompts: np.ndarray) -> list[Segment]:
        """Prompt encoder + mask decoder on one batch (``predict_torch``'s two calls), then
        one upsampled mask per prompt."""
        p, model = self.predictor, self.model
        t = torch.as_tensor(prompts, dtype=torch.float32, device=p.device)
        if kind == "box":
            points, box_t, multimask = None, p.transform.apply_boxes_torch(t, p.original_size), False
        else:
            coords = p.transform.apply_coords_torch(t, p.original_size)[:, None, :]
            points, box_t, multimask = (coords, torch.ones(len(t), 1, dtype=torch.int, device=p.device)), None, True
        sparse, dense = model.prompt_encoder(points=points, boxes=box_t, masks=None)
        low_res, iou = self.mask_decoder(
            image_embeddings=p.features, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        )
        best = iou.argmax(dim=1)  # single-mask output for boxes: always 0
        segments = []
        for i, j in enumerate(best.tolist()):
            logits = model.postprocess_masks(low_res[i:i + 1, j:j + 1], p.input_size, p.original_size)[0, 0]
            if kind == "box" and self.clip_to_box:  # in place, no full-size temporary
                x0, y0, x1, y1 = _box_pixels(prompts[i])
                logits[:y0] = logits[y1:] = logits[:, :x0] = logits[:, x1:] = -torch.inf
            mask = (logits > model.mask_threshold).cpu().numpy()
            score = float(iou[i, j])
            if mask.any():
                stability = float(calculate_stability_score(logits, model.mask_threshold, self.stability_score_offset))
            else:
                mask, stability = self._stand_in(kind, prompts[i], image.width, image.height), 0.0
            del logits
            segments.append(make_segment(image, mask, score, stability))
        return segments

    @staticmethod
    def _stand_in(kind: str, prompt: np.ndarray, width: int, height: int) -> np.ndarray:
        """The mask of a prompt whose decoded mask is empty: the box, or the point's pixel."""
        if kind == "box":
            return box_mask(prompt, width, height)
        mask = np.zeros((height, width), dtype=bool)
        mask[int(prompt[1]), int(prompt[0])] = True
        return mask


__all__ = ["PromptedSegmenter", "box_mask", "box_segments", "build_predictor", "check_boxes", "check_points", "mask_segments"]
