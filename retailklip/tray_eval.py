"""Tray-level evaluation: annotated checkout photos through the whole pipeline, scored as a bill.

Input: photos with COCO instance annotations (:mod:`retailklip.coco`), each object's category
``name`` an SKU id of the catalog; an object whose category is not in the catalog should come out
**unknown** (``sku`` None).  Each photo is recognised (segment -> crops -> embed -> 1-NN with the
threshold), or, with ``masks="ground-truth"``, its annotated masks are recognised as they are, so
that recognition errors can be told apart from segmentation errors.

Predictions are matched to the annotated objects by mask IoU >= ``iou_threshold`` (0.5), greedily
in order of the segmenter's score, each object at most once: the matching rule of COCO's
evaluation (``pycocotools.cocoeval``; Lin et al., ECCV 2014).

Metrics (``TrayEvalResult``):

* **checkout accuracy** (cAcc; Wei et al., "RPC: A Large-Scale Retail Product Checkout Dataset",
  2019, section 4.3): the fraction of photos whose predicted count of every SKU equals the true
  count; here "unknown" is one more category, so a photo with a product that is not in the catalog
  is right only when exactly that many predictions are unknown (a spurious unknown is a checkout
  stopped for nothing);
* **count error**: RPC's ACD, the mean over photos of sum_k |predicted_k - true_k| over the SKUs
  and unknown;
* **SKU precision / recall** at the object level: a true positive is a prediction matched to an
  object of the same catalog SKU; precision over predictions with an SKU, recall over objects of
  catalog SKUs (per SKU too);
* **segmentation recall**: objects matched by any prediction, whatever its label;
* **unknown handling**: of the objects not in the catalog, how many came out unknown, were named
  as an SKU, or were not segmented; of the unknown predictions, how many lay on catalog products
  (false rejections) or on no object (spurious).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .coco import CocoDataset, CocoError, decode_segmentation
from .errors import RetailKlipError
from .images import load_image

if TYPE_CHECKING:  # pragma: no cover
    from .recognizer import Recognition, Recognizer

logger = logging.getLogger(__name__)

MASK_SOURCES = ("predicted", "ground-truth")


@dataclass(frozen=True)
class PhotoResult:
    """One photo's outcome.

    Attributes:
        file_name: the COCO ``file_name``.
        true_counts / predicted_counts: SKU -> count (catalog SKUs only).
        true_unknown / predicted_unknown: objects not in the catalog / predictions with sku None.
        objects / predictions: annotated objects / recognitions of the photo.
        correct: every count right (cAcc's criterion, unknown included).
        count_error: sum over SKUs and unknown of |predicted - true|.
    """

    file_name: str
    true_counts: dict[str, int]
    predicted_counts: dict[str, int]
    true_unknown: int
    predicted_unknown: int
    objects: int
    predictions: int
    correct: bool
    count_error: int


@dataclass(frozen=True)
class TrayEvalResult:
    """Tray-level metrics of one annotation file (module docstring); fractions are None when
    their denominator is 0."""

    annotations: str
    masks: str
    segmenter: str
    iou_threshold: float
    photos: int
    objects: int
    objects_not_in_catalog: int
    predictions: int
    checkout_accuracy: float | None
    count_error: float | None
    precision: float | None
    recall: float | None
    segmentation_recall: float | None
    unknown: dict[str, int]
    per_sku: dict[str, dict[str, Any]]
    per_photo: list[PhotoResult] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``catalog eval --layout coco --json``."""
        out = asdict(self)
        out["per_photo"] = [asdict(p) for p in self.per_photo]
        return out

    def table(self) -> str:
        """The text report (one metric a line)."""
        u, f = self.unknown, _fraction
        right = sum(p.correct for p in self.per_photo)
        header = (
            f"{self.annotations}: {self.photos} photos, {self.objects} objects ({self.objects_not_in_catalog} not in the "
            f"catalog), {self.predictions} predictions; masks {self.masks}, segmenter {self.segmenter}, "
            f"match at mask IoU >= {self.iou_threshold:g}"
        )
        not_in_catalog = (
            f"({u['rejected']} unknown, {u['named_as_sku']} named as an SKU, {u['not_segmented']} not segmented)"
        )
        unknown_predictions = f"({u['on_catalog_products']} on catalog products, {u['on_nothing']} on no object)"
        return "\n".join([
            header,
            f"{'checkout accuracy (cAcc)':28}{f(self.checkout_accuracy):>8}  ({right} of {self.photos} photos counted right)",
            f"{'mean count error':28}{f(self.count_error):>8}  (per photo: sum over SKUs and unknown of |predicted - true|)",
            f"{'SKU precision':28}{f(self.precision):>8}",
            f"{'SKU recall':28}{f(self.recall):>8}",
            f"{'segmentation recall':28}{f(self.segmentation_recall):>8}  (objects matched by a segment, any label)",
            f"{'objects not in the catalog':28}{self.objects_not_in_catalog:>8}  {not_in_catalog}",
            f"{'unknown predictions':28}{u['predicted']:>8}  {unknown_predictions}",
        ])


def _fraction(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def mask_iou(a: np.ndarray, box_a: tuple, b: np.ndarray, box_b: tuple) -> float:
    """IoU of two bool (H, W) masks with their tight boxes ``(x0, y0, x1, y1)`` (x1/y1
    exclusive); only the boxes' intersection is read.  0.0 when the boxes do not overlap."""
    x0, y0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x1, y1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if x1 <= x0 or y1 <= y0:
        return 0.0
    inter = int(np.count_nonzero(a[y0:y1, x0:x1] & b[y0:y1, x0:x1]))
    union = int(np.count_nonzero(a)) + int(np.count_nonzero(b)) - inter
    return inter / union if union else 0.0


def match_predictions(pred_masks, pred_boxes, pred_scores, true_masks, true_boxes, iou_threshold: float) -> list[int | None]:
    """Greedy COCO-style matching: predictions by descending score (ties: input order), each to
    the unmatched object of highest mask IoU if that is >= ``iou_threshold``.

    Returns:
        For each prediction, the index of its object, or None.
    """
    order = sorted(range(len(pred_masks)), key=lambda i: -pred_scores[i])
    taken: set[int] = set()
    matched: list[int | None] = [None] * len(pred_masks)
    for i in order:
        best, best_iou = None, iou_threshold
        for j in range(len(true_masks)):
            if j in taken:
                continue
            iou = mask_iou(pred_masks[i], pred_boxes[i], true_masks[j], true_boxes[j])
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            taken.add(best)
            matched[i] = best
    return matched


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def evaluate_trays(
    dataset: CocoDataset,
    recognizer: Recognizer,
    *,
    images_dir: str | os.PathLike | None = None,
    masks: str = "predicted",
    iou_threshold: float = 0.5,
) -> TrayEvalResult:
    """Run every annotated photo through ``recognizer`` and score it (module docstring).

    Args:
        dataset: parsed COCO annotations (:func:`retailklip.coco.read_coco`); category names
            are SKU ids.
        recognizer: recognises with its segmenter (``masks="predicted"``) or the annotated
            masks (``"ground-truth"``).
        images_dir: where the ``file_name``s are (default: the annotation file's directory).
        masks: ``"predicted"`` or ``"ground-truth"``.
        iou_threshold: mask IoU in (0, 1] at which a prediction matches an object.

    Returns:
        A :class:`TrayEvalResult`.

    Raises:
        RetailKlipError: bad ``masks`` / ``iou_threshold``, no photos; ``CocoError`` for a
            photo whose size differs from its annotation's or a malformed segmentation;
            ``InvalidImageError`` for a missing / undecodable photo.
    """
    if masks not in MASK_SOURCES:
        raise RetailKlipError(f"masks must be one of {', '.join(MASK_SOURCES)}, got {masks!r}")
    if not 0.0 < iou_threshold <= 1.0:
        raise RetailKlipError(f"the IoU threshold must be in (0, 1], got {iou_threshold}")
    if not dataset.images:
        raise RetailKlipError(f"{dataset.path}: no images to evaluate")
    root = Path(images_dir) if images_dir is not None else dataset.path.parent
    in_catalog = set(recognizer.catalog.names())
    photos: list[PhotoResult] = []
    tp, pred_sku, true_sku = Counter(), Counter(), Counter()
    unknown = Counter(rejected=0, named_as_sku=0, not_segmented=0, predicted=0, on_catalog_products=0, on_nothing=0)
    segmented = 0
    for entry in dataset.images:
        image = load_image(root / entry.file_name)
        if (image.width, image.height) != (entry.width, entry.height):
            raise CocoError(
                f"{entry.file_name}: the photo is {image.width}x{image.height} pixels, its annotation says "
                f"{entry.width}x{entry.height}"
            )
        true_masks = [decode_segmentation(a, entry.height, entry.width) for a in entry.annotations]
        true_boxes = [_tight_box(m) for m in true_masks]
        labels = [a.category if a.category in in_catalog else None for a in entry.annotations]
        if masks == "ground-truth":
            recs = recognizer.recognize(image, masks=true_masks) if true_masks else []
        else:
            recs = recognizer.recognize(image)
        whole = np.ones((entry.height, entry.width), dtype=bool)
        pred_masks = [r.mask if r.mask is not None else whole for r in recs]
        matched = match_predictions(
            pred_masks, [tuple(r.bbox) for r in recs], [r.score for r in recs], true_masks, true_boxes, iou_threshold,
        )
        photos.append(_photo_result(entry.file_name, labels, recs))
        segmented += sum(m is not None for m in matched)
        _count_matches(recs, matched, labels, tp, pred_sku, unknown)
        true_sku.update(label for label in labels if label is not None)
        found = set(matched)
        unknown["not_segmented"] += sum(1 for j, label in enumerate(labels) if label is None and j not in found)
        logger.info("%s: %d objects, %d predictions, %s", entry.file_name, len(labels), len(recs),
                    "right" if photos[-1].correct else "wrong")
    objects = sum(p.objects for p in photos)
    per_sku = {
        sku: {"true_positives": tp[sku], "predicted": pred_sku[sku], "objects": true_sku[sku],
              "precision": _ratio(tp[sku], pred_sku[sku]), "recall": _ratio(tp[sku], true_sku[sku])}
        for sku in sorted(set(pred_sku) | set(true_sku))
    }
    return TrayEvalResult(
        annotations=str(dataset.path), masks=masks,
        segmenter=getattr(recognizer.segmenter, "name", None) or ("none" if masks == "ground-truth" else "whole image"),
        iou_threshold=iou_threshold, photos=len(photos), objects=objects,
        objects_not_in_catalog=sum(p.true_unknown for p in photos), predictions=sum(p.predictions for p in photos),
        checkout_accuracy=_ratio(sum(p.correct for p in photos), len(photos)),
        count_error=_ratio(sum(p.count_error for p in photos), len(photos)),
        precision=_ratio(sum(tp.values()), sum(pred_sku.values())),
        recall=_ratio(sum(tp.values()), sum(true_sku.values())),
        segmentation_recall=_ratio(segmented, objects),
        unknown=dict(unknown), per_sku=per_sku, per_photo=photos,
    )


def _photo_result(file_name: str, labels: list[str | None], recs: list[Recognition]) -> PhotoResult:
    true, pred = Counter(x for x in labels if x is not None), Counter(r.sku for r in recs if r.sku is not None)
    true_unknown, pred_unknown = labels.count(None), sum(r.sku is None for r in recs)
    error = sum(abs(pred[k] - true[k]) for k in set(true) | set(pred)) + abs(pred_unknown - true_unknown)
    return PhotoResult(
        file_name, dict(sorted(true.items())), dict(sorted(pred.items())), true_unknown, pred_unknown,
        len(labels), len(recs), error == 0, error,
    )


def _count_matches(recs, matched, labels, tp: Counter, pred_sku: Counter, unknown: Counter) -> None:
    """Object-level tallies of one photo: true positives and predictions per SKU, unknowns."""
    for r, j in zip(recs, matched):
        label = labels[j] if j is not None else None
        if r.sku is not None:
            pred_sku[r.sku] += 1
            if j is not None and label == r.sku:
                tp[r.sku] += 1
            elif j is not None and label is None:
                unknown["named_as_sku"] += 1
            continue
        unknown["predicted"] += 1
        if j is None:
            unknown["on_nothing"] += 1
        elif label is None:
            unknown["rejected"] += 1
        else:
            unknown["on_catalog_products"] += 1
