"""Retail post-processing of automatic masks: one segment per product.

SAM's automatic mask generator returns parts as well as wholes (a banana's stem next to the
banana, a label next to its bottle) and background regions (the table, the shelf). Recognising
every mask then produces spurious products: the seed pipeline recognised a banana's stem as
"ginger". :func:`select_masks` keeps product-sized wholes with three rules, applied in order:

1. **tiny**: drop masks smaller than ``min_area_fraction`` of the image area;
2. **background**: drop masks larger than ``max_area_fraction`` of the image area (the
   near-whole-image table/shelf/wall region, and "the whole photo" masks);
3. **contained parts**: visit the remaining masks from the largest to the smallest and drop a
   mask when at least ``containment_threshold`` of its pixels lie inside one already kept mask
   (which is at least as large).

Rule 2 runs before rule 3 so that a background mask can never swallow the products on it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import SegmenterOptionError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostprocessOptions:
    """Thresholds of :func:`select_masks`; fractions are of the image area (H x W pixels).

    Attributes:
        min_area_fraction: masks with area < this fraction of the image are "tiny" and dropped
            (default 0.002: 242 px in a 348x348 photo, 24,000 px (155x155) in a 12 MP photo;
            anything smaller is too small for a recognition encoder anyway). 0 disables.
        max_area_fraction: masks with area > this fraction are background and dropped
            (default 0.9). 1 disables. For single-item scans filling the frame use the
            ``whole-image`` segmenter or ``fallback_whole_image``.
        containment_threshold: a mask is a part of a larger kept mask, and dropped, when
            >= this fraction of its pixels lie inside that mask (default 0.8: a stem that
            SAM's larger mask covers to 80 % or more). 1 drops only fully contained masks;
            values > 1 disable the rule.
        composite_coverage: a mask holding >= 2 other masks that cover at least this fraction of
            it is a merge of products and dropped (default 0.7); values > 1 disable the rule.
        fallback_whole_image: when no mask survives, return the whole image as one segment
            instead of none (default False: an empty result is reported as such).

    Raises:
        SegmenterOptionError: a value out of range.
    """

    min_area_fraction: float = 0.002
    max_area_fraction: float = 0.9
    containment_threshold: float = 0.8
    composite_coverage: float = 0.7
    fallback_whole_image: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_area_fraction <= 1.0:
            raise SegmenterOptionError(f"min_area_fraction must be in [0, 1], got {self.min_area_fraction}")
        if not 0.0 < self.max_area_fraction <= 1.0:
            raise SegmenterOptionError(f"max_area_fraction must be in (0, 1], got {self.max_area_fraction}")
        if self.min_area_fraction > self.max_area_fraction:
            raise SegmenterOptionError(
                f"min_area_fraction {self.min_area_fraction} exceeds max_area_fraction {self.max_area_fraction}"
            )
        if not self.containment_threshold > 0.0:
            raise SegmenterOptionError(f"containment_threshold must be > 0, got {self.containment_threshold}")


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def select_masks(
    masks: Sequence[np.ndarray] | np.ndarray,
    options: PostprocessOptions | None = None,
    scores: Sequence[float] | None = None,
) -> list[int]:
    """Indices of the masks to keep as product segments (rules in the module docstring).

    Args:
        masks: N boolean masks of one image, each (H, W), as a sequence or an (N, H, W) array.
        options: thresholds (default :class:`PostprocessOptions`).
        scores: optional N quality scores; among equally large masks the higher-scored one is
            visited first by the containment rule.

    Returns:
        Kept indices into ``masks``, in ascending order. ``fallback_whole_image`` is not
        applied here (it needs the image; see ``SamSegmenter.segment``).

    Raises:
        ValueError: masks of different shapes, not 2-D, or ``scores`` of the wrong length.
    """
    options = options or PostprocessOptions()
    masks = [np.asarray(m, dtype=bool) for m in masks]
    if not masks:
        return []
    shape = masks[0].shape
    if len(shape) != 2 or any(m.shape != shape for m in masks):
        raise ValueError(f"masks must all be 2-D of one shape, got {sorted({m.shape for m in masks})}")
    if scores is not None and len(scores) != len(masks):
        raise ValueError(f"got {len(scores)} scores for {len(masks)} masks")
    total = float(shape[0] * shape[1])
    areas = np.array([int(np.count_nonzero(m)) for m in masks])

    tiny = areas < options.min_area_fraction * total
    empty = areas == 0
    background = areas > options.max_area_fraction * total
    candidates = [i for i in range(len(masks)) if not (tiny[i] or empty[i] or background[i])]

    merges = _merges(masks, areas, candidates, options) if options.composite_coverage <= 1.0 else set()
    candidates = [i for i in candidates if i not in merges]

    score = np.zeros(len(masks)) if scores is None else np.asarray(scores, dtype=float)
    candidates.sort(key=lambda i: (-areas[i], -score[i], i))
    kept: list[int] = []
    boxes: dict[int, tuple[int, int, int, int]] = {}
    contained = 0
    for i in candidates:
        boxes[i] = _bbox(masks[i])
        x0, y0, x1, y1 = boxes[i]
        is_part = False
        for k in kept:
            kx0, ky0, kx1, ky1 = boxes[k]
            ix0, iy0, ix1, iy1 = max(x0, kx0), max(y0, ky0), min(x1, kx1), min(y1, ky1)
            if ix0 >= ix1 or iy0 >= iy1:
                continue
            inter = np.count_nonzero(masks[i][iy0:iy1, ix0:ix1] & masks[k][iy0:iy1, ix0:ix1])
            if inter >= options.containment_threshold * areas[i]:
                is_part = True
                break
        if is_part:
            contained += 1
        else:
            kept.append(i)
    logger.debug(
        "post-processing: %d masks -> %d kept (%d tiny/empty, %d background, %d merges, %d contained parts)",
        len(masks), len(kept), int(np.count_nonzero(tiny | empty)), int(np.count_nonzero(background & ~tiny)),
        len(merges), contained,
    )
    return sorted(kept)


def _merges(masks: list[np.ndarray], areas: np.ndarray, candidates: list[int], options: PostprocessOptions) -> set[int]:
    """Rule 3: the candidates that hold >= 2 other candidates covering >= ``composite_coverage`` of them."""
    boxes = {i: _bbox(masks[i]) for i in candidates}
    out = set()
    for i in candidates:
        x0, y0, x1, y1 = boxes[i]
        inside = []
        for j in candidates:
            if j == i or areas[j] >= areas[i]:
                continue
            jx0, jy0, jx1, jy1 = boxes[j]
            if jx0 < x0 or jy0 < y0 or jx1 > x1 or jy1 > y1:
                # most of j must lie inside i, so its box overlaps i's box a lot; test it exactly
                ix0, iy0, ix1, iy1 = max(x0, jx0), max(y0, jy0), min(x1, jx1), min(y1, jy1)
                if ix0 >= ix1 or iy0 >= iy1:
                    continue
            else:
                ix0, iy0, ix1, iy1 = jx0, jy0, jx1, jy1
            inter = np.count_nonzero(masks[i][iy0:iy1, ix0:ix1] & masks[j][iy0:iy1, ix0:ix1])
            if inter >= options.containment_threshold * areas[j]:
                inside.append(j)
        if len(inside) >= 2:
            union = np.zeros(masks[i][y0:y1, x0:x1].shape, bool)
            for j in inside:
                union |= masks[j][y0:y1, x0:x1]
            if np.count_nonzero(union & masks[i][y0:y1, x0:x1]) >= options.composite_coverage * areas[i]:
                out.add(i)
    return out
