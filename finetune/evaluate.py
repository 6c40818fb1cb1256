"""Zero-shot evaluation on held-out classes, the RetailKLIP protocol (§4.2), as the catalog does it.

For each held-out class one reference image (a packshot) becomes K gallery vectors: the image
and K-1 augmented views from :func:`retailklip.augment.augment_reference` (the catalog's own
augmentation, default K = :data:`retailklip.augment.DEFAULT_AUGMENTATIONS`, same seed).  Every
query image is embedded and labelled with the class of its nearest gallery vector (cosine,
1-NN).  Reported: top-1 accuracy over queries and the average of per-class accuracies (the
RetailKLIP metric; robust to classes with many photos).

Images go through the encoder's own path (``Encoder.prepare``: safe decoding, transparency
composited onto the background, evaluation preprocessing) and its forward (``embed_tensor``),
so the numbers are what a catalog built with the finetuned weights would give on these photos.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from retailklip.augment import DEFAULT_AUGMENTATIONS, augment_reference
from retailklip.encoders import Encoder
from retailklip.images import load_image

from .data import EvalSplit, Sample
from .errors import FinetuneError

logger = logging.getLogger(__name__)


@dataclass
class ZeroShotResult:
    """Result of one zero-shot evaluation.

    Attributes:
        top1: fraction of queries whose nearest gallery vector has their class, in [0, 1].
        per_class_top1: mean over classes (with at least one query) of their top-1, in [0, 1].
        num_queries: queries evaluated.
        num_classes: gallery classes (distractors included).
        per_class: class name -> top-1 of its queries.
    """

    top1: float
    per_class_top1: float
    num_queries: int
    num_classes: int
    per_class: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def one_nn_accuracy(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                    class_names: list[str] | None = None) -> ZeroShotResult:
    """1-NN top-1 of queries against a labelled gallery (cosine similarity of unit vectors).

    Args:
        gallery: float32 (G, D), rows of unit L2 norm.
        gallery_labels: int (G,) class index of each gallery vector.
        queries: float32 (Q, D), unit rows.
        query_labels: int (Q,) true class index of each query.
        class_names: names of the class indices, for ``per_class`` (default: the indices).

    Returns:
        A :class:`ZeroShotResult`.

    Raises:
        FinetuneError: empty gallery or queries, or mismatched shapes.
    """
    g, q = np.asarray(gallery, np.float32), np.asarray(queries, np.float32)
    gl, ql = np.asarray(gallery_labels), np.asarray(query_labels)
    if g.ndim != 2 or q.ndim != 2 or g.shape[1] != q.shape[1] or len(g) == 0 or len(q) == 0:
        raise FinetuneError(f"1-NN evaluation needs non-empty (G, D) and (Q, D) arrays, got {g.shape}, {q.shape}")
    if gl.shape != (len(g),) or ql.shape != (len(q),):
        raise FinetuneError("1-NN evaluation: one label per gallery vector and per query is needed")
    pred = gl[np.argmax(q @ g.T, axis=1)]
    correct = pred == ql
    names = class_names or [str(c) for c in range(int(max(gl.max(), ql.max())) + 1)]
    per_class = {names[c]: float(correct[ql == c].mean()) for c in np.unique(ql)}
    return ZeroShotResult(float(correct.mean()), float(np.mean(list(per_class.values()))), len(q),
                          len(np.unique(gl)), per_class)


class ZeroShotEvaluator:
    """Embeds a held-out :class:`~finetune.data.EvalSplit` with the current encoder weights.

    The preprocessed tensors (reference views and queries) are computed once and kept in
    memory when they fit in ``cache_mb``; only the forward passes are repeated per evaluation.

    Args:
        split: references (one per class) and queries.
        encoder: the encoder whose ``.model`` is being trained.
        augmentations: K views per reference (the catalog's augmentation).
        seed: augmentation seed (the catalog's default is 0).
        cache_mb: memory budget for cached tensors, in MiB.
        progress: show tqdm progress bars.

    Raises:
        FinetuneError: ``augmentations < 1``, or fewer than two classes / no query left after
            dropping bad images.
    """

    def __init__(self, split: EvalSplit, encoder: Encoder, *, augmentations: int = DEFAULT_AUGMENTATIONS, seed: int = 0,
                 cache_mb: float = 4096, progress: bool = True) -> None:
        if augmentations < 1:
            raise FinetuneError(f"--augmentations (K views per reference) must be >= 1, got {augmentations}")
        self.encoder = encoder
        self.k = int(augmentations)
        self.seed = int(seed)
        self.progress = progress
        self.classes = split.classes
        index = {c: i for i, c in enumerate(self.classes)}
        self.queries: list[Sample] = split.queries
        self.query_labels = np.array([index[s.label] for s in self.queries], dtype=np.int64)
        self.gallery_labels = np.repeat(np.arange(len(self.classes)), self.k)
        self._references = split.references
        h, w = _input_hw(encoder)
        n = len(self.gallery_labels) + len(self.queries)
        self.cached = n * 3 * h * w * 4 / 2**20 <= cache_mb
        self._gallery_tensors: list[torch.Tensor] | None = None
        self._query_tensors: list[torch.Tensor] | None = None

    def _gallery_views(self):
        for s in self._references:
            im = load_image(s.path)  # checked before; a failure here is a new problem worth raising
            yield from augment_reference(im, self.k, self.seed)

    def _tensors(self, which: str):
        if which == "gallery":
            if self._gallery_tensors is not None:
                return self._gallery_tensors
            out = (self.encoder.prepare(v) for v in self._gallery_views())
        else:
            if self._query_tensors is not None:
                return self._query_tensors
            out = (self.encoder.prepare(s.path) for s in self.queries)
        if self.cached:
            out = list(out)
            setattr(self, f"_{which}_tensors", out)
        return out

    def _embed(self, tensors, total: int, desc: str) -> np.ndarray:
        bs = self.encoder.batch_size
        out, batch = [], []
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="img", leave=False)
        for t in tensors:
            batch.append(t)
            if len(batch) == bs:
                out.append(self.encoder.embed_tensor(torch.stack(batch)).numpy())
                batch = []
                if bar is not None:
                    bar.update(bs)
        if batch:
            out.append(self.encoder.embed_tensor(torch.stack(batch)).numpy())
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return np.concatenate(out).astype(np.float32, copy=False)

    @torch.no_grad()
    def __call__(self) -> ZeroShotResult:
        """Evaluate the encoder's current weights (the module is put in eval mode for the
        duration and its previous mode restored).

        Returns:
            A :class:`ZeroShotResult`.

        Raises:
            retailklip.errors.InvalidImageError: an image that decoded before no longer does.
        """
        model = self.encoder.model
        was_training = model.training
        model.eval()
        try:
            g = self._embed(self._tensors("gallery"), len(self.gallery_labels), "eval gallery")
            q = self._embed(self._tensors("query"), len(self.queries), "eval queries")
        finally:
            model.train(was_training)
        return one_nn_accuracy(g, self.gallery_labels, q, self.query_labels, self.classes)


def _input_hw(encoder: Encoder) -> tuple[int, int]:
    from .model import input_config

    try:
        return input_config(encoder)["size"]
    except (KeyError, ValueError, TypeError):  # unknown preprocessing description: assume 224 px
        return (224, 224)

