"""Zero-shot evaluation of the weights being trained on held-out classes (RetailKLIP §4.2), as a catalog does it.

The protocol, the gallery and the result are the library's (:mod:`retailklip.evaluation`): each
held-out class's reference image becomes K gallery vectors through
:func:`retailklip.evaluation.build_gallery` (that is :func:`retailklip.references.embed_reference`,
the function ``catalog add`` embeds with: the image and K-1 augmented views, default
K = :data:`retailklip.augment.DEFAULT_AUGMENTATIONS`, same seed), every query is labelled with the
class of its nearest gallery vector, and :func:`retailklip.evaluation.score_zero_shot` reports top-1
and the per-class average in a :class:`~retailklip.evaluation.ZeroShotResult`.  So the held-out
numbers are exactly what a catalog built with the finetuned weights would give on these photos.

This module adds what repeated evaluation during training needs: the queries' preprocessed
tensors are cached (they do not change between epochs; the gallery views are re-embedded each
time, through ``embed_reference``), the module is put in eval mode for the duration, and
:func:`result_record` is the one place that maps a result onto the finetune's on-disk keys.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from retailklip.augment import DEFAULT_AUGMENTATIONS
from retailklip.encoders import Encoder
from retailklip.evaluation import ZeroShotResult, build_gallery, score_zero_shot

from .data import EvalSplit, Sample
from .errors import FinetuneError

logger = logging.getLogger(__name__)


def result_record(res: ZeroShotResult) -> dict:
    """The finetune's on-disk form of a result (history rows, ``checkpoint/state.pt``,
    ``metrics.json``), whose keys predate the shared result type and stay as they are:
    ``top1``, ``per_class_top1`` (= ``per_class_average``), ``num_queries``, ``num_classes``,
    ``per_class`` (class -> top-1 in [0, 1])."""
    return {"top1": res.top1, "per_class_top1": res.per_class_average, "num_queries": res.queries,
            "num_classes": res.classes, "per_class": res.per_class_accuracy}


class ZeroShotEvaluator:
    """Embeds a held-out :class:`~finetune.data.EvalSplit` with the current encoder weights.

    The queries' preprocessed tensors are computed once and kept in memory when they fit in
    ``cache_mb``; only the forward passes are repeated per evaluation.

    Args:
        split: references (one per class) and queries.
        encoder: the encoder whose ``.model`` is being trained.
        augmentations: K views per reference (the catalog's augmentation).
        seed: augmentation seed (the catalog's default is 0).
        cache_mb: memory budget for cached query tensors, in MiB.
        progress: show tqdm progress bars.

    Raises:
        FinetuneError: ``augmentations < 1``.
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
        self.references = {s.label: s.path for s in split.references}
        self.queries: list[Sample] = split.queries
        h, w = _input_hw(encoder)
        self.cached = len(self.queries) * 3 * h * w * 4 / 2**20 <= cache_mb
        self._query_tensors: list[torch.Tensor] | None = None

    def _query_batches(self):
        if self._query_tensors is None:
            tensors = (self.encoder.prepare(s.path) for s in self.queries)
            if not self.cached:
                yield from _batched(tensors, self.encoder.batch_size)
                return
            self._query_tensors = list(tensors)
        yield from _batched(iter(self._query_tensors), self.encoder.batch_size)

    def _embed_queries(self) -> np.ndarray:
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.queries), desc="eval queries", unit="img", leave=False)
        out = []
        for batch in self._query_batches():
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
            A :class:`~retailklip.evaluation.ZeroShotResult` (dataset ``"held-out"``, split
            ``"eval"``; no encoder key: the weights being trained have no identity yet).

        Raises:
            retailklip.errors.InvalidImageError: an image that decoded before no longer does.
        """
        model = self.encoder.model
        was_training = model.training
        model.eval()
        try:
            gallery, labels = build_gallery(self.references, self.encoder, self.k, self.seed, progress=self.progress)
            queries = self._embed_queries()
        finally:
            model.train(was_training)
        return score_zero_shot(gallery, labels, queries, [q.label for q in self.queries], dataset="held-out",
                               split="eval", augmentations=self.k, seed=self.seed)


def _batched(tensors, size: int):
    batch = []
    for t in tensors:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _input_hw(encoder: Encoder) -> tuple[int, int]:
    from .model import input_config

    try:
        return input_config(encoder)["size"]
    except (KeyError, ValueError, TypeError):  # unknown preprocessing description: assume 224 px
        return (224, 224)
