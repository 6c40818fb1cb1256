"""Training and evaluation data: labelled images from a CSV or a folder per class.

Two layouts are read (RetailKLIP §4.1: a labelled product dataset, usually long-tailed):

* a CSV with a header and columns ``image,label[,role]``; ``image`` paths are relative to the
  CSV's folder (absolute paths are used as they are); ``label`` is any non-empty string;
* a folder with one sub-folder per class (``ROOT/<label>/<image>``, not recursive).

For zero-shot evaluation (RetailKLIP §4.2) the classes are held out from training.  Each class
has one ``reference`` image (the packshot that goes into the gallery with its augmentations)
and any number of ``query`` images.  With a ``role`` column every row must say ``reference``
or ``query``; without it (or in a folder) the first image of each label, in file order
(folders: sorted by name), is its reference.

Bad images never stop a run: :func:`check_images` decodes every image once, in threads, with
the same safe decoder as the catalog (:func:`retailklip.images.load_image`); the bad ones are
reported (first few by name, all in ``skipped_images.csv``) and dropped, with a count.  Should a
file go bad later, :class:`ImageDataset` skips it at load time as well.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retailklip.datasets import DatasetError, read_csv_rows
from retailklip.errors import InvalidImageError
from retailklip.images import DEFAULT_BACKGROUND, IMAGE_SUFFIXES, load_image, to_rgb

from .errors import FinetuneError

logger = logging.getLogger(__name__)

#: File name endings read from a folder-per-class dataset (lower case).
ROLES = ("reference", "query")


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: image file.
        label: class name (non-empty string).
        role: ``"reference"``, ``"query"`` or None (not given).
    """

    path: Path
    label: str
    role: str | None = None


def read_samples(source: str | os.PathLike) -> list[Sample]:
    """Read labelled images from a CSV file or a folder with one sub-folder per class.

    Args:
        source: a ``.csv`` file (columns ``image,label[,role]``) or a directory.

    Returns:
        The samples in file order (folders: labels and files sorted by name).

    Raises:
        FinetuneError: the source does not exist, the CSV is malformed (missing columns, empty
            label, unknown role) or holds no rows, or the folder holds no images.
    """
    p = Path(source).expanduser()
    if not p.exists():
        raise FinetuneError(f"{p}: no such file or directory (give a CSV image,label[,role] or a folder per class)")
    return read_folder(p) if p.is_dir() else read_csv(p)


def read_csv(path: str | os.PathLike) -> list[Sample]:
    """Read a CSV with a header ``image,label[,role]`` (other columns are ignored).

    The CSV is read by :func:`retailklip.datasets.read_csv_rows` (the reader of ``catalog
    calibrate``'s photo CSVs too).

    Raises:
        FinetuneError: unreadable file, missing ``image``/``label`` columns, an empty image or
            label cell, a role other than ``reference``/``query``, or no rows.
    """
    p = Path(path)
    try:
        rows = read_csv_rows(p, ("image", "label"), "image,label[,role]")
    except DatasetError as e:
        raise FinetuneError(str(e)) from None
    has_role = any(r.get("role") for _line, r in rows)
    out = []
    for line, row in rows:
        role = None
        if has_role:
            role = row.get("role", "").lower()
            if role not in ROLES:
                raise FinetuneError(f"{p}:{line}: role must be 'reference' or 'query', got {role!r}")
        out.append(Sample(p.parent / row["image"], row["label"], role))
    return out


def read_folder(root: str | os.PathLike) -> list[Sample]:
    """Read ``ROOT/<label>/<image>`` (files with an :data:`IMAGE_SUFFIXES` ending).

    Raises:
        FinetuneError: no image in any sub-folder.
    """
    root = Path(root)
    out = []
    for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        out.extend(Sample(f, d.name) for f in files)
    if not out:
        raise FinetuneError(f"{root}: no images found in ROOT/<label>/<image> sub-folders (the dataset is empty)")
    return out


def check_images(samples: Sequence[Sample], workers: int = 4) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Decode every image once with :func:`~retailklip.images.load_image` and drop the bad ones.

    Args:
        samples: samples to check.
        workers: decoding threads (PIL releases the GIL while decoding).

    Returns:
        ``(good, bad)``: the decodable samples in their order, and ``(path, reason)`` for each
        missing, empty, corrupt or over-limit image.
    """

    def ok(s: Sample) -> str | None:
        try:
            load_image(s.path)
            return None
        except InvalidImageError as e:
            return str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(ok, samples))
    good = [s for s, r in zip(samples, reasons) if r is None]
    bad = [(s.path, r) for s, r in zip(samples, reasons) if r is not None]
    for path, reason in bad[:5]:
        logger.warning("skipping image: %s", reason)
    if len(bad) > 5:
        logger.warning("... and %d more bad images (see skipped_images.csv)", len(bad) - 5)
    return good, bad


@dataclass
class LabeledData:
    """Training samples with integer targets.

    Attributes:
        samples: the samples.
        classes: sorted class names; target ``i`` is ``classes[i]``.
        targets: int64 array (N,) of class indices.
    """

    samples: list[Sample]
    classes: list[str]
    targets: np.ndarray

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], what: str = "training data") -> LabeledData:
        """Index the labels of ``samples``.

        Raises:
            FinetuneError: no sample, or a single class (ArcFace needs at least two classes).
        """
        if not samples:
            raise FinetuneError(f"{what}: no usable image (the dataset is empty or every image is bad)")
        classes = sorted({s.label for s in samples})
        if len(classes) < 2:
            raise FinetuneError(f"{what}: only one class ({classes[0]!r}); metric learning needs at least two classes")
        index = {c: i for i, c in enumerate(classes)}
        return cls(list(samples), classes, np.array([index[s.label] for s in samples], dtype=np.int64))

    def class_counts(self) -> np.ndarray:
        """Images per class, int64 (C,)."""
        return np.bincount(self.targets, minlength=len(self.classes))


@dataclass
class EvalSplit:
    """Held-out classes for zero-shot evaluation.

    Attributes:
        references: one sample per class, in sorted label order: the gallery images.
        queries: the samples to recognise; their labels are all among the references'.
    """

    references: list[Sample]
    queries: list[Sample]

    @property
    def classes(self) -> list[str]:
        return [s.label for s in self.references]

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], what: str = "evaluation data") -> EvalSplit:
        """Split samples into one reference per label and queries (see module docstring).

        Classes whose reference is missing (e.g. a bad image) are dropped with their queries,
        with a warning.

        Raises:
            FinetuneError: a label with two references, fewer than two classes, or no query.
        """
        refs: dict[str, Sample] = {}
        queries: list[Sample] = []
        explicit = any(s.role is not None for s in samples)
        for s in samples:
            first = s.label not in refs
            if (s.role == "reference") if explicit else first:
                if not first:
                    raise FinetuneError(f"{what}: label {s.label!r} has more than one reference image ({refs[s.label].path}, {s.path})")
                refs[s.label] = s
            else:
                queries.append(s)
        orphans = sorted({q.label for q in queries} - set(refs))
        if orphans:
            logger.warning("%s: %d label(s) have queries but no (usable) reference and are left out, e.g. %r",
                           what, len(orphans), orphans[0])
            queries = [q for q in queries if q.label in refs]
        if len(refs) < 2:
            raise FinetuneError(f"{what}: {len(refs)} class(es) with a reference image; zero-shot evaluation needs at least two")
        if not queries:
            raise FinetuneError(f"{what}: no query image (give more than one image per label, or role=query rows)")
        return cls([refs[k] for k in sorted(refs)], queries)


def check_disjoint(train_classes: Sequence[str], eval_classes: Sequence[str]) -> None:
    """Zero-shot evaluation needs classes that were never trained on.

    Raises:
        FinetuneError: a label occurs in both sets (names the first few).
    """
    both = sorted(set(train_classes) & set(eval_classes))
    if both:
        raise FinetuneError(
            f"{len(both)} evaluation class(es) are also training classes (e.g. {', '.join(map(repr, both[:3]))}); "
            f"zero-shot evaluation needs held-out classes"
        )


class ImageDataset(torch.utils.data.Dataset):
    """Labelled images -> ``(tensor (3, H, W) float32, target int)``, or None for a bad image.

    Images are decoded with :func:`~retailklip.images.load_image` and transparent pixels
    composited onto ``background`` (as the catalog's encoder does), then ``transform`` (a
    random training transform) is applied.  Use :func:`collate_skipping_bad` with it.

    Args:
        samples: the samples.
        targets: int64 (N,) class indices.
        transform: PIL ``RGB`` image -> float tensor (3, H, W).
        background: RGB colour for transparent pixels.
        reference_transform: optional PIL ``RGB`` -> ``RGB`` applied first to samples of role
            ``reference`` (e.g. :class:`finetune.backgrounds.BackgroundPaster`).
    """

    def __init__(self, samples: Sequence[Sample], targets: np.ndarray, transform: Callable,
                 background: tuple[int, int, int] = DEFAULT_BACKGROUND,
                 reference_transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        self.background = tuple(background)
        self.reference_transform = reference_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            im = load_image(self.samples[i].path)
        except InvalidImageError as e:
            logger.warning("skipping image at load time: %s", e)
            return None
        rgb = to_rgb(im, self.background)
        if self.reference_transform is not None and self.samples[i].role == "reference":
            try:
                rgb = self.reference_transform(rgb)
            except InvalidImageError as e:  # an unreadable background photo: this draw keeps its own
                logger.warning("reference transform skipped: %s", e)
        return self.transform(rgb), int(self.targets[i])


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate ``(tensor, target)`` pairs, dropping None (bad images).

    Returns:
        ``(images (B, 3, H, W) float32, targets (B,) int64, skipped)``; B may be 0.
    """
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64), skipped
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good], dtype=torch.int64), skipped


def write_skipped(path: str | os.PathLike, bad: Sequence[tuple[Path, str, str]]) -> None:
    """Write ``set,image,reason`` rows for skipped images to a CSV file."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["set", "image", "reason"])
        for which, p, reason in bad:
            w.writerow([which, str(p), reason])


@dataclass
class PreparedData:
    """Checked training and evaluation data (reusable across the runs of a depth sweep).

    Attributes:
        train: training samples with targets.
        eval: held-out references and queries.
        skipped: ``(set, path, reason)`` of every bad image dropped.
    """

    train: LabeledData
    eval: EvalSplit
    skipped: list[tuple[str, Path, str]] = field(default_factory=list)
    outliers: list[Sample] = field(default_factory=list)

    def outlier_targets(self) -> np.ndarray:
        """int64 (len(outliers),) negative targets of the outlier images, one per outlier label
        (-1, -2, ... in sorted label order): the loss reads any negative target as "no class"
        (:class:`finetune.loss.OutlierExposureLoss`), the class-balanced sampler balances the
        outlier labels like classes."""
        labels = sorted({s.label for s in self.outliers})
        index = {c: -1 - i for i, c in enumerate(labels)}
        return np.array([index[s.label] for s in self.outliers], dtype=np.int64)


def with_reference_copies(samples: Sequence[Sample], copies: int) -> list[Sample]:
    """``samples`` followed by ``copies - 1`` more rounds of its ``role == "reference"`` samples.

    The class-balanced sampler draws ``depth`` distinct *items* per class and epoch, so a reference
    image (a product's packshot) that is one item among its class's ~30 in-store photos is seen about
    once per training run; with ``copies`` items it is drawn (each time freshly augmented) about
    ``copies`` times as often.  On GroceryStore (benchmarks/bench_loop_recipe.py, docs/finetune.md
    "Fourth round: reference oversampling"), held-out-class 1-NN top-1 against packshots, 1 -> 12
    copies: 0.530 -> 0.580 in 2 class-disjoint folds of the loop's training classes, 0.609 -> 0.647
    in 3 folds of all 81 classes (McNemar p = 0.025, 0.010); 48 copies won the first (0.607) and
    lost the second (0.588), so examples/retailklip_loop.py trains with 12.

    Args:
        samples: training samples in file order.
        copies: >= 1; 1 returns the samples unchanged (as a new list).

    Raises:
        FinetuneError: ``copies`` < 1, or ``copies`` > 1 and no sample has role ``reference``.
    """
    if copies < 1:
        raise FinetuneError(f"--reference-copies must be >= 1, got {copies}")
    references = [s for s in samples if s.role == "reference"]
    if copies > 1 and not references:
        raise FinetuneError("--reference-copies needs training rows with role 'reference' (CSV column role), found none")
    return list(samples) + references * (copies - 1)


def prepare_data(data: str, eval_data: str, workers: int = 4, reference_copies: int = 1,
                 outlier_data: str | None = None) -> PreparedData:
    """Read both datasets, drop bad images (reported with a count) and check them.

    ``reference_copies`` > 1 repeats the training rows of role ``reference``
    (:func:`with_reference_copies`), after the bad images are dropped.  ``outlier_data`` (CSV
    ``image,label`` or folder per label, read like the training data) holds images of products
    that are neither training nor evaluation classes, for Outlier Exposure
    (:class:`finetune.loss.OutlierExposureLoss`); their labels only group them for balancing.

    Raises:
        FinetuneError: empty or single-class training data, an unusable evaluation set,
            evaluation classes that are also training classes, ``reference_copies`` > 1
            without a training row of role ``reference``, or outlier data that is empty or
            shares a label with the training or evaluation classes.
    """
    t0 = time.perf_counter()
    train_samples, eval_samples = read_samples(data), read_samples(eval_data)
    train_good, train_bad = check_images(train_samples, workers)
    n_references = sum(s.role == "reference" for s in train_good)
    train_good = with_reference_copies(train_good, reference_copies)
    eval_good, eval_bad = check_images(eval_samples, workers)
    train = LabeledData.from_samples(train_good, f"training data {data}")
    split = EvalSplit.from_samples(eval_good, f"evaluation data {eval_data}")
    check_disjoint(train.classes, split.classes)
    outliers, outlier_bad = [], []
    if outlier_data is not None:
        outliers, outlier_bad = check_images(read_samples(outlier_data), workers)
        if not outliers:
            raise FinetuneError(f"outlier data {outlier_data}: no usable image")
        both = sorted({s.label for s in outliers} & (set(train.classes) | set(split.classes)))
        if both:
            raise FinetuneError(f"outlier data {outlier_data}: {len(both)} label(s) are training or evaluation classes "
                                f"(e.g. {', '.join(map(repr, both[:3]))}); outliers must be other products")
    skipped = ([("train", p, r) for p, r in train_bad] + [("eval", p, r) for p, r in eval_bad]
               + [("outlier", p, r) for p, r in outlier_bad])
    logger.info("data: %d training images in %d classes (%d reference image(s) x %d), %d held-out classes with %d "
                "queries; %d bad image(s) skipped (%d train, %d eval) [%.1fs]", len(train.samples), len(train.classes),
                n_references, reference_copies, len(split.references), len(split.queries), len(skipped),
                len(train_bad), len(eval_bad), time.perf_counter() - t0)
    if outliers:
        logger.info("outlier exposure: %d outlier image(s) of %d label(s)", len(outliers), len({s.label for s in outliers}))
    return PreparedData(train, split, skipped, outliers)
