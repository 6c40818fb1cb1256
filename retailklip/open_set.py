"""Open-set scores: how likely a 1-NN match is to be a product that is not in the catalog.

A recognition is accepted (named as its nearest SKU) when its open-set score is ``<=`` the
catalog's threshold; the catalog records which score the threshold is on (the catalog setting
``open_set_score``).  Scores, both "higher = more likely unknown":

* ``"distance"``: the 1-NN cosine distance d1 in [0, 2] (the only score before issue 14; the
  default, so catalogs calibrated before it keep their meaning);
* ``"ratio"``: d1 / d2 in [0, 1], d2 = the cosine distance to the nearest *other* SKU (the
  runner-up): the nearest-neighbour distance ratio test (Lowe, "Distinctive image features from
  scale-invariant keypoints", IJCV 2004, §7.1).  Near 1 the photo is about as close to two SKUs,
  e.g. an unknown sibling variety between two known ones; near 0 one SKU is much closer than
  any other.  With no runner-up (a one-SKU catalog) d2 is taken as 2, the largest cosine
  distance; d1 = d2 = 0 gives 1.

* ``"outlier-ratio"``: d1 / d_out in [0, inf), d_out = the cosine distance to the nearest
  *outlier reference*: a reference image of a product that is *not* in the catalog (e.g. the
  packshots of the classes the encoder was finetuned on; ``catalog outliers add``).  Above 1
  an outlier product is nearer than every catalog SKU.  Only available when the catalog holds
  outlier references (:func:`outlier_ratio`).

Which score separates unknown siblings better was measured on GroceryStore
(benchmarks/bench_open_set.py, docs/threshold.md "Unknown rejection for siblings (issue 14)"),
and, for the outlier-ratio, by class-disjoint cross-validation (benchmarks/bench_loop_recipe.py,
docs/finetune.md "Third round": AUROC +0.247 [0.196, 0.296] over the distance on the finetuned
encoder).
"""

from __future__ import annotations

import math

import numpy as np

from .errors import RetailKlipError

#: The open-set scores a threshold can be on.
OPEN_SET_SCORES = ("distance", "ratio", "outlier-ratio")

#: The score that needs outlier references (products known not to be in the catalog).
OUTLIER_SCORE = "outlier-ratio"

#: The score of a catalog that never recorded one (all catalogs before issue 14).
DEFAULT_OPEN_SET_SCORE = "distance"

#: Largest cosine distance; the runner-up distance used when there is none.
MAX_DISTANCE = 2.0


def check_score(score: str) -> str:
    """Return ``score`` if it is one of :data:`OPEN_SET_SCORES`.

    Raises:
        RetailKlipError: any other value (one line naming the valid ones).
    """
    if score not in OPEN_SET_SCORES:
        raise RetailKlipError(f"unknown open-set score {score!r}; choose one of {', '.join(OPEN_SET_SCORES)}")
    return score


def score_range(score: str) -> tuple[float, float]:
    """The interval a score's values (and its thresholds) lie in: [0, 2] for ``distance``, [0, 1]
    for ``ratio``, [0, inf) for ``outlier-ratio`` (a threshold on it must be finite).

    Raises:
        RetailKlipError: unknown score name.
    """
    score = check_score(score)
    if score == "distance":
        return 0.0, MAX_DISTANCE
    return (0.0, 1.0) if score == "ratio" else (0.0, math.inf)


def check_threshold(threshold: float, score: str) -> float:
    """Return ``threshold`` as a float if it is a valid threshold on ``score``: finite and in
    :func:`score_range`.

    Raises:
        RetailKlipError: unknown score, or a threshold outside its range (one line naming it).
    """
    low, high = score_range(score)
    t = float(threshold)
    if not (math.isfinite(t) and low <= t <= high):
        what = {"distance": "a cosine distance", "ratio": "a distance ratio", OUTLIER_SCORE: "an outlier ratio"}[score]
        upper = f"{high:g}]" if math.isfinite(high) else "inf)"
        raise RetailKlipError(f"a threshold on {score} is {what} in [{low:g}, {upper}, got {threshold}")
    return t


def no_outliers_error() -> RetailKlipError:
    """The one-line error of the ``outlier-ratio`` score on a gallery without outlier references."""
    return RetailKlipError(
        "the open-set score outlier-ratio needs outlier references (products not sold in this store) and the "
        "catalog has none; add some with `catalog outliers add IMAGE...`, or use --score distance or ratio"
    )


def distance_ratio(distance: np.ndarray | float, runner_up: np.ndarray | float | None) -> np.ndarray:
    """Lowe's ratio d1 / d2 (module docstring).

    Args:
        distance: float (M,) 1-NN cosine distances d1 in [0, 2] (or a scalar).
        runner_up: float (M,) cosine distances d2 to the nearest other SKU, NaN where there is
            none (or a scalar, or None for "none").

    Returns:
        float64 (M,) ratios in [0, 1] (d1 clipped to >= 0; d1 > d2, possible with approximate
        indexes and with hubness reduction's ranking, :mod:`retailklip.hubness`, gives 1).
    """
    d1 = np.clip(np.asarray(distance, np.float64), 0.0, MAX_DISTANCE)
    d2 = np.full_like(d1, np.nan) if runner_up is None else np.asarray(runner_up, np.float64)
    d2 = np.where(np.isnan(d2), MAX_DISTANCE, d2)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 1.0)
    return np.clip(r, 0.0, 1.0)


def open_set_score(score: str, distance: np.ndarray | float, runner_up: np.ndarray | float | None,
                   outlier_distance: np.ndarray | float | None = None) -> np.ndarray:
    """The named score of 1-NN matches (higher = more likely unknown).

    Args:
        score: one of :data:`OPEN_SET_SCORES`.
        distance: float (M,) 1-NN cosine distances in [0, 2].
        runner_up: float (M,) runner-up cosine distances, NaN where none (only ``ratio`` uses it).
        outlier_distance: float (M,) cosine distances in [0, 2] to the nearest outlier reference,
            or None when the gallery has none (only ``outlier-ratio`` uses it).

    Returns:
        float64 (M,) scores: the distances themselves, :func:`distance_ratio` or :func:`outlier_ratio`.

    Raises:
        RetailKlipError: unknown score name; ``outlier-ratio`` without ``outlier_distance``
            (:func:`no_outliers_error`).
    """
    score = check_score(score)
    if score == "distance":
        return np.asarray(distance, np.float64)
    if score == "ratio":
        return distance_ratio(distance, runner_up)
    if outlier_distance is None:
        raise no_outliers_error()
    return outlier_ratio(distance, outlier_distance)


def outlier_ratio(distance: np.ndarray | float, outlier_distance: np.ndarray | float) -> np.ndarray:
    """Open-set score d1 / d_out: the 1-NN distance to the catalog over the distance to the
    nearest *outlier* reference (a product known not to be in the catalog); higher = more likely
    unknown, > 1 when an outlier is nearer than every catalog SKU.

    The nearest-neighbour distance ratio of Lowe (IJCV 2004, §7.1) and of the open-set NNDR
    classifier (Mendes Júnior et al., "Nearest neighbors distance ratio open-set classifier",
    Machine Learning 106, 2017, §3), with the second neighbour taken from outlier products instead
    of the catalog's own runner-up: a photo far from every packshot (a loose fruit on a shelf)
    is far from the outliers too, so the ratio removes the product type's distance scale that the
    plain distance keeps.

    Args:
        distance: float (M,) 1-NN cosine distances d1 to the catalog, in [0, 2] (or a scalar).
        outlier_distance: float (M,) cosine distances to the nearest outlier reference, in [0, 2].

    Returns:
        float64 (M,) ratios in [0, inf): d1 clipped to [0, 2]; where d_out is 0, the ratio is
        ``inf`` for d1 > 0 (the photo is an outlier's image) and 1 for d1 = 0.

    Raises:
        ValueError: the two arrays differ in shape, or a value is NaN.
    """
    d1 = np.clip(np.asarray(distance, np.float64), 0.0, MAX_DISTANCE)
    d_out = np.clip(np.asarray(outlier_distance, np.float64), 0.0, MAX_DISTANCE)
    if d1.shape != d_out.shape:
        raise ValueError(f"distance {d1.shape} and outlier_distance {d_out.shape} differ in shape")
    if np.isnan(d1).any() or np.isnan(d_out).any():
        raise ValueError("NaN distance")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d_out > 0, d1 / np.where(d_out > 0, d_out, 1.0), np.where(d1 > 0, np.inf, 1.0))
