"""Automatic mask generation in bounded memory: filter at the decoder's low resolution first,
upsample only the masks that are kept, and only inside their boxes.

segment_anything's ``SamAutomaticMaskGenerator`` (Kirillov et al. 2023, §7.1 / appendix B)
upsamples every decoded mask of a batch to the photo's full resolution as float32 before it
filters anything: a batch of 64 prompts x 3 masks on a 12 MP photo is ~9 GB.  Here a
:class:`PromptDecoder` answers prompts with low-resolution logits (SAM's 256 x 256, cropped to
the photo's valid area), and :class:`BoundedMaskGenerator` has two modes:

* ``"exact"``: SAM's own arithmetic on SAM's own prompts (predicted-IoU filter, full-resolution
  stability score, box NMS, RLE), but the predicted-IoU filter runs before anything is upsampled
  and the survivors are upsampled in chunks of a bounded size; the records equal
  ``SamAutomaticMaskGenerator.generate``'s (``tests/test_segment_bounded.py``).
* ``"fast"`` (default): stability score, boxes and NMS at the low working resolution, at most
  ``max_masks`` masks kept, then each kept mask upsampled (SAM's two bilinear steps) only inside
  its box.  Memory is the photo, the kept masks and O(points_per_batch x 256 x 256): it grows with
  neither the number of prompts nor (beyond the kept masks) the pixel count.  The stability
  score at low resolution differs slightly from SAM's; the agreement (mask IoU, count) is stated
  in docs/segmentation.md and tested.

Prompts come from a strategy of :mod:`~retailklip.segment.prompts`, round by round, each round
told which pixels the masks accepted so far cover (each kept mask only where it meets its own
prompt, composite masks not at all: ``_coverage``); in fast mode a session with a ``feedback``
method is also shown every decoded batch (points, low-resolution logits, which outputs passed
the predicted-IoU and stability filters).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import (
    MaskData,
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    calculate_stability_score,
    mask_to_rle_pytorch,
    rle_to_mask,
)
from torchvision.ops.boxes import batched_nms

from .errors import SegmenterOptionError
from .factored_decoder import FactoredMaskDecoder
from .prompts import point_components

#: Generator modes.
MODES = ("fast", "exact")
#: Side of SAM's low-resolution mask logits and of its prompt frame, pixels.
LOW_RES, FRAME = 256, 1024


class PromptDecoder(Protocol):
    """What the generator needs of a mask decoder for one photo (a SAM model through
    :class:`SamPromptDecoder`, or a simulation's oracle).

    Attributes:
        image_size: (H, W) of the photo, pixels.
        low_res_size: (h, w) of the valid low-resolution logits (the photo's area of SAM's
            256 x 256 mask frame).
    """

    image_size: tuple[int, int]
    low_res_size: tuple[int, int]

    def decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 (n, 2) ``(x, y)`` photo pixels -> (logits float32 (n, 3, h, w), predicted IoU float32 (n, 3))."""

    def upsample(self, logits: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        """One mask's (h, w) logits -> bool (y1 - y0, x1 - x0) photo-resolution mask inside ``box``
        = (x0, y0, x1, y1) photo pixels, x1 / y1 exclusive."""


def _bilinear_axis(n_in: int, n_out: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices i0, i1 and weight of i1 for output indices [start, stop) of a bilinear
    resize from ``n_in`` to ``n_out`` samples (``align_corners=False``, PyTorch's arithmetic)."""
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(start, stop, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0, 0, 1).astype(np.float32)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(w1)


class SamPromptDecoder:
    """:class:`PromptDecoder` of a SAM-like model (EfficientViT-SAM or SAM) whose predictor holds
    one photo's image embedding (``predictor.set_image`` called).

    Args:
        predictor: a ``segment_anything.SamPredictor`` (or
            :class:`~retailklip.segment.predictor.EfficientViTSamPredictor`) with an image set.
        mask_decoder: the mask decoder to run (default: the model's own), e.g. a
            :class:`~retailklip.segment.fast_decoder.ImageSharedMaskDecoder` around it.
    """

    def __init__(self, predictor: Any, mask_decoder: Any = None) -> None:
        if not getattr(predictor, "is_image_set", False):
            raise SegmenterOptionError("the predictor has no image; call set_image first")
        self.predictor = predictor
        self.model = predictor.model
        self.image_size = tuple(int(v) for v in predictor.original_size)
        self.input_size = tuple(int(v) for v in predictor.input_size)
        self.low_res_size = (math.ceil(self.input_size[0] * LOW_RES / FRAME), math.ceil(self.input_size[1] * LOW_RES / FRAME))
        self.mask_threshold = float(self.model.mask_threshold)
        self.mask_decoder = mask_decoder if mask_decoder is not None else self.model.mask_decoder

    @torch.no_grad()
    def decode_full_frame(self, points: np.ndarray, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder outputs as ``SamPredictor.predict_torch`` computes them before upsampling:
        (logits float32 (n, 3, 256, 256), predicted IoU (n, 3)), one positive point per prompt;
        with ``size`` = (h, w) the logits' top-left (n, 3, h, w) only (a
        :class:`~retailklip.segment.factored_decoder.FactoredMaskDecoder` then upscales only
        that area)."""
        coords = self.predictor.transform.apply_coords(np.asarray(points), self.image_size)
        in_points = torch.as_tensor(coords, device=self.predictor.device)[:, None, :]
        labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)[:, None]
        sparse, dense = self.model.prompt_encoder(points=(in_points, labels), boxes=None, masks=None)
        args = (self.predictor.features, self.model.prompt_encoder.get_dense_pe(), sparse, dense, True)
        if size is not None and isinstance(self.mask_decoder, FactoredMaskDecoder):
            return self.mask_decoder.predict(*args, size=size)
        low, iou = self.mask_decoder(*args)
        return (low if size is None else low[..., : size[0], : size[1]]), iou

    def decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        low, iou = self.decode_full_frame(points, self.low_res_size)
        return low.float().cpu(), iou.float().cpu()

    @torch.no_grad()
    def upsample_full(self, logits: torch.Tensor) -> torch.Tensor:
        """SAM's ``postprocess_masks`` of full-frame (k, 256, 256) logits -> (k, H, W) float32."""
        return self.model.postprocess_masks(logits[:, None], self.input_size, self.image_size)[:, 0]

    @torch.no_grad()
    def upsample(self, logits: torch.Tensor, box: tuple[int, int, int, int], *, rows_per_strip: int = 512) -> torch.Tensor:
        h_in, w_in = self.input_size
        full = torch.zeros(LOW_RES, LOW_RES, dtype=torch.float32)
        full[: logits.shape[0], : logits.shape[1]] = logits
        frame = F.interpolate(full[None, None], (FRAME, FRAME), mode="bilinear", align_corners=False)[0, 0, :h_in, :w_in]
        H, W = self.image_size
        x0, y0, x1, y1 = box
        cx0, cx1, wx = _bilinear_axis(w_in, W, x0, x1)
        out = torch.empty(y1 - y0, x1 - x0, dtype=torch.bool)
        for s in range(y0, y1, rows_per_strip):
            e = min(s + rows_per_strip, y1)
            ry0, ry1, wy = _bilinear_axis(h_in, H, s, e)
            top, bottom = frame[ry0], frame[ry1]
            row0 = top[:, cx0] + (top[:, cx1] - top[:, cx0]) * wx
            row1 = bottom[:, cx0] + (bottom[:, cx1] - bottom[:, cx0]) * wx
            out[s - y0 : e - y0] = (row0 + (row1 - row0) * wy[:, None]) > self.mask_threshold
        return out


@dataclass(frozen=True)
class BoundedOptions:
    """Parameters of :class:`BoundedMaskGenerator` (thresholds as SAM's defaults).

    Attributes:
        mode: ``"fast"`` or ``"exact"`` (module docstring).
        points_per_batch: prompts decoded together.
        pred_iou_thresh: keep masks whose predicted IoU is > this (0.88).
        stability_score_thresh: keep masks whose stability score is >= this (0.95).
        stability_score_offset: logit offset of the stability score (1.0).
        box_nms_thresh: box IoU above which the lower-scored duplicate is dropped (0.7).
        max_masks: fast mode: most masks kept (by predicted IoU) and upsampled per photo (64).
        chunk_pixels: exact mode: most mask pixels upsampled at once (float32: x 4 bytes).
        box_margin: fast mode: low-resolution cells added around a mask's box before upsampling.
        cover_at_prompt: fast mode: in the coverage map the prompt strategy is steered by, a kept
            mask covers only its connected components at its own prompt (default True; False =
            the whole mask, as before; docs/segmentation.md, "Third round").
    """

    mode: str = "fast"
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    max_masks: int = 64
    chunk_pixels: int = 64_000_000
    box_margin: int = 2
    cover_at_prompt: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SegmenterOptionError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if min(self.points_per_batch, self.max_masks, self.chunk_pixels) < 1 or self.box_margin < 0:
            raise SegmenterOptionError("points_per_batch, max_masks and chunk_pixels must be >= 1, box_margin >= 0")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SegmenterOptionError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def _count(data: MaskData) -> int:
    """Masks in ``data`` (0 for an empty ``MaskData``)."""
    stats = dict(data.items())
    return len(stats["iou_preds"]) if "iou_preds" in stats else 0


def _coverage(masks: torch.Tensor, points: Any = None, image_size: tuple[int, int] | None = None,
              contained: float = 0.8) -> np.ndarray:
    """Pixels covered by the kept masks (bool (k, h, w) -> (h, w)), leaving out *composite*
    masks: a mask holding >= 2 other kept masks (each >= ``contained`` inside it), e.g. SAM's
    whole-tray answer.  Such a mask would mark every object on the tray as found and stop the
    prompt strategy from asking about the objects themselves.

    With ``points`` (each mask's prompt, float (k, 2) ``(x, y)`` photo pixels) and
    ``image_size`` (H, W), a mask covers only its connected components at its prompt
    (:func:`~retailklip.segment.prompts.point_components`): a whole-tray answer that holds fewer
    than 2 kept masks (a tray of 3 products, 2 not found yet) then covers the product under its
    prompt, not the products that were never found."""
    flat = masks.flatten(1).float()
    area = flat.sum(1)
    inter = flat @ flat.T  # (k, k): pixels of mask j inside mask i
    holds = (inter >= contained * area[None, :]) & (area[None, :] > 0)
    holds.fill_diagonal_(False)
    composite = holds.sum(1) >= 2
    if points is None or image_size is None:
        return masks[~composite].any(0).numpy()
    h, w = masks.shape[1:]
    H, W = image_size
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    cover = np.zeros((h, w), bool)
    for i in np.flatnonzero(~composite.numpy()):
        cover |= point_components(masks[i].numpy(), int(pts[i, 0] * w / W), int(pts[i, 1] * h / H))
    return cover


def _batches(points: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for s in range(0, len(points), size):
        yield points[s : s + size]


class BoundedMaskGenerator:
    """Automatic mask generation with a prompt strategy, in bounded memory (module docstring).

    Args:
        options: thresholds and mode.
        strategy: a :mod:`~retailklip.segment.prompts` strategy (``start(width, height)``).
    """

    def __init__(self, options: BoundedOptions, strategy: Any) -> None:
        self.options = options
        self.strategy = strategy
        #: prompts decoded by the last :meth:`generate` call
        self.prompts_used = 0

    def generate(self, decoder: PromptDecoder) -> list[dict[str, Any]]:
        """Masks of one photo, as SAM's records: ``segmentation`` bool (H, W), ``bbox`` XYWH,
        ``area`` (pixels), ``predicted_iou``, ``stability_score``, ``point_coords``, ``crop_box``;
        ordered by descending predicted IoU (SAM's NMS order)."""
        self.prompts_used = 0
        if self.options.mode == "exact":
            return self._generate_exact(decoder)
        return self._generate_fast(decoder)

    # ------------------------------------------------------------------ exact
    def _generate_exact(self, decoder: SamPromptDecoder) -> list[dict[str, Any]]:
        o = self.options
        H, W = decoder.image_size
        session = self.strategy.start(W, H)
        data = MaskData()
        coverage = None
        while (points := session.next_points(coverage)) is not None:
            for batch in _batches(points, o.points_per_batch):
                self.prompts_used += len(batch)
                low, iou = decoder.decode_full_frame(batch)
                part = MaskData(iou_preds=iou.flatten(0, 1), points=torch.as_tensor(batch.repeat(low.shape[1], axis=0)),
                                low=low.flatten(0, 1))
                if o.pred_iou_thresh > 0.0:
                    part.filter(part["iou_preds"] > o.pred_iou_thresh)
                # upsampled in chunks; only masks passing the stability filter get boxes and RLEs
                rles, stab, boxes, keep = [], [], [], []
                chunk = max(1, o.chunk_pixels // (H * W))
                for s in range(0, len(part["iou_preds"]), chunk):
                    masks = decoder.upsample_full(part["low"][s : s + chunk])
                    score = calculate_stability_score(masks, decoder.mask_threshold, o.stability_score_offset)
                    passed = score >= o.stability_score_thresh if o.stability_score_thresh > 0.0 \
                        else torch.ones_like(score, dtype=torch.bool)
                    binary = masks[passed] > decoder.mask_threshold
                    del masks
                    stab.append(score[passed])
                    boxes.append(batched_mask_to_box(binary))
                    rles += mask_to_rle_pytorch(binary)
                    keep.append(passed)
                del part["low"]
                if keep:
                    part.filter(torch.cat(keep))
                part["stability_score"] = torch.cat(stab) if stab else torch.zeros(0)
                part["boxes"] = torch.cat(boxes) if boxes else torch.zeros(0, 4, dtype=torch.int64)
                part["rles"] = rles
                data.cat(part)
            coverage = None  # exact mode: SAM's grid has one round; coverage is not needed
        if _count(data) == 0:
            return []
        keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]),
                           iou_threshold=o.box_nms_thresh)
        data.filter(keep)
        data.to_numpy()
        crop = [0, 0, W, H]
        return [
            {"segmentation": rle_to_mask(rle), "area": area_from_rle(rle),
             "bbox": box_xyxy_to_xywh(data["boxes"][i]).tolist(), "predicted_iou": float(data["iou_preds"][i]),
             "point_coords": [data["points"][i].tolist()], "stability_score": float(data["stability_score"][i]),
             "crop_box": crop}
            for i, rle in enumerate(data["rles"])
        ]

    # ------------------------------------------------------------------ fast
    def _generate_fast(self, decoder: PromptDecoder) -> list[dict[str, Any]]:
        o = self.options
        H, W = decoder.image_size
        h, w = decoder.low_res_size
        session = self.strategy.start(W, H)
        feedback = getattr(session, "feedback", None)
        kept = MaskData()  # at most max_masks candidates between rounds: memory does not grow with prompts
        coverage = None
        while (points := session.next_points(coverage)) is not None:
            for batch in _batches(points, o.points_per_batch):
                self.prompts_used += len(batch)
                low, iou = decoder.decode(batch)
                part = MaskData(low=low.flatten(0, 1), iou_preds=iou.flatten(0, 1),
                                points=torch.as_tensor(batch.repeat(low.shape[1], axis=0)))
                part["stability_score"] = calculate_stability_score(part["low"], 0.0, o.stability_score_offset)
                passed = torch.ones_like(part["iou_preds"], dtype=torch.bool)
                if o.pred_iou_thresh > 0.0:
                    passed &= part["iou_preds"] > o.pred_iou_thresh
                if o.stability_score_thresh > 0.0:
                    passed &= part["stability_score"] >= o.stability_score_thresh
                if feedback is not None:  # the strategy may re-prompt where every answer was rejected
                    feedback(batch, low, passed.view(low.shape[:2]))
                part.filter(passed)
                part["boxes"] = batched_mask_to_box(part["low"] > 0.0)
                kept.cat(part)
                kept = self._nms(kept)
            if not _count(kept):
                coverage = np.zeros((h, w), bool)
            elif o.cover_at_prompt:
                coverage = _coverage(kept["low"] > 0.0, kept["points"], (H, W))
            else:
                coverage = _coverage(kept["low"] > 0.0)
        return [self._full_record(decoder, kept, i) for i in range(_count(kept))]

    def _nms(self, data: MaskData) -> MaskData:
        if not _count(data):
            return data
        keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]),
                           iou_threshold=self.options.box_nms_thresh)
        data.filter(keep[: self.options.max_masks])
        return data

    def _full_record(self, decoder: PromptDecoder, data: MaskData, i: int) -> dict[str, Any]:
        H, W = decoder.image_size
        h, w = decoder.low_res_size
        bx0, by0, bx1, by1 = (int(v) for v in data["boxes"][i])
        m = self.options.box_margin
        # low-res cell j covers photo columns [j * W / w, (j + 1) * W / w)
        x0, x1 = max(0, math.floor((bx0 - m) * W / w)), min(W, math.ceil((bx1 + 1 + m) * W / w))
        y0, y1 = max(0, math.floor((by0 - m) * H / h)), min(H, math.ceil((by1 + 1 + m) * H / h))
        inside = decoder.upsample(data["low"][i], (x0, y0, x1, y1)).numpy()
        mask = np.zeros((H, W), bool)
        mask[y0:y1, x0:x1] = inside
        ys, xs = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        bbox = [0, 0, 0, 0] if not len(ys) else [int(x0 + xs[0]), int(y0 + ys[0]), int(xs[-1] - xs[0] + 1),
                                                 int(ys[-1] - ys[0] + 1)]
        return {"segmentation": mask, "area": int(inside.sum()), "bbox": bbox,
                "predicted_iou": float(data["iou_preds"][i]), "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability_score"][i]), "crop_box": [0, 0, W, H]}
