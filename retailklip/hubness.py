"""Hubness reduction at the 1-NN: cross-domain similarity local scaling (CSLS).

In a high-dimensional embedding some reference vectors are "hubs": the nearest neighbour of many
photos, including photos of other SKUs (a sibling product's photos land on one packshot).  CSLS
(Conneau et al., "Word translation without parallel data", ICLR 2018, §2.3, Eq. 6) ranks the
reference vectors g of a query q by

    cos(q, g) - r(g) / 2,     r(g) = mean cosine of g to its k nearest unlabeled store photos,

i.e. by the *adjusted cosine distance* ``d(q, g) + r(g) / 2`` (the query's own term of Eq. 6 is
the same for every g and drops out of the ranking).  A reference that is close to many store
photos, whatever they show, is pushed back.  No training: the unlabeled photos are the ones the
catalog already centres its features on (``catalog init --center-photos``).

Only the *ranking* changes: which SKU is nearest and which is the runner-up.  The distances a
match reports stay the cosine distances in [0, 2] of the chosen reference vectors, so thresholds
keep their meaning (:mod:`retailklip.matching`).

Chosen by cross-validation over GroceryStore's train split for the frozen-encoder main job
(k = 30: 0.430 -> 0.455 top-1 on 1,830 photos not used to choose it, +2.5 [+0.8, +4.2];
docs/evaluation.md "Hubness reduction at the 1-NN"); on the finetuned encoder its gain was not
significant (+1.4 [-1.2, +4.1]), so the RetailKLIP loop does not use it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import RetailKlipError

#: k nearest unlabeled photos per reference vector (the cross-validated choice; 0 = off).
DEFAULT_HUBNESS_K = 30

#: At most this many unlabeled photos' embeddings are kept (an evenly spaced sample of them),
#: so a catalog's storage and the recognizer's load time stay bounded however many photos the
#: centre was computed from.
MAX_UNLABELED = 2048

#: Reference vectors per matrix product in :meth:`HubnessReference.offsets` (bounds memory).
CHUNK = 4096


def check_hubness_k(k: object) -> int:
    """Return ``k`` if it is an int >= 0 (0: hubness reduction off).

    Raises:
        RetailKlipError: anything else (one line).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise RetailKlipError(f"the hubness k must be an integer >= 0 (0: off), got {k!r}")
    return int(k)


@dataclass(frozen=True)
class HubnessReference:
    """The unlabeled store photos that CSLS measures a reference vector's hubness against.

    Attributes:
        photos: float32 (P, D) unit embeddings of unlabeled in-store photos, P >= 1, made by the
            same encoder (same centre) as the reference vectors.
        k: nearest photos averaged per reference vector, >= 1 (capped at P).

    Raises:
        RetailKlipError: no photo, k < 1, or photos that are not a finite 2-D array.
    """

    photos: np.ndarray
    k: int = DEFAULT_HUBNESS_K

    def __post_init__(self) -> None:
        photos = np.ascontiguousarray(self.photos, dtype=np.float32)
        if photos.ndim != 2 or len(photos) == 0 or not np.isfinite(photos).all():
            raise RetailKlipError(f"hubness reduction needs a finite (P, D) array of P >= 1 photo embeddings, "
                                  f"got shape {photos.shape}")
        if check_hubness_k(self.k) < 1:
            raise RetailKlipError("a hubness reference needs k >= 1")
        object.__setattr__(self, "photos", photos)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.photos.shape[1])

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of k and the photos' float32 bytes: offsets computed against one
        reference are valid for another with the same fingerprint (e.g. stored with an index
        version)."""
        h = hashlib.sha256(f"csls k={min(self.k, len(self.photos))} shape={self.photos.shape}\n".encode())
        h.update(self.photos.tobytes())
        return h.hexdigest()

    def hubness(self, vectors: np.ndarray) -> np.ndarray:
        """``r(g)``: float32 (N,) mean cosine similarity in [-1, 1] of each reference vector (float
        (N, D), unit rows) to its ``min(k, P)`` most similar photos (CSLS, Eq. 6's r_S).

        Raises:
            RetailKlipError: ``vectors`` is not (N, D) with this reference's D.
        """
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise RetailKlipError(f"hubness of vectors of shape {vectors.shape} against photos of dimension {self.dim}")
        k = min(self.k, len(self.photos))
        out = np.empty(len(vectors), np.float32)
        for s in range(0, len(vectors), CHUNK):
            sims = vectors[s: s + CHUNK] @ self.photos.T
            out[s: s + CHUNK] = np.partition(sims, -k, axis=1)[:, -k:].mean(1)
        return out

    def offsets(self, vectors: np.ndarray) -> np.ndarray:
        """float32 (N,) ``r(g) / 2``: what CSLS adds to each reference vector's cosine distance
        before ranking (module docstring)."""
        return self.hubness(vectors) / 2


def even_sample(n: int, size: int = MAX_UNLABELED) -> np.ndarray:
    """int64 indices of an evenly spaced, deterministic sample of ``min(n, size)`` of ``n`` items
    (all of them, in order, when ``n <= size``)."""
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, size).round().astype(np.int64))
