"""Choosing the open-set threshold from labelled photos, and the metrics that judge it.

A photo is *known* when its true SKU is in the catalog, *unknown* otherwise.  With threshold
``t`` a photo is *accepted* (named as an SKU) when its open-set score is ``<= t``, else
rejected ("unknown").  The score (:mod:`retailklip.open_set`) is the 1-NN cosine distance
(``"distance"``, the default here), Lowe's ratio of the nearest to the runner-up SKU's distance
(``"ratio"``) or the ratio of the nearest distance to the distance to the nearest *outlier
reference*, a product not in the catalog (``"outlier-ratio"``).  ``catalog calibrate`` defaults
to ``outlier-ratio`` when the catalog holds outlier references (its AUROC beat the distance by
+0.247 [0.196, 0.296] and the ratio by +0.273 [0.209, 0.340] under class-disjoint CV,
docs/threshold.md), else to ``ratio`` (:func:`default_score`).  The selection below is the same
for every score, "distance" standing for the score.  Metrics (:func:`open_set_metrics`; all fractions in [0, 1]):

* **known accuracy**: known photos accepted *and* named correctly / known photos;
* **closed-set top-1**: known photos whose nearest SKU is right, whatever the threshold;
* **known precision**: accepted photos named correctly / accepted photos (unknown photos that
  are accepted are always wrong): how often a named SKU is right;
* **unknown rejection**: unknown photos rejected / unknown photos;
* **AUROC**: how well the score (minus distance; the softmax head's confidence) ranks known
  photos above unknown ones (0.5 = chance, 1 = perfectly separable); threshold-free.

Two ways to choose ``t`` (:func:`threshold_for_precision`, :func:`threshold_for_unknown_rejection`):
a target known precision, or the unknown-rejection rate the old softmax head (confidence cutoff
0.78, :mod:`retailklip.baseline`) has on the same photos.  Either picks a set of accepted photos;
the threshold is placed midway between the largest accepted distance and the next observed one,
so it accepts exactly those photos and sits in the middle of the gap.

:func:`calibrate_catalog` runs the whole procedure on a catalog (used by ``catalog calibrate``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .baseline import DEFAULT_L2, DEFAULT_SOFTMAX_CUTOFF, SoftmaxHead
from .datasets import LabelledImage
from .errors import InvalidImageError, RetailKlipError
from .hubness import HubnessReference
from .index import VectorIndex
from .matching import Match, SKUMatcher, score_of
from .open_set import (
    DEFAULT_OPEN_SET_SCORE,
    OUTLIER_SCORE,
    check_score,
    no_outliers_error,
    score_range,
)

logger = logging.getLogger(__name__)


class CalibrationError(RetailKlipError):
    """The labelled photos cannot support the requested calibration (e.g. no unknown photos to
    match a rejection rate, or a precision target no threshold reaches)."""


# ---------------------------------------------------------------------------- metrics
def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores, higher = more positive.

    Equals the probability that a random positive scores above a random negative, ties counting
    one half (the Mann-Whitney U statistic / (n_pos * n_neg)); computed from average ranks.

    Args:
        positive: float (P,) scores of positives (e.g. known photos), P >= 1.
        negative: float (N,) scores of negatives (e.g. unknown photos), N >= 1.

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: an empty side.
    """
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    scores = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: ranks start + (count + 1) / 2.
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    avg_rank = starts + (counts + 1) / 2.0
    rank_sum = avg_rank[inverse[: pos.size]].sum()
    u = rank_sum - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


@dataclass(frozen=True)
class OpenSetMetrics:
    """Open-set metrics of one method at one operating point (see module docstring).

    ``None`` where undefined: no accepted photo (precision), no unknown photo (rejection,
    AUROC), no known photo (AUROC).

    ``known_precision_ci`` is the exact 95 % binomial interval of ``known_precision`` over the
    ``accepted`` photos (Clopper & Pearson, Biometrika 26, 1934; :meth:`scipy.stats.binomtest`
    ``.proportion_ci``): how far the precision of new photos may lie from the one measured here
    from sampling alone.  Photos of one capture session are alike, so it is optimistic for
    calibration photos taken in few sessions; on classes the calibration photos did not show, a
    threshold calibrated for precision 0.9 realised 0.877 [0.806, 0.931] (docs/evaluation.md,
    "Score fusion").
    """

    known_photos: int
    unknown_photos: int
    accepted: int
    known_accuracy: float
    closed_set_top1: float
    known_precision: float | None
    known_rejection: float
    unknown_rejection: float | None
    auroc: float | None
    known_precision_ci: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        def rounded(v):
            if isinstance(v, float):
                return round(v, 6)
            return [rounded(x) for x in v] if isinstance(v, tuple) else v

        return {k: rounded(v) for k, v in asdict(self).items()}


def precision_interval(right: int, accepted: int, level: float = 0.95) -> tuple[float, float] | None:
    """Exact (Clopper-Pearson) interval of a precision ``right / accepted``, fractions in [0, 1];
    None when nothing is accepted.  Raises ValueError for counts that are not 0 <= right <= accepted."""
    from scipy.stats import binomtest

    if not 0 <= right <= accepted:
        raise ValueError(f"precision interval: {right} right of {accepted} accepted")
    if accepted == 0:
        return None
    ci = binomtest(right, accepted).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def open_set_metrics(
    predicted: Sequence[str],
    truth: Sequence[str],
    known: np.ndarray,
    accepted: np.ndarray,
    score: np.ndarray,
) -> OpenSetMetrics:
    """Compute :class:`OpenSetMetrics`.

    Args:
        predicted: M predicted SKU ids (the 1-NN / argmax SKU, before the cutoff).
        truth: M true SKU ids.
        known: bool (M,) true SKU is in the catalog.
        accepted: bool (M,) the method named an SKU (did not say unknown).
        score: float (M,) confidence, higher = more likely known (minus distance for 1-NN).

    Raises:
        CalibrationError: no known photo, or inconsistent lengths.
    """
    known = np.asarray(known, dtype=bool)
    accepted = np.asarray(accepted, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    m = len(truth)
    if not (len(predicted) == m == known.size == accepted.size == score.size):
        raise CalibrationError("predictions, labels, known flags, accepted flags and scores differ in length")
    n_known, n_unknown = int(known.sum()), int((~known).sum())
    if n_known == 0:
        raise CalibrationError("no photo of an SKU in the catalog: nothing to measure")
    correct = known & (np.asarray(predicted, dtype=object) == np.asarray(truth, dtype=object))
    n_acc = int(accepted.sum())
    n_right = int((correct & accepted).sum())  # accepted and named right
    return OpenSetMetrics(
        known_photos=n_known,
        unknown_photos=n_unknown,
        accepted=n_acc,
        known_accuracy=float(n_right / n_known),
        closed_set_top1=float(correct.sum() / n_known),
        known_precision=float(n_right / n_acc) if n_acc else None,
        known_rejection=float((known & ~accepted).sum() / n_known),
        unknown_rejection=float((~known & ~accepted).sum() / n_unknown) if n_unknown else None,
        auroc=auroc(score[known], score[~known]) if n_unknown else None,
        known_precision_ci=precision_interval(n_right, n_acc),
    )


# ---------------------------------------------------------------------------- selection
def _midway(sorted_d: np.ndarray, last_accepted: int) -> float:
    """Threshold accepting sorted_d[: last_accepted + 1]: midway to the next larger value."""
    if last_accepted < 0:
        return float(sorted_d[0]) / 2.0 if sorted_d.size else 0.0
    d = float(sorted_d[last_accepted])
    if last_accepted + 1 >= sorted_d.size:
        return d
    return (d + float(sorted_d[last_accepted + 1])) / 2.0


def threshold_for_precision(distance: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The largest threshold whose known precision on these photos is ``>= target``.

    Args:
        distance: float (M,) open-set scores, lower = more likely known: 1-NN cosine distances in
            [0, 2], or distance ratios in [0, 1] (:mod:`retailklip.open_set`).
        correct: bool (M,) the nearest SKU is the photo's true SKU (False for unknown photos).
        target: precision in (0, 1].

    Returns:
        A score value (a cosine distance in [0, 2] for distances): midway between the largest
        accepted score and the next observed one (the largest when every photo is accepted).

    Raises:
        CalibrationError: ``target`` outside (0, 1], or no threshold reaches it (the message
            gives the best precision reachable).
    """
    if not 0.0 < target <= 1.0:
        raise CalibrationError(f"--target-precision is a fraction in (0, 1], got {target}")
    d = np.asarray(distance, dtype=np.float64)
    order = np.argsort(d, kind="stable")
    d, c = d[order], np.asarray(correct, dtype=bool)[order]
    precision = np.cumsum(c) / np.arange(1, d.size + 1)
    # Only the last photo of a run of equal distances is a possible cut.
    cut = np.ones(d.size, bool)
    cut[:-1] = d[1:] > d[:-1]
    ok = np.flatnonzero(cut & (precision >= target - 1e-12))
    if ok.size == 0:
        best = float(precision[cut].max()) if cut.any() else 0.0
        raise CalibrationError(
            f"no threshold reaches known precision {target:g} on these photos (best: {best:.3f}); "
            "lower --target-precision or improve the catalog"
        )
    return _midway(d, int(ok[-1]))


def threshold_for_unknown_rejection(distance: np.ndarray, known: np.ndarray, rejection: float) -> float:
    """The largest threshold that rejects at least ``rejection`` of the unknown photos.

    Args:
        distance: float (M,) open-set scores (see :func:`threshold_for_precision`).
        known: bool (M,) the photo's true SKU is in the catalog.
        rejection: target unknown-rejection rate in [0, 1].

    Returns:
        A score value (see :func:`threshold_for_precision` for the placement).

    Raises:
        CalibrationError: no unknown photo, or ``rejection`` outside [0, 1].
    """
    if not 0.0 <= rejection <= 1.0:
        raise CalibrationError(f"an unknown-rejection rate is in [0, 1], got {rejection}")
    d = np.asarray(distance, dtype=np.float64)
    known = np.asarray(known, dtype=bool)
    unknown_d = np.sort(d[~known])
    if unknown_d.size == 0:
        raise CalibrationError("no photo of an SKU outside the catalog: cannot match an unknown-rejection rate")
    must_reject = math.ceil(rejection * unknown_d.size - 1e-9)
    all_d = np.sort(d)
    if must_reject == 0:
        return _midway(all_d, all_d.size - 1)
    # Accept only photos strictly closer than the nearest unknown photo that must be rejected.
    first_rejected = unknown_d[unknown_d.size - must_reject]
    last_accepted = int(np.searchsorted(all_d, first_rejected, side="left")) - 1
    return _midway(all_d, last_accepted)


# ---------------------------------------------------------------------------- procedure
@dataclass(frozen=True)
class CalibrationReport:
    """Result of :func:`calibrate`.

    Attributes:
        mode: ``"target-precision"`` or ``"match-softmax"``.
        target: the target precision, or the softmax head's unknown-rejection rate matched.
        threshold: the chosen threshold on ``open_set_score`` (a cosine distance in [0, 2], or
            a distance ratio in [0, 1]).
        nearest_neighbour: 1-NN metrics at ``threshold``.
        softmax: the softmax head's metrics at ``softmax_cutoff`` on the same photos.
        softmax_cutoff: the head's confidence cutoff.
        skus: SKUs in the gallery; ``photos``: labelled photos used.
        head: softmax-head training facts (vectors, iterations, seconds, train accuracy, l2).
        open_set_score: the score the threshold is on (``"distance"``, ``"ratio"`` or
            ``"outlier-ratio"``).
        outlier_vectors: outlier-reference vectors the photos were compared with (0: none).
        hubness_k: the CSLS k the 1-NN was ranked with, as the recognizer ranks it
            (:mod:`retailklip.hubness`; 0: plain 1-NN).
    """

    mode: str
    target: float
    threshold: float
    nearest_neighbour: OpenSetMetrics
    softmax: OpenSetMetrics
    softmax_cutoff: float
    skus: int
    photos: int
    head: dict = field(default_factory=dict)
    open_set_score: str = DEFAULT_OPEN_SET_SCORE
    outlier_vectors: int = 0
    hubness_k: int = 0

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "target": round(self.target, 6),
            "threshold": round(self.threshold, 6),
            "open_set_score": self.open_set_score,
            "outlier_vectors": self.outlier_vectors,
            "hubness_k": self.hubness_k,
            "skus": self.skus,
            "photos": self.photos,
            "nearest_neighbour": self.nearest_neighbour.to_dict(),
            "softmax": dict(self.softmax.to_dict(), cutoff=self.softmax_cutoff, head=self.head),
        }


def _exact_index(vectors: np.ndarray) -> VectorIndex:
    """An exact index of ``vectors`` (float32 (N, D)) with ids 0..N-1, as the recognizer keeps."""
    index = VectorIndex(vectors.shape[1])
    index.add(np.arange(len(vectors), dtype=np.int64), vectors)
    return index


def gallery_matches(
    gallery: np.ndarray, gallery_skus: Sequence[str], queries: np.ndarray, hubness: HubnessReference | None = None,
    outliers: np.ndarray | None = None,
) -> list[Match]:
    """1-NN :class:`~retailklip.matching.Match` (nearest SKU, runner-up; ``known`` False) of each
    query through the product's own index and matcher, as the recognizer ranks them.

    Args:
        gallery: float32 (N, D) unit vectors; ``gallery_skus``: their N SKU ids.
        queries: float32 (M, D) unit vectors.
        hubness: rank by CSLS against these unlabeled photos (:mod:`retailklip.hubness`), as
            the recognizer does for a catalog that has them; None: plain 1-NN.
        outliers: float32 (O, D) outlier-reference vectors: each match's
            :attr:`~retailklip.matching.Match.outlier_distance` is set; None or empty: none.
    """
    ids = list(range(len(gallery_skus)))
    offsets = None if hubness is None else dict(zip(ids, hubness.offsets(gallery).tolist()))
    outlier_index = _exact_index(outliers) if outliers is not None and len(outliers) else None
    matcher = SKUMatcher(_exact_index(gallery), dict(zip(ids, gallery_skus)), outlier_index, offsets)
    return matcher.match(queries, 2.0)


def nearest_matches(
    gallery: np.ndarray, gallery_skus: Sequence[str], queries: np.ndarray, hubness: HubnessReference | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """1-NN SKU and runner-up distance of each query (:func:`gallery_matches`, ``hubness`` as there).

    Returns:
        ``(skus, distances, runner_up)``: M nearest SKU ids, float32 (M,) cosine distances in
        [0, 2] to them, float32 (M,) cosine distances to the nearest other SKU (NaN with a
        one-SKU gallery).
    """
    matches = gallery_matches(gallery, gallery_skus, queries, hubness)
    runner = [m.runner_up.distance if m.runner_up is not None else np.nan for m in matches]
    return ([m.nearest.sku for m in matches], np.array([m.nearest.distance for m in matches], np.float32),
            np.array(runner, np.float32))


def outlier_distances(outliers: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine distance of each query to its nearest outlier reference vector, through the exact
    index the recognizer keeps for them (:meth:`retailklip.matching.SKUMatcher.outlier_distances`).

    Args:
        outliers: float32 (N, D) unit vectors of outlier references (products not in the
            catalog), N >= 1.
        queries: float32 (M, D) unit vectors.

    Returns:
        float32 (M,) cosine distances in [0, 2].

    Raises:
        RetailKlipError: no outlier vector (:func:`retailklip.open_set.no_outliers_error`).
    """
    if len(outliers) == 0:
        raise no_outliers_error()
    index = _exact_index(outliers)
    return SKUMatcher(index, {}, outliers=index).outlier_distances(queries)


def default_score(has_outliers: bool) -> str:
    """``catalog calibrate``'s default open-set score: ``"outlier-ratio"`` for a catalog with
    outlier references, else ``"ratio"`` (docs/threshold.md gives the measurements)."""
    return OUTLIER_SCORE if has_outliers else "ratio"


def nearest_skus(
    gallery: np.ndarray, gallery_skus: Sequence[str], queries: np.ndarray, hubness: HubnessReference | None = None,
) -> tuple[list[str], np.ndarray]:
    """1-NN SKU of each query (:func:`nearest_matches` without the runner-up; ``hubness`` as there).

    Returns:
        ``(skus, distances)``: M nearest SKU ids and float32 (M,) cosine distances in [0, 2].
    """
    skus, distance, _ = nearest_matches(gallery, gallery_skus, queries, hubness)
    return skus, distance


def calibrate(
    gallery: np.ndarray,
    gallery_skus: Sequence[str],
    queries: np.ndarray,
    truth: Sequence[str],
    *,
    target_precision: float | None = None,
    match_softmax_cutoff: float | None = None,
    softmax_cutoff: float = DEFAULT_SOFTMAX_CUTOFF,
    l2: float = DEFAULT_L2,
    score: str = DEFAULT_OPEN_SET_SCORE,
    outliers: np.ndarray | None = None,
    hubness: HubnessReference | None = None,
) -> CalibrationReport:
    """Choose the 1-NN open-set threshold and compare with the softmax-head baseline.

    Exactly one of ``target_precision`` and ``match_softmax_cutoff`` is given.  The softmax head
    is trained on ``gallery`` (the catalog's reference views) and judged on the same ``queries``
    with cutoff ``match_softmax_cutoff`` (when given) or ``softmax_cutoff``.

    Args:
        gallery: float32 (N, D) reference-view embeddings; ``gallery_skus``: their N SKU ids.
        queries: float32 (M, D) photo embeddings; ``truth``: their M true SKU ids (ids not in
            ``gallery_skus`` are unknown photos).
        target_precision: known-precision target in (0, 1].
        match_softmax_cutoff: softmax confidence cutoff in (0, 1) whose unknown-rejection rate
            the threshold must reach.
        softmax_cutoff: the baseline's cutoff in target-precision mode.
        l2: L2 penalty of the softmax head (:meth:`SoftmaxHead.fit`).
        score: the open-set score the threshold is on, ``"distance"``, ``"ratio"`` or
            ``"outlier-ratio"`` (:mod:`retailklip.open_set`).
        outliers: float32 (N, D) vectors of outlier references (products not in the catalog),
            needed by ``"outlier-ratio"``; None or empty: none.
        hubness: the catalog's hubness reference (CSLS ranking, :func:`nearest_matches`) or None.

    Raises:
        CalibrationError: both or neither mode, bad values, no known photo, no unknown photo in
            match-softmax mode, an unreachable precision target, or an infinite outlier-ratio
            threshold (photos identical to an outlier reference would have to be accepted).
        RetailKlipError: unknown score; ``"outlier-ratio"`` without outlier vectors.
    """
    check_score(score)
    has_outliers = outliers is not None and len(outliers) > 0
    if score == OUTLIER_SCORE and not has_outliers:
        raise no_outliers_error()
    if (target_precision is None) == (match_softmax_cutoff is None):
        raise CalibrationError("give exactly one of --target-precision and --match-softmax-cutoff")
    if match_softmax_cutoff is not None:
        if not 0.0 < match_softmax_cutoff < 1.0:
            raise CalibrationError(f"--match-softmax-cutoff is a probability in (0, 1), got {match_softmax_cutoff}")
        softmax_cutoff = match_softmax_cutoff
    if len(truth) != len(queries):
        raise CalibrationError(f"{len(queries)} photo embeddings but {len(truth)} labels")
    catalog_skus = set(gallery_skus)
    known = np.array([t in catalog_skus for t in truth], bool)
    if not known.any():
        raise CalibrationError("none of the photos shows an SKU of the catalog (check the sku column)")
    matches = gallery_matches(gallery, gallery_skus, queries, hubness, outliers if has_outliers else None)
    predicted = [m.nearest.sku for m in matches]
    value = np.array([score_of(m, score) for m in matches])  # as the recognizer scores each match
    correct = known & (np.asarray(predicted, dtype=object) == np.asarray(truth, dtype=object))

    head = SoftmaxHead.fit(gallery, gallery_skus, l2=l2)
    hp = head.predict(queries, softmax_cutoff)
    softmax = open_set_metrics(hp.labels, truth, known, hp.known, hp.confidence)

    if target_precision is not None:
        mode, target = "target-precision", float(target_precision)
        threshold = threshold_for_precision(value, correct, target)
    else:
        if softmax.unknown_rejection is None:
            raise CalibrationError(
                "--match-softmax-cutoff needs photos of SKUs outside the catalog (rows whose sku is not in it)"
            )
        mode, target = "match-softmax", softmax.unknown_rejection
        threshold = threshold_for_unknown_rejection(value, known, target)
    low, high = score_range(score)
    threshold = min(max(threshold, low), high)
    if not math.isfinite(threshold):
        raise CalibrationError(
            "the chosen outlier-ratio threshold is infinite: photos identical to an outlier reference would be "
            "accepted; check that the outlier references are not products of the catalog"
        )
    nn = open_set_metrics(predicted, truth, known, value <= threshold, -value)
    logger.info("calibrated threshold %.4f on %s (%s, target %.4f)", threshold, score, mode, target)
    return CalibrationReport(
        mode=mode, target=target, threshold=threshold, nearest_neighbour=nn, softmax=softmax,
        softmax_cutoff=float(softmax_cutoff), skus=len(catalog_skus), photos=len(truth),
        head={
            "vectors": len(gallery_skus), "l2": l2, "iterations": head.iterations,
            "seconds": round(head.fit_seconds, 3), "train_accuracy": round(head.train_accuracy, 6),
        },
        open_set_score=score,
        outlier_vectors=len(outliers) if has_outliers else 0,
        hubness_k=0 if hubness is None else hubness.k,
    )


def catalog_outliers(catalog) -> np.ndarray:
    """The outlier-reference vectors of a gallery's active encoder (Gallery ``outlier_table`` /
    ``existing_outlier_vectors``): float32 (N, D), N = 0 when it has none."""
    dim = catalog.encoder_identity().dim
    table = getattr(catalog, "outlier_table", None)
    if table is None:
        return np.zeros((0, dim), np.float32)
    ids = table(catalog.snapshot().encoder_id)
    if not len(ids):
        return np.zeros((0, dim), np.float32)
    return catalog.existing_outlier_vectors(ids, dim)[1]


def catalog_gallery(catalog) -> tuple[np.ndarray, list[str]]:
    """All vectors of a :class:`catalog.store.Catalog` made by its encoder, float32 (N, D), and
    their N SKU ids (the K reference views per SKU that the recognizer's index holds).

    Raises:
        CalibrationError: the catalog holds no vector.
    """
    ids, skus = catalog.embedding_table()
    if len(ids) == 0:
        raise CalibrationError("the catalog holds no SKU; add some with `catalog add` or `catalog import`")
    return catalog.vectors(ids, catalog.encoder_identity().dim), list(skus)


def calibrate_catalog(
    catalog,
    photos: Sequence[LabelledImage],
    *,
    progress: bool = False,
    score: str | None = None,
    **options,
) -> CalibrationReport:
    """Embed labelled whole-image photos with the catalog's encoder and run :func:`calibrate`
    against the catalog's vectors (and its outlier references' vectors, if any).  Reads only;
    storing the threshold is the caller's choice (``catalog.set_threshold(report.threshold,
    report.open_set_score)``).

    Args:
        catalog: an open :class:`catalog.store.Catalog` (at least 2 SKUs for the softmax head).
        photos: labelled photos, one product per photo (crops if the catalog segments photos).
        progress: tqdm progress bar while embedding.
        score: the open-set score; None: :func:`default_score` (``"outlier-ratio"`` when the
            catalog has outlier references, else ``"ratio"``).
        **options: keyword arguments of :func:`calibrate`.

    Raises:
        InvalidImageError: a photo cannot be decoded (the message names it).
        CalibrationError / RetailKlipError: see :func:`calibrate`; fewer than 2 SKUs;
            ``"outlier-ratio"`` on a catalog without outlier references (before any photo is
            embedded).
    """
    outliers = catalog_outliers(catalog)
    score = default_score(len(outliers) > 0) if score is None else check_score(score)
    if score == OUTLIER_SCORE and not len(outliers):
        raise no_outliers_error()
    missing = [p.path for p in photos if not p.path.is_file()]
    if missing:
        raise InvalidImageError(f"{missing[0]}: no such file" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    gallery, skus = catalog_gallery(catalog)
    if len(set(skus)) < 2:
        raise CalibrationError("calibration compares with a softmax head, which needs at least 2 SKUs in the catalog")
    encoder = catalog.encoder()
    reference = getattr(catalog, "hubness_reference", None)  # Gallery protocol: optional
    hubness = None if reference is None else reference(catalog.snapshot().encoder_id)
    queries = encoder.embed([p.path for p in photos], progress=progress)
    return calibrate(gallery, skus, queries, [p.label for p in photos], score=score, outliers=outliers,
                     hubness=hubness, **options)
