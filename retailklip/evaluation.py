"""The RetailKLIP zero-shot evaluation protocol.

RetailKLIP (Srivastava, VISAPP 2024, "Finetuning OpenCLIP backbone using metric learning on a
single GPU for zero-shot retail product image classification", experiments section) measures an
encoder without training anything on the target dataset: the gallery is **one reference image
per class plus augmented copies of it**, every test image is classified as the class of its
**nearest gallery vector (1-NN, top-1)**, and accuracy is reported over all test images and as
the **average of per-class accuracies**.

Here the gallery is built exactly as a catalog builds it (:func:`retailklip.references.embed_reference`:
K views, view 0 = the reference itself, then the encoder), and searched with the product's own
FAISS index and SKU matcher, so the number measures what ``catalog recognize`` would do with a
catalog of those references (threshold off).  Datasets come from :mod:`retailklip.datasets`.
``catalog eval`` runs :func:`evaluate_zero_shot`; the finetune's held-out evaluation
(``finetune.evaluate``) builds its gallery with :func:`build_gallery` and scores with
:func:`score_zero_shot`, so both report the same :class:`ZeroShotResult`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .augment import DEFAULT_AUGMENTATIONS
from .calibration import nearest_skus
from .datasets import ZeroShotDataset
from .encoders import Encoder
from .hubness import HubnessReference
from .references import embed_reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroShotResult:
    """Result of a zero-shot evaluation (:func:`evaluate_zero_shot`, :func:`score_zero_shot`).

    Attributes:
        dataset, split: what was evaluated.
        classes: gallery classes (distractors without queries included); ``queries``: query
            images classified.
        augmentations: views per reference K; ``seed``: augmentation seed.
        top1: fraction of queries whose nearest gallery vector has the right class, in [0, 1].
        per_class_average: mean over classes with >= 1 query of their top-1, in [0, 1].
        per_class: class -> (correct, total) queries.
        encoder: the encoder's identity key.
        seconds: wall time of gallery + query embedding and search.
        hubness_k: the CSLS k the 1-NN was ranked with (:mod:`retailklip.hubness`; 0: plain).
    """

    dataset: str
    split: str
    classes: int
    queries: int
    augmentations: int
    seed: int
    top1: float
    per_class_average: float
    per_class: dict[str, tuple[int, int]] = field(default_factory=dict)
    encoder: str = ""
    seconds: float = 0.0
    hubness_k: int = 0

    @property
    def per_class_accuracy(self) -> dict[str, float]:
        """Class -> top-1 of its queries, in [0, 1] (classes with >= 1 query)."""
        return {c: k / n for c, (k, n) in self.per_class.items()}

    def to_dict(self, per_class: bool = True) -> dict:
        """JSON-ready dict (``catalog eval --json``): the attributes, ``top1`` and
        ``per_class_average`` rounded to 6 digits, ``seconds`` to 2; ``per_class`` as
        ``{class: {"correct", "total"}}`` unless ``per_class`` is False."""
        d = {
            "dataset": self.dataset, "split": self.split, "classes": self.classes, "queries": self.queries,
            "augmentations": self.augmentations, "seed": self.seed, "top1": round(self.top1, 6),
            "per_class_average": round(self.per_class_average, 6), "encoder": self.encoder,
            "seconds": round(self.seconds, 2), "hubness_k": self.hubness_k,
        }
        if per_class:
            d["per_class"] = {c: {"correct": k, "total": n} for c, (k, n) in self.per_class.items()}
        return d


def top1_scores(predicted: Sequence[str], truth: Sequence[str]) -> tuple[float, float, dict[str, tuple[int, int]]]:
    """Top-1 accuracy, per-class average accuracy and per-class (correct, total) counts.

    Args:
        predicted: M predicted class ids; ``truth``: M true class ids (M >= 1).

    Raises:
        ValueError: empty or different lengths.
    """
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need equally many predictions and labels (>= 1), got {len(predicted)} and {len(truth)}")
    per_class: dict[str, list[int]] = {}
    for p, t in zip(predicted, truth):
        c = per_class.setdefault(t, [0, 0])
        c[0] += int(p == t)
        c[1] += 1
    top1 = sum(c[0] for c in per_class.values()) / len(truth)
    avg = float(np.mean([k / n for k, n in per_class.values()]))
    return top1, avg, {c: (k, n) for c, (k, n) in per_class.items()}


def build_gallery(
    references: dict[str, object], encoder: Encoder, k: int = DEFAULT_AUGMENTATIONS, seed: int = 0, *, progress: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Embed K augmented views of each class's single reference image.

    Args:
        references: class id -> reference image (path or anything :func:`load_image` reads).
        encoder: the encoder.
        k: views per reference (>= 1; view 0 is the reference itself).
        seed: augmentation seed (the catalog's default is 0).
        progress: tqdm progress bar over classes.

    Returns:
        ``(vectors, labels)``: float32 (C * K, D) unit vectors and their C * K class ids.

    Raises:
        InvalidImageError: a reference image cannot be decoded.
        ValueError: ``k < 1`` or no references.
    """
    if not references:
        raise ValueError("a gallery needs at least one reference image")
    items = list(references.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="gallery", unit="class")
    vectors, labels = [], []
    for c, ref in items:
        v = embed_reference(encoder, ref, k, seed)
        vectors.append(v)
        labels += [c] * len(v)
    return np.concatenate(vectors), labels


def score_zero_shot(
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    queries: np.ndarray,
    truth: Sequence[str],
    *,
    dataset: str = "",
    split: str = "",
    augmentations: int = DEFAULT_AUGMENTATIONS,
    seed: int = 0,
    encoder: str = "",
    hubness: HubnessReference | None = None,
) -> ZeroShotResult:
    """Classify each query as the class of its nearest gallery vector (1-NN through the
    product's FAISS index and SKU matcher, :func:`retailklip.calibration.nearest_skus`) and score it.

    Args:
        gallery: float32 (G, D) unit vectors (:func:`build_gallery`); ``gallery_labels``: their G class ids.
        queries: float32 (M, D) unit vectors; ``truth``: their M true class ids.
        dataset, split, augmentations, seed, encoder: recorded in the result as given.
        hubness: rank by CSLS against these unlabeled photos, as a catalog that has them does
            (:mod:`retailklip.hubness`); None: plain 1-NN.

    Returns:
        A :class:`ZeroShotResult` (``seconds`` 0; ``classes``: distinct gallery labels).

    Raises:
        ValueError: an empty gallery or query set, shapes that disagree (D, or one label per row).
    """
    g, q = np.asarray(gallery, np.float32), np.asarray(queries, np.float32)
    if g.ndim != 2 or q.ndim != 2 or g.shape[1] != q.shape[1] or len(g) == 0 or len(q) == 0:
        raise ValueError(f"1-NN evaluation needs non-empty (G, D) and (M, D) arrays, got {g.shape} and {q.shape}")
    if len(gallery_labels) != len(g) or len(truth) != len(q):
        raise ValueError("1-NN evaluation needs one label per gallery vector and per query")
    predicted, _ = nearest_skus(g, list(gallery_labels), q, hubness)
    top1, avg, per_class = top1_scores(predicted, list(truth))
    return ZeroShotResult(
        dataset=dataset, split=split, classes=len(set(gallery_labels)), queries=len(q), augmentations=augmentations,
        seed=seed, top1=top1, per_class_average=avg, per_class=per_class, encoder=encoder,
        hubness_k=0 if hubness is None else hubness.k,
    )


def evaluate_zero_shot(
    dataset: ZeroShotDataset,
    encoder: Encoder,
    *,
    k: int = DEFAULT_AUGMENTATIONS,
    seed: int = 0,
    progress: bool = False,
    hubness: HubnessReference | None = None,
) -> ZeroShotResult:
    """Run the RetailKLIP zero-shot protocol (module docstring) on a dataset.

    Args:
        dataset: references and labelled queries (:func:`retailklip.datasets.load_dataset`).
        encoder: image encoder.
        k: augmented views per reference, >= 1.
        seed: augmentation seed.
        progress: tqdm progress bars (gallery, queries).
        hubness: a catalog's hubness reference (:func:`score_zero_shot`), or None.

    Raises:
        ValueError: ``k < 1`` or a dataset without queries.
        InvalidImageError: an image cannot be decoded (the message names it).
    """
    if not dataset.queries:
        raise ValueError(f"{dataset.name} {dataset.split}: no query images")
    start = time.perf_counter()
    gallery, labels = build_gallery(dataset.references, encoder, k, seed, progress=progress)
    queries = encoder.embed([q.path for q in dataset.queries], progress=progress)
    result = score_zero_shot(
        gallery, labels, queries, [q.label for q in dataset.queries], dataset=dataset.name, split=dataset.split,
        augmentations=k, seed=seed, encoder=encoder.identity.key, hubness=hubness,
    )
    result = replace(result, seconds=time.perf_counter() - start)
    logger.info("%s %s: top-1 %.4f, per-class average %.4f", dataset.name, dataset.split, result.top1, result.per_class_average)
    return result
