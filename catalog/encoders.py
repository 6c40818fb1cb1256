"""The catalog's encoder registry: the ``encoders`` table (one row per encoder identity) and the
encoders built from it in this process.

Every vector in the database names the encoder that made it (``embeddings.encoder_id``); an
encoder row holds what rebuilds the same encoder anywhere (SPEC, weights path, backend options,
centering vector) and the identity it must then have (backend, model, weights hash,
preprocessing, centre).  :meth:`EncoderRegistry.get` builds an encoder once per process and
checks it against the stored identity, so vectors of a changed weights file are never mixed with
the stored ones (:class:`~retailklip.errors.EncoderMismatchError`: run ``catalog rebuild``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import TYPE_CHECKING

import numpy as np

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from retailklip.encoders import EncoderIdentity, create_encoder
from retailklip.hubness import even_sample

from .codec import decode_vector, decode_vectors, encode_vector, encode_vectors
from .errors import CatalogError
from .models import EncoderRow

if TYPE_CHECKING:  # pragma: no cover
    import os
    from collections.abc import Sequence

    from retailklip.encoders import Encoder


def center_on(encoder: Encoder, photos: Sequence[str | os.PathLike], *, progress: bool = False
              ) -> tuple[Encoder, np.ndarray]:
    """Centre an encoder on unlabeled in-store photos (SimpleShot CL2N, see
    :class:`retailklip.encoders.Encoder`) and embed an evenly spaced sample of them (at most
    :data:`retailklip.hubness.MAX_UNLABELED`) with the centred encoder, in one pass over the photos.

    Returns:
        ``(centred encoder, float32 (P, D) unit embeddings of the sample)``: the sample is what
        hubness reduction measures reference vectors against (:mod:`retailklip.hubness`).

    Raises:
        CatalogError: no photos.  InvalidImageError: a photo cannot be decoded.
    """
    photos = list(photos)
    if not photos:
        raise CatalogError("no photos to compute the feature centre from")
    center, kept = encoder.unlabeled_features(photos, progress=progress, keep=even_sample(len(photos)))
    centred = encoder.with_center(center)
    return centred, centred.normalize(kept)


def decode_unlabeled(blob: bytes, dim: int) -> np.ndarray:
    """The stored unlabeled photo embeddings (:meth:`EncoderRegistry.register`) as float32 (P, D).

    Raises:
        ValueError: not whole vectors of dimension ``dim``, none, not finite, or not unit norm
            (the message says which; ``catalog check`` reports it as ``bad_unlabeled``).
    """
    photos = decode_vectors(blob, dim)
    if not len(photos) or not np.isfinite(photos).all():
        raise ValueError("empty or not finite")
    if np.abs(np.einsum("ij,ij->i", photos, photos) - 1.0).max() > 1e-3:
        raise ValueError("not unit norm")
    return photos


class EncoderRegistry:
    """Encoder rows of one catalog database and their encoders, built on first use.

    Thread safe: encoders are built under a lock, each at most once per registry.

    Args:
        sessions: the catalog's session factory.
        device: torch device the encoders are built on (``"cpu"``, ``"cuda"``, ...).
    """

    def __init__(self, sessions: sessionmaker, device: str = "cpu") -> None:
        self._sessions = sessions
        self.device = device
        self._built: dict[int, Encoder] = {}
        self._lock = threading.Lock()

    def register(self, s: Session, encoder: Encoder, spec: str, weights_path: str | None, options: dict,
                 unlabeled: np.ndarray | None = None) -> int:
        """The row id of ``encoder``'s identity, inserting the row (in the caller's transaction
        ``s``) if it is new.  After the commit, :meth:`remember` the built encoder for :meth:`get`.

        Args:
            s: an open write session.
            encoder: the built encoder.
            spec: its encoder SPEC (``timm:MODEL``, ``open_clip:MODEL/TAG``).
            weights_path: its local weights file (absolute) or None.
            options: backend options it was built with (JSON-serialisable).
            unlabeled: float32 (P, D) embeddings by ``encoder`` of the unlabeled photos its centre
                was computed from (:func:`center_on`), kept for hubness reduction; stored on a
                new row, or on an existing row that has none.
        """
        ident = encoder.identity
        blob = None if unlabeled is None or not len(unlabeled) else encode_vectors(unlabeled)
        row = s.scalar(select(EncoderRow).where(EncoderRow.key == ident.key))
        if row is None:
            row = EncoderRow(
                key=ident.key, backend=ident.backend, model=ident.model, weights=ident.weights, dim=ident.dim,
                preprocess=ident.preprocess, spec=spec, weights_path=weights_path,
                options=json.dumps(options, sort_keys=True),
                center=None if encoder.center is None else encode_vector(encoder.center.numpy()),
                unlabeled=blob,
            )
            s.add(row)
            s.flush()
        elif row.unlabeled is None and blob is not None:
            row.unlabeled = blob
        return int(row.id)

    def unlabeled(self, encoder_id: int) -> np.ndarray | None:
        """float32 (P, D) unit embeddings of the unlabeled photos stored with encoder row
        ``encoder_id`` (:meth:`register`), or None.

        Raises:
            CatalogError: no such encoder row, or damaged embeddings (:func:`decode_unlabeled`).
        """
        with self._sessions() as s:
            row = self._row(s, encoder_id)
            if row.unlabeled is None:
                return None
            try:
                return decode_unlabeled(row.unlabeled, row.dim)
            except ValueError as e:
                raise CatalogError(f"encoder {encoder_id}'s unlabeled photo embeddings are damaged ({e}); "
                                   f"run `catalog check --repair`, then `catalog rebuild --center-photos ...`") from None

    def remember(self, encoder_id: int, encoder: Encoder) -> None:
        """Keep an encoder built by the caller as the one of (committed) row ``encoder_id``."""
        with self._lock:
            self._built.setdefault(encoder_id, encoder)

    def _row(self, s: Session, encoder_id: int) -> EncoderRow:
        row = s.get(EncoderRow, encoder_id)
        if row is None:
            raise CatalogError(f"no encoder with id {encoder_id}")
        return row

    def identity(self, encoder_id: int) -> EncoderIdentity:
        """The identity stored for encoder row ``encoder_id``.  Raises :class:`CatalogError`."""
        with self._sessions() as s:
            row = self._row(s, encoder_id)
            center = "none" if row.center is None else "sha256:" + hashlib.sha256(row.center).hexdigest()
            return EncoderIdentity(row.backend, row.model, row.weights, row.dim, row.preprocess, center)

    def kwargs(self, encoder_id: int) -> dict:
        """Keyword arguments of :func:`retailklip.encoders.create_encoder` that rebuild encoder
        ``encoder_id`` in another process (e.g. a Ray worker): ``spec``, ``weights``,
        ``random_init``, ``center`` (float32 (D,) or None) and the backend options.

        Raises:
            CatalogError: no such encoder row.
        """
        with self._sessions() as s:
            row = self._row(s, encoder_id)
            return dict(
                json.loads(row.options),
                spec=row.spec,
                weights=row.weights_path,
                random_init=row.weights.startswith("random:"),
                center=None if row.center is None else decode_vector(row.center),
            )

    def get(self, encoder_id: int) -> Encoder:
        """The encoder of row ``encoder_id``, built on first use (then cached) and checked
        against the stored identity.

        Raises:
            WeightsError: the weights file is gone.
            EncoderMismatchError: the weights file or preprocessing changed since the vectors
                were made (run ``catalog rebuild``).
        """
        with self._lock:
            enc = self._built.get(encoder_id)
            if enc is None:
                kw = self.kwargs(encoder_id)
                enc = create_encoder(kw.pop("spec"), device=self.device, **kw)
                self.identity(encoder_id).check_same(enc.identity)
                self._built[encoder_id] = enc
            return enc
