"""The embedding step of ``catalog rebuild``: reference image files -> K unit vectors each, in
this process (:func:`embed_local`) or on a Ray cluster with Ray Data (:func:`embed_ray`).

Both run, for every :class:`EmbedJob`, exactly what :meth:`catalog.Catalog.add` runs on a
reference image::

    read_image_bytes(path) -> decode_image_bytes -> retailklip.references.embed_reference(encoder, image, K, seed)

with the K views of one reference forwarded together (one ``Encoder.embed`` call), so a vector
does not depend on where, or next to which other reference, it was computed.  On a cluster each
Ray actor builds the encoder once from ``encoder_kwargs`` (what
:func:`retailklip.encoders.create_encoder` accepts); every node therefore needs the same
retailklip install, the catalog's image files and the weights file at the same paths
(docs/ray.md).  Passing the catalog's :class:`~retailklip.encoders.EncoderIdentity` as
``identity`` makes every actor check that it built the same encoder (same weights file content,
preprocessing and centering) before it embeds anything.

Ray is an optional dependency (``pip install 'retailklip[ray]'``); it is imported only by
:func:`embed_ray`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from retailklip import errors as core_errors
from retailklip.encoders import EncoderIdentity
from retailklip.errors import RetailKlipError
from . import errors as catalog_errors
from .codec import decode_vectors, encode_vectors
from .errors import CatalogError
from retailklip.images import decode_image_bytes, read_image_bytes
from retailklip.references import embed_reference

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.encoders import Encoder

logger = logging.getLogger(__name__)

#: What to install when Ray is missing.
RAY_EXTRA = "pip install 'retailklip[ray]'"
#: Seconds to wait for a TCP connection to a ``host:port`` / ``ray://host:port`` address before
#: giving up (``ray.init`` itself retries an unreachable address for minutes).
CONNECT_TIMEOUT_S = 5.0
#: What an SKU's reference image is called in messages (an :class:`EmbedJob`'s default noun).
REFERENCE_NOUN = "reference image"


@dataclass(frozen=True)
class EmbedJob:
    """One reference image to embed.

    Attributes:
        reference_id: ``reference_images.id`` of the image (``outlier_references.id`` for an
            outlier reference).
        path: absolute path of the stored reference image file (on a cluster: the same path
            on every node).
        noun: what the image is called in error messages.
    """

    reference_id: int
    path: str
    noun: str = REFERENCE_NOUN


def jobs_noun(nouns: Sequence[str]) -> str:
    """What a count of jobs is called in summary messages ("after 3 of 10 references"): the
    jobs' own noun in the plural when they all share one other than the SKU references'
    (``"outlier references"``), else ``"references"``."""
    kinds = set(nouns)
    if len(kinds) == 1 and REFERENCE_NOUN not in kinds:
        return f"{kinds.pop()}s"
    return "references"


def _embed_one(reference_id: int, path: str, encoder: Encoder, k: int, seed: int,
               noun: str = REFERENCE_NOUN) -> np.ndarray:
    """The K vectors of one reference image: float32 (K, D), unit rows.

    Raises:
        RetailKlipError (InvalidImageError for an unreadable image): the message names the
            reference id and the path.
    """
    try:
        data = read_image_bytes(path)
        im = decode_image_bytes(data, str(path))
        return embed_reference(encoder, im, k, seed)
    except RetailKlipError as e:
        msg = str(e)
        where = f"{noun} {reference_id}" + ("" if msg.startswith(str(path)) else f" ({path})")
        raise type(e)(f"{where}: {msg}") from None


def _check_args(augmentations: int, seed: int) -> None:
    if isinstance(augmentations, bool) or not isinstance(augmentations, int) or augmentations < 1:
        raise ValueError(f"augmentations (K views per reference) must be an integer >= 1, got {augmentations!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def embed_local(
    jobs: Sequence[EmbedJob],
    encoder: Encoder,
    augmentations: int,
    seed: int,
    *,
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Embed reference images in this process, one reference (K views, one batch) at a time.

    The same computation as :meth:`catalog.Catalog.add` (:func:`catalog.writes.prepare_reference`), so the vectors
    are bitwise those that ``add`` stores for the same image, encoder, K and seed.

    Args:
        jobs: the reference images.
        encoder: the catalog's encoder (:meth:`catalog.Catalog.encoder`).
        augmentations: K, views per reference (>= 1; view 0 is the image itself).
        seed: augmentation seed (the catalog's ``seed`` setting).
        progress: show a tqdm progress bar over references.

    Yields:
        ``(reference_id, vectors)`` in job order; ``vectors`` is a float32 (K, D) array of unit
        rows (D = ``encoder.dim``).

    Raises:
        ValueError: ``augmentations < 1`` or a non-integer seed (before anything is embedded).
        InvalidImageError: a reference image is missing or cannot be decoded; the message names
            its reference id and path.  References yielded before it stay valid.
    """
    _check_args(augmentations, seed)
    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="embedding", unit="ref")
    for job in it:
        yield int(job.reference_id), _embed_one(job.reference_id, job.path, encoder, augmentations, seed, job.noun)


# ---------------------------------------------------------------------------------------- Ray
class RayEmbedder:
    """Ray Data callable class: builds the encoder once per actor, embeds a batch of jobs.

    Input batch (numpy format): ``reference_id`` int64 (n,), ``path`` str (n,), optionally
    ``noun`` str (n,): what each image is called in its error (:attr:`EmbedJob.noun`; default
    ``"reference image"``).  Output batch:
    ``reference_id`` int64 (n,), ``vectors`` bytes (n,) (float32 (K, D) in native byte order,
    C order), ``dim`` int64 (n,), ``error`` str (n,): ``""`` or ``"ErrorClass\\tmessage"``,
    ``noun`` str (n,): the input's nouns.
    Errors of retailklip's own types (unreadable image, missing weights, encoder mismatch) are
    returned, not raised, so that the driver can raise them as themselves, in one line, naming
    the node; so is any failure to build the encoder (as CatalogError).  Anything else while
    embedding (a bug, out of memory) is raised and fails the Ray job.
    """

    def __init__(self, encoder_kwargs: dict, augmentations: int, seed: int, threads: int | None,
                 identity: EncoderIdentity | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.k, self.seed = augmentations, seed
        self.node = socket.gethostname()
        self.encoder: Encoder | None = None
        self.init_error = ""
        try:
            from retailklip.encoders import create_encoder

            enc = create_encoder(**encoder_kwargs)
            if identity is not None:
                identity.check_same(enc.identity)
            self.encoder = enc
        except Exception as e:  # noqa: BLE001 -- reported to the driver as one line, see __call__
            if isinstance(e, RetailKlipError):
                name, msg = type(e).__name__, str(e)
            else:
                name, msg = "CatalogError", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            self.init_error = f"{name}\tcannot build the encoder on Ray node {self.node}: {msg}"

    def __call__(self, batch: dict) -> dict:
        ids = np.asarray(batch["reference_id"], dtype=np.int64)
        paths = [str(p) for p in batch["path"]]
        nouns = [str(n) for n in batch["noun"]] if "noun" in batch else [REFERENCE_NOUN] * len(paths)
        vectors, dims, errs = [], [], []
        for rid, path, noun in zip(ids.tolist(), paths, nouns):
            v, err = np.zeros((0, 0), np.float32), self.init_error
            if self.encoder is not None:
                try:
                    v = _embed_one(rid, path, self.encoder, self.k, self.seed, noun)
                except RetailKlipError as e:
                    err = f"{type(e).__name__}\t{e} (on Ray node {self.node})"
            vectors.append(encode_vectors(v))
            dims.append(v.shape[1])
            errs.append(err)
        return {
            "reference_id": ids,
            "vectors": np.array(vectors, dtype=object),
            "dim": np.array(dims, dtype=np.int64),
            "error": np.array(errs, dtype=object),
            "noun": np.array(nouns, dtype=object),
        }


def raise_worker_error(err: str) -> None:
    """Raise a Ray worker's error row (``"ErrorClass\tmessage"``) in the driver as that error class
    (a retailklip or catalog error; :class:`CatalogError` for any other)."""
    name, _, msg = err.partition("\t")
    cls = getattr(catalog_errors, name, None) or getattr(core_errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, RetailKlipError)):
        cls = CatalogError
    raise cls(msg)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost cause of a (Ray-wrapped) exception: ``RayTaskError.cause``, ``__cause__``."""
    seen = {id(e)}
    while True:
        nxt = getattr(e, "cause", None)
        nxt = nxt if isinstance(nxt, BaseException) else e.__cause__
        if nxt is None or id(nxt) in seen:
            return e
        seen.add(id(nxt))
        e = nxt


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise CatalogError(f"Ray is not installed ({e.name or e}); install it with: {RAY_EXTRA}") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail fast (one line) when ``host:port`` does not accept TCP connections."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CatalogError(
            f"bad Ray address {address!r}: expected 'auto', 'local', 'HOST:PORT' or 'ray://HOST:PORT'"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise CatalogError(
            f"cannot reach the Ray cluster at {address}: {e.strerror or e} "
            f"(start one with `ray start --head`, see docs/ray.md)"
        ) from None


def _connect(ray, address: str) -> bool:
    """Connect this process to Ray; True when this call connected (and must shut down)."""
    if ray.is_initialized():
        return False
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address == "local":
        kwargs["include_dashboard"] = False
    elif address != "auto":
        _check_reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "ray[client]" in first:
            first = "Ray Client (ray://) needs `pip install 'ray[client]'`"
        raise CatalogError(f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    return True


class RayConnection:
    """One connection of this process to a Ray cluster, shared by several :func:`embed_ray` calls.

    ``catalog rebuild --ray`` embeds the reference images, then the outlier references, then
    what was added meanwhile: one :func:`embed_ray` call each.  Given an address, each call
    connects and disconnects on its own, which for ``"local"`` starts and stops a throw-away
    cluster per call (seconds each on an idle 2-core machine, minutes on a loaded one) and
    re-initialises Ray in the same process.  Passed as ``embed_ray(address=connection)``, the calls
    share this connection: the first call that has work connects, and leaving the ``with`` block
    disconnects (stopping the cluster it started for ``"local"``).  A process already connected
    (``ray.init`` called by the caller) keeps its connection.

    Args:
        address: as :func:`embed_ray`'s ``address``.
    """

    def __init__(self, address: str = "auto"):
        self.address = address
        self._started = False

    def connect(self):
        """Connect unless connected already; returns the ``ray`` module.

        Raises:
            CatalogError: Ray is not installed, or the cluster cannot be reached.
        """
        ray = _import_ray()
        self._started = _connect(ray, self.address) or self._started
        return ray

    def close(self) -> None:
        """Disconnect if :meth:`connect` connected (else nothing)."""
        if self._started:
            import ray

            self._started = False
            ray.shutdown()

    def __str__(self) -> str:
        return self.address

    def __enter__(self) -> RayConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def embed_ray(
    jobs: Sequence[EmbedJob],
    encoder_kwargs: dict,
    augmentations: int,
    seed: int,
    *,
    address: str | RayConnection = "auto",
    num_workers: int | None = None,
    batch_size: int = 16,
    threads_per_worker: int = 1,
    identity: EncoderIdentity | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Embed reference images on a Ray cluster with Ray Data; the same vectors as :func:`embed_local`.

    ``ray.data.from_items(jobs).map_batches(<actor class>, compute=ActorPoolStrategy(...))``:
    each actor builds the encoder once with ``create_encoder(**encoder_kwargs)``, sets its torch
    threads, and embeds each job's K views as one ``Encoder.embed`` batch, exactly as
    :func:`embed_local` does.  Results stream back while the cluster works, so the caller can
    commit them in batches.

    When this process is already connected to Ray (``ray.init`` was called), that connection
    is used and ``address`` is ignored; otherwise this connects on the first ``next()`` and
    disconnects (stopping the cluster it started, for ``"local"``) when the iterator is
    exhausted or closed, unless ``address`` is a :class:`RayConnection`, which stays connected
    for the next call until it is closed.

    Args:
        jobs: the reference images; their paths must exist on every node (a relative path is
            made absolute against this process's working directory).
        encoder_kwargs: keyword arguments of :func:`retailklip.encoders.create_encoder`
            (``spec``, ``weights``, ``random_init``, ``center``, ``device``, backend options
            such as ``interpolation``), e.g. ``Catalog.encoder_kwargs()``; sent to the workers
            (a ``weights`` path must name the same file on every node).
        augmentations: K, views per reference (>= 1).
        seed: augmentation seed.
        address: ``"auto"`` (a running cluster: ``$RAY_ADDRESS`` or one started on this machine
            with ``ray start``), ``"local"`` (start a throw-away local cluster), ``"HOST:PORT"``
            (the head node's GCS address) or ``"ray://HOST:PORT"`` (Ray Client); or a
            :class:`RayConnection` shared with other calls.
        num_workers: number of actors, each with its own encoder; None: an autoscaling pool of
            1 .. as many as the cluster's CPUs allow (``threads_per_worker`` CPUs each).
        batch_size: references per Ray batch (>= 1).
        threads_per_worker: torch intra-op threads per actor, also the CPUs Ray reserves for it.
        identity: the catalog's encoder identity; every actor checks that it built the same
            encoder and fails with :class:`~retailklip.errors.EncoderMismatchError` otherwise.
        progress: show Ray Data's progress bars.

    Yields:
        ``(reference_id, vectors)`` — float32 (K, D) unit rows — in completion order (not
        necessarily job order), each job exactly once.

    Raises:
        ValueError: bad ``augmentations``, ``seed``, ``num_workers``, ``batch_size`` or
            ``threads_per_worker``.
        CatalogError: Ray is not installed (``pip install 'retailklip[ray]'``), the cluster
            cannot be reached, or the Ray job failed for a reason of Ray's own.
        InvalidImageError: a reference image cannot be read on a node (names reference id,
            path and node).
        WeightsError, EncoderMismatchError, RetailKlipError: the encoder cannot be built on a
            node, or is not ``identity``.
    """
    _check_args(augmentations, seed)
    for name, val in (("batch_size", batch_size), ("threads_per_worker", threads_per_worker)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise ValueError(f"num_workers must be None or an integer >= 1, got {num_workers!r}")
    if "spec" not in encoder_kwargs:
        raise ValueError("encoder_kwargs must name the encoder: {'spec': 'BACKEND:MODEL', ...}")
    # a relative path would be resolved against each worker's own working directory
    items = [{"reference_id": int(j.reference_id), "path": os.path.abspath(j.path), "noun": j.noun} for j in jobs]
    return _ray_results(items, dict(encoder_kwargs), augmentations, seed, address, num_workers, batch_size,
                        threads_per_worker, identity, progress)


def _ray_results(items, encoder_kwargs, k, seed, address, num_workers, batch_size, threads, identity,
                 progress) -> Iterator[tuple[int, np.ndarray]]:
    if not items:
        return
    own = not isinstance(address, RayConnection)
    connection = RayConnection(address) if own else address
    ray = connection.connect()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    data_log = logging.getLogger("ray.data")
    saved_level = data_log.level
    seen = 0
    what = jobs_noun([it["noun"] for it in items])
    try:
        ctx.enable_progress_bars, ctx.print_on_execution_start = progress, progress
        if not progress:  # Ray Data logs each execution's start, end and "progress bars disabled"
            data_log.setLevel(logging.ERROR)
        if num_workers is None:
            compute = ray.data.ActorPoolStrategy(min_size=1, max_size=None)
        else:
            compute = ray.data.ActorPoolStrategy(size=num_workers)
        ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // batch_size)).map_batches(
            RayEmbedder,
            fn_constructor_kwargs=dict(encoder_kwargs=encoder_kwargs, augmentations=k, seed=seed,
                                       threads=threads, identity=identity),
            batch_size=batch_size,
            batch_format="numpy",
            compute=compute,
            num_cpus=threads,
        )
        # Closed before any ray.shutdown() below: closing the generator shuts Ray Data's executor
        # down now.  Left to garbage collection after an error, its threads touched the shut-down
        # Ray worker later and Ray ended the whole process ("The core worker has already been
        # shutdown ... The process will exit"), which killed a pytest worker in CI.
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            for out in batches:
                for rid, blob, dim, err, noun in zip(out["reference_id"], out["vectors"], out["dim"], out["error"],
                                                     out["noun"]):
                    if err:
                        raise_worker_error(str(err))
                    v = decode_vectors(blob, int(dim))
                    if v.shape[0] != k:
                        raise CatalogError(
                            f"{noun} {int(rid)}: a Ray worker returned {v.shape[0]} vectors, expected K = {k}"
                        )
                    seen += 1
                    yield int(rid), v
        except RetailKlipError:
            raise
        except Exception as e:  # a Ray failure (actor died, object lost, worker import error, ...)
            root = _root_cause(e)
            first = (str(root).strip().splitlines() or [""])[0]
            raise CatalogError(
                f"Ray embedding failed after {seen} of {len(items)} {what}: {type(root).__name__}: {first}"
            ) from e
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if seen != len(items):
            raise CatalogError(f"Ray embedding returned {seen} results for {len(items)} {what}")
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
        data_log.setLevel(saved_level)
        if own:
            connection.close()
