"""Class balancing by breadth and depth (RetailKLIP §4.1.3).

Retail datasets are long-tailed: a few products have hundreds of photos, most a handful.  An
epoch here covers the whole **breadth** (every class) at a fixed **depth** d (images per class
per epoch): a class with at least d images contributes d distinct images, drawn afresh each
epoch (undersampling); a class with fewer images contributes each of its images
``d // n`` or ``d // n + 1`` times (oversampling; the random training transform makes the
repeats different views).  So every class weighs the same in the loss, whatever its size.

Why not pytorch-metric-learning's ``MPerClassSampler``: it draws classes at random for each
batch (m images per class), so a class's count per epoch varies and small classes are not
guaranteed their d images; §4.1.3 asks for exactly d per class per epoch.  ArcFace is a
proxy-based loss and needs no same-class pairs in a batch, so batches are a plain shuffle of
the epoch's C·d indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .errors import FinetuneError


class ClassBalancedSampler(torch.utils.data.Sampler[int]):
    """Yields ``num_classes * depth`` dataset indices per epoch, exactly ``depth`` per class.

    Deterministic: the order depends only on ``(seed, epoch)`` (call :meth:`set_epoch` before
    each epoch), so a run resumed at an epoch boundary sees the same data as an uninterrupted one.

    Args:
        targets: int class index of each dataset item, shape (N,); classes are the distinct
            values (need not be contiguous).
        depth: d, images per class per epoch, >= 1.
        seed: RNG seed.

    Raises:
        FinetuneError: ``depth < 1`` or no targets.
    """

    def __init__(self, targets: Sequence[int] | np.ndarray, depth: int, seed: int = 0) -> None:
        if depth < 1:
            raise FinetuneError(f"depth (images per class per epoch) must be >= 1, got {depth}")
        t = np.asarray(targets, dtype=np.int64)
        if t.size == 0:
            raise FinetuneError("class-balanced sampler: no samples")
        self.depth = int(depth)
        self.seed = int(seed)
        self.epoch = 0
        self.classes = np.unique(t)
        self._members = [np.flatnonzero(t == c) for c in self.classes]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.classes) * self.depth

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's indices, int64 (C·d,), shuffled across classes."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        chosen = []
        for members in self._members:
            n = len(members)
            if n >= self.depth:
                chosen.append(rng.choice(members, self.depth, replace=False))
            else:
                q, r = divmod(self.depth, n)
                chosen.append(np.concatenate([np.tile(members, q), rng.choice(members, r, replace=False)]))
        out = np.concatenate(chosen)
        return out[rng.permutation(len(out))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def summary(self) -> str:
        """One line: classes, depth, how many classes are over- and undersampled."""
        sizes = np.array([len(m) for m in self._members])
        return (
            f"class balancing: breadth {len(sizes)} classes x depth {self.depth} = {len(self)} images/epoch; "
            f"{int((sizes < self.depth).sum())} classes oversampled, {int((sizes > self.depth).sum())} undersampled "
            f"(class sizes {int(sizes.min())}..{int(sizes.max())}, median {int(np.median(sizes))})"
        )
