"""An open catalog's connection: its database sessions, the writers' lock, the state row
(generation, active encoder and index version, settings) and its encoder registry.

Everything that changes the catalog starts its transaction with :meth:`CatalogConnection.lock_writers`:
``UPDATE catalog_state SET generation = generation + 1`` as the first statement takes the
writers' lock (SQLite's write lock, PostgreSQL's row lock on ``catalog_state``), so the change
counter never loses an update and recognizers notice every change with one cheap query
(:meth:`CatalogConnection.snapshot`).  :mod:`catalog.writes`, :mod:`catalog.rebuild` and
:mod:`catalog.check` use these public pieces; :class:`catalog.Catalog` is the facade users open.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from retailklip.errors import RetailKlipError
from retailklip.open_set import OPEN_SET_SCORES, OUTLIER_SCORE, check_threshold, no_outliers_error

from .database import read_only_error
from .encoders import EncoderRegistry
from .errors import CatalogError
from .models import CatalogState, EncoderRow, OutlierReference

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.encoders import Encoder, EncoderIdentity


#: Default cosine-distance threshold (in [0, 2]); see docs/threshold.md.  ``catalog calibrate``
#: chooses one from labelled photos.
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class StateSnapshot:
    """What a reader needs to know to be current, read in one query (see :meth:`CatalogConnection.snapshot`).

    Attributes:
        generation: the change counter.
        encoder_id: ``encoders`` row id of the active encoder.
        version_id: ``index_versions`` row id of the active index version (None: none built).
        threshold: the open-set threshold, on ``open_set_score``.
        augmentations: views per reference image K.
        open_set_score: the score ``threshold`` is on (:data:`retailklip.open_set.OPEN_SET_SCORES`;
            ``"distance"``: a cosine distance in [0, 2]).
    """

    generation: int
    encoder_id: int
    version_id: int | None
    threshold: float
    augmentations: int
    open_set_score: str = "distance"


#: Every open catalog of this process, weakly (:func:`open_connections`).
_OPEN: weakref.WeakSet = weakref.WeakSet()


def open_connections() -> set:
    """The :class:`CatalogConnection` objects of this process that are still alive (a catalog
    and its cached recognizer refer to each other, so one lives until the next cyclic garbage
    collection, keeping its database files open): ``catalog.cli.main`` closes those a command
    opened when it returns."""
    return set(_OPEN)


class CatalogConnection:
    """The database side of an open catalog (module docstring).

    Thread safety: every method opens its own session; several threads and processes may use
    one catalog.

    Attributes:
        root: the catalog directory.
        engine: its SQLAlchemy engine (:func:`catalog.database.create_catalog_engine`).
        read_only: True when this process cannot write the catalog (see :mod:`catalog.database`):
            reads and recognition work, writes raise :class:`~catalog.errors.ReadOnlyCatalogError`.
        sessions: the session factory (``with cat.sessions() as s`` reads, ``with
            cat.sessions.begin() as s`` writes; a write calls :meth:`lock_writers` first).
        encoders: the :class:`~catalog.encoders.EncoderRegistry` (encoders built on ``device``).
        device: torch device of the encoders.
    """

    def __init__(self, root: Path, engine: Engine, *, device: str = "cpu", read_only: bool = False) -> None:
        self.root = Path(root)
        self.engine = engine
        self.read_only = read_only
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.device = device
        self.encoders = EncoderRegistry(self.sessions, device)
        _OPEN.add(self)

    # ------------------------------------------------------------------ state
    @staticmethod
    def state(s: Session) -> CatalogState:
        """The ``catalog_state`` row, in session ``s``."""
        return s.get(CatalogState, 1)

    @property
    def generation(self) -> int:
        """Change counter: bumped by every add/remove/settings change (one cheap query)."""
        with self.engine.connect() as c:
            return int(c.execute(select(CatalogState.generation).where(CatalogState.id == 1)).scalar_one())

    def snapshot(self) -> StateSnapshot:
        """Generation, active encoder and index version, threshold (and its score) and K in one query."""
        with self.engine.connect() as c:
            r = c.execute(
                select(
                    CatalogState.generation, CatalogState.encoder_id, CatalogState.active_version_id,
                    CatalogState.threshold, CatalogState.augmentations, CatalogState.open_set_score,
                ).where(CatalogState.id == 1)
            ).one()
        return StateSnapshot(int(r[0]), int(r[1]), None if r[2] is None else int(r[2]), float(r[3]), int(r[4]), str(r[5]))

    def require_writable(self, what: str = "write") -> None:
        """Raise :class:`~catalog.errors.ReadOnlyCatalogError` (naming ``what``) if this catalog is read-only."""
        if self.read_only:
            raise read_only_error(self.root, what)

    def lock_writers(self, s: Session, *, bump: bool = True) -> tuple[int, int]:
        """Start a write: update the state row as the transaction's first statement, which takes
        the writers' lock (SQLite's write lock, PostgreSQL's row lock on ``catalog_state``) until
        ``s`` commits or rolls back.  With ``bump`` the generation is incremented (never losing
        an increment); without it the lock is taken for file operations that readers need not
        notice.

        Returns:
            ``(generation, active encoder id)`` as of the lock.

        Raises:
            ReadOnlyCatalogError: the catalog is read-only (before anything is written).
        """
        self.require_writable()
        r = s.execute(
            update(CatalogState)
            .where(CatalogState.id == 1)
            .values(generation=CatalogState.generation + (1 if bump else 0))
            .returning(CatalogState.generation, CatalogState.encoder_id)
        ).one()
        return int(r[0]), int(r[1])

    def settings(self) -> dict:
        """Catalog settings: encoder identity and spec, K, seed, threshold and the open-set score it
        is on, hubness-reduction k and the unlabeled photos it ranks against (their number; 0:
        none stored), segmenter, generation."""
        with self.sessions() as s:
            st = self.state(s)
            enc = s.get(EncoderRow, st.encoder_id)
            return {
                "encoder": enc.spec,
                "encoder_key": enc.key,
                "weights": enc.weights_path,
                "dim": enc.dim,
                "augmentations": st.augmentations,
                "seed": st.seed,
                "threshold": st.threshold,
                "open_set_score": st.open_set_score,
                "hubness_k": st.hubness_k,
                "unlabeled_photos": int(s.scalar(select(func.coalesce(func.length(EncoderRow.unlabeled), 0))
                                                 .where(EncoderRow.id == enc.id))) // (4 * enc.dim),
                "segmenter": st.segmenter,
                "segmenter_checkpoint": st.segmenter_checkpoint,
                "generation": st.generation,
                "index_version": st.active_version_id,
            }

    @property
    def threshold(self) -> float:
        """The catalog's open-set threshold (a cosine distance in [0, 2] unless
        :attr:`open_set_score` is ``"ratio"``: then a distance ratio in [0, 1])."""
        with self.sessions() as s:
            return float(self.state(s).threshold)

    @property
    def open_set_score(self) -> str:
        """The score the threshold is on: ``"distance"`` or ``"ratio"`` (:mod:`retailklip.open_set`)."""
        with self.sessions() as s:
            return str(self.state(s).open_set_score)

    def set_threshold(self, threshold: float, open_set_score: str = "distance") -> None:
        """Store a new threshold and the score it is on, in one write (recognizers apply both
        from their next call).

        Args:
            threshold: a cosine distance in [0, 2] (``"distance"``), a ratio in [0, 1] (``"ratio"``)
                or a finite outlier ratio >= 0 (``"outlier-ratio"``: only on a catalog that holds
                outlier references).
            open_set_score: one of :data:`retailklip.open_set.OPEN_SET_SCORES`; default
                ``"distance"``, what a bare threshold always meant.

        Raises:
            CatalogError: unknown score, or a threshold outside its range.  ReadOnlyCatalogError.
            RetailKlipError: ``"outlier-ratio"`` on a catalog without outlier references.
            Nothing is stored on any error.
        """
        if open_set_score not in OPEN_SET_SCORES:
            raise CatalogError(f"unknown open-set score {open_set_score!r}; choose one of {', '.join(OPEN_SET_SCORES)}")
        try:
            threshold = check_threshold(threshold, open_set_score)
        except RetailKlipError as e:
            raise CatalogError(str(e)) from None
        with self.sessions.begin() as s:
            self.lock_writers(s)
            if open_set_score == OUTLIER_SCORE and not s.scalar(select(func.count(OutlierReference.id))):
                raise no_outliers_error()
            s.execute(update(CatalogState).where(CatalogState.id == 1).values(
                threshold=float(threshold), open_set_score=open_set_score))

    def set_segmenter(self, name: str | None, checkpoint: str | os.PathLike | None = None) -> None:
        """Remember a default segmenter (name and checkpoint path) for ``recognize``."""
        with self.sessions.begin() as s:
            self.lock_writers(s)
            st = self.state(s)
            st.segmenter = name
            st.segmenter_checkpoint = str(Path(checkpoint).resolve()) if checkpoint else None

    # ------------------------------------------------------------------ encoders
    def _encoder_id(self, encoder_id: int | None) -> int:
        return self.snapshot().encoder_id if encoder_id is None else encoder_id

    def encoder_identity(self, encoder_id: int | None = None) -> EncoderIdentity:
        """The identity of the catalog's active encoder (or of ``encoder_id``), as stored."""
        return self.encoders.identity(self._encoder_id(encoder_id))

    def encoder_kwargs(self, encoder_id: int | None = None) -> dict:
        """:meth:`EncoderRegistry.kwargs <catalog.encoders.EncoderRegistry.kwargs>` of the active
        encoder (or ``encoder_id``)."""
        return self.encoders.kwargs(self._encoder_id(encoder_id))

    def encoder(self) -> Encoder:
        """The catalog's active encoder (the one ``add`` embeds with); see :meth:`encoder_for`."""
        return self.encoder_for(self.snapshot().encoder_id)

    def encoder_for(self, encoder_id: int) -> Encoder:
        """The encoder of ``encoders`` row ``encoder_id`` (:meth:`EncoderRegistry.get
        <catalog.encoders.EncoderRegistry.get>`)."""
        return self.encoders.get(encoder_id)

    def active_encoder(self) -> tuple[int, Encoder]:
        """``(encoder id, encoder)`` of the active encoder, read together."""
        enc_id = self.snapshot().encoder_id
        return enc_id, self.encoder_for(enc_id)

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()
