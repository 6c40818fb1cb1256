"""The image encoder: images -> L2-normalised embeddings.

An :class:`Encoder` wraps a backbone (``model``: a ``torch.nn.Module`` mapping a float batch of
shape (N, 3, H, W) to features of shape (N, D)) and its preprocessing (``preprocess``: a PIL
``RGB`` image -> float tensor (3, H, W)).  Backends (OpenCLIP, timm) only build those two things;
batching, precision, EXIF/mode handling, transparency compositing and normalisation live here, so
every backend behaves the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from ..devices import PRECISIONS, autocast
from ..images import DEFAULT_BACKGROUND, ImageSource, limit_aspect_ratio, load_image, to_rgb
from .identity import EncoderIdentity

logger = logging.getLogger(__name__)

class Encoder:
    """Embeds images into float32, L2-normalised vectors of shape (N, D).

    Args:
        model: module mapping (N, 3, H, W) float -> (N, D) features; put in eval mode here.
        preprocess: PIL ``RGB`` image -> float tensor (3, H, W).
        identity: the :class:`EncoderIdentity` of this model + weights + preprocessing.
        device: torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast for the forward pass; outputs
            are always float32).
        batch_size: images per forward pass in :meth:`embed`.
        background: RGB colour that transparent pixels (e.g. outside a segment's mask) are
            composited onto before preprocessing.
        center: optional float32 (D,) vector subtracted from the features before L2
            normalisation ("CL2N" feature transform of SimpleShot, Wang et al. 2019, §3.1): the
            mean feature of unlabeled in-store photos (:meth:`mean_feature`).  It removes the
            component that all photos of the store share, which otherwise dominates the cosine
            similarity of non-negative CNN features.  Part of the identity.
        groups: the D features are ``groups`` equal consecutive parts (e.g. one per input scale,
            :class:`~retailklip.encoders.multiscale.MultiScalePooled`), or consecutive parts of
            the given widths (a sequence of ints summing to D, e.g. (1280, 320)), each centred
            and L2-normalised on its own and scaled by 1/sqrt(number of parts): the embedding
            still has unit norm and the cosine similarity of two embeddings is the mean of the
            parts' cosine similarities.  1 (the default): plain L2 normalisation.

    Thread safety: :meth:`embed` may be called from several threads at once (inference only,
    no mutable state).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        identity: EncoderIdentity,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 32,
        background: tuple[int, int, int] = DEFAULT_BACKGROUND,
        center: np.ndarray | None = None,
        groups: int | Sequence[int] = 1,
    ) -> None:
        check_groups(groups, identity.dim)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.precision = precision
        self.batch_size = batch_size
        self.background = tuple(background)
        self.groups = groups if isinstance(groups, int) else tuple(groups)
        self.center: torch.Tensor | None = None
        if center is not None:
            c = np.array(center, dtype=np.float32)  # a private, writable copy
            if c.shape != (identity.dim,):
                raise ValueError(f"center must have shape ({identity.dim},), got {c.shape}")
            self.center = torch.from_numpy(c)
            identity = replace(identity, center="sha256:" + hashlib.sha256(c.tobytes()).hexdigest())
        self.identity = identity

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self.identity.dim

    def prepare(self, image: ImageSource, *, decoded: bool = False) -> torch.Tensor:
        """Decode (EXIF, mode), bound the aspect ratio (:func:`~retailklip.images.limit_aspect_ratio`),
        composite transparency and preprocess one image -> (3, H, W) float32.

        Args:
            image: anything :func:`~retailklip.images.load_image` reads.
            decoded: ``image`` is an upright ``RGB``/``RGBA`` PIL image as ``load_image``
                returns it (e.g. a segment crop): used as it is, not decoded again.
        """
        im = limit_aspect_ratio(image if decoded else load_image(image))
        return self.preprocess(to_rgb(im, self.background))

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward a preprocessed batch (N, 3, H, W) -> raw float32 features (N, D) on the CPU."""
        with autocast(self.device, self.precision):
            feats = self.model(batch.to(self.device, non_blocking=True))
        return feats.float().cpu()

    def embed_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward a preprocessed batch (N, 3, H, W) -> L2-normalised float32 (N, D) on the CPU
        (centred first when the encoder has a ``center``; each of the ``groups`` parts normalised
        on its own)."""
        return normalize_embeddings(self.features(batch), center=self.center, groups=self.groups)

    def mean_feature(self, images: Sequence[ImageSource], *, progress: bool = False) -> np.ndarray:
        """Mean raw feature (D,) float32 of images, e.g. unlabeled in-store photos, to use as ``center``.

        Raises:
            ValueError: no images.  InvalidImageError: an image cannot be decoded.
        """
        return self.unlabeled_features(images, progress=progress)[0]

    def unlabeled_features(self, images: Sequence[ImageSource], *, progress: bool = False,
                           keep: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Mean raw feature of images and the raw features of some of them, in one pass.

        Args:
            images: e.g. unlabeled in-store photos.
            progress: tqdm progress bar over batches.
            keep: ascending indices into ``images`` whose raw features are returned too (e.g.
                the sample :mod:`retailklip.hubness` keeps; memory grows with ``len(keep)``
                only).

        Returns:
            ``(mean, kept)``: float32 (D,) mean raw feature (accumulated in float64), float32
            (len(keep), D) raw features (not centred, not normalised; see :meth:`normalize`).

        Raises:
            ValueError: no images, or ``keep`` not ascending indices into them.
            InvalidImageError: an image cannot be decoded.
        """
        if len(images) == 0:
            raise ValueError("mean_feature needs at least one image")
        keep = np.asarray(keep, np.int64)
        if len(keep) and (keep[0] < 0 or keep[-1] >= len(images) or (np.diff(keep) <= 0).any()):
            raise ValueError("keep must be ascending indices into the images")
        total = torch.zeros(self.dim, dtype=torch.float64)
        kept, start = [], 0
        for batch in self._batches(images, progress, "centering"):
            feats = self.features(batch)
            total += feats.double().sum(0)
            rows = keep[(keep >= start) & (keep < start + len(feats))] - start
            kept.append(feats[torch.from_numpy(rows)].numpy())
            start += len(feats)
        return (total / len(images)).float().numpy(), np.concatenate(kept).astype(np.float32, copy=False)

    def normalize(self, features: np.ndarray) -> np.ndarray:
        """Raw features float (N, D) -> float32 (N, D) embeddings exactly as :meth:`embed` makes
        them from the same images (this encoder's centre and groups applied)."""
        feats = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        return normalize_embeddings(feats, center=self.center, groups=self.groups).numpy()

    def with_center(self, center: np.ndarray | None) -> Encoder:
        """A copy of this encoder (sharing the model) with another centering vector (D,) or none."""
        ident = replace(self.identity, center="none")
        return Encoder(
            self.model, self.preprocess, ident, device=str(self.device), precision=self.precision,
            batch_size=self.batch_size, background=self.background, center=center, groups=self.groups,
        )

    def _batches(self, images: Sequence[ImageSource], progress: bool, desc: str, decoded: bool = False):
        starts = range(0, len(images), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=desc, unit="batch")
        for s in starts:
            yield torch.stack([self.prepare(im, decoded=decoded) for im in images[s : s + self.batch_size]])

    def embed(self, images: Sequence[ImageSource], *, progress: bool = False, decoded: bool = False) -> np.ndarray:
        """Embed images.

        Args:
            images: paths, bytes, PIL images (any mode; RGBA is composited onto ``background``)
                or uint8 numpy arrays.
            progress: show a tqdm progress bar over batches.
            decoded: the images are upright ``RGB``/``RGBA`` PIL images as
                :func:`~retailklip.images.load_image` returns them (e.g. segment crops): used
                as they are, not decoded again (same embeddings, no copies).

        Returns:
            float32 array of shape (N, D), each row of unit L2 norm.

        Raises:
            InvalidImageError: an image cannot be decoded (nothing is returned for the batch).
        """
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = [self.embed_tensor(b).numpy() for b in self._batches(images, progress, "embedding", decoded)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"Encoder({self.identity.key}, device={self.device}, precision={self.precision})"


def check_groups(groups: object, dim: int) -> None:
    """Raise ValueError unless ``groups`` is a positive divisor of ``dim`` or a non-empty
    sequence of positive ints summing to ``dim`` (the parts' widths)."""
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1 or dim % groups:
            raise ValueError(f"groups must be a positive divisor of the dimension {dim}, got {groups!r}")
        return
    if (isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in groups) or sum(groups) != dim):
        raise ValueError(f"groups must be a positive divisor of the dimension {dim} or part widths summing to it, "
                         f"got {groups!r}")


def normalize_embeddings(feats: torch.Tensor, *, center: torch.Tensor | None = None,
                         groups: int | Sequence[int] = 1) -> torch.Tensor:
    """Raw features -> embeddings, as :meth:`Encoder.embed_tensor` makes them: ``center``
    subtracted, then each consecutive part L2-normalised on its own and scaled by
    1/sqrt(number of parts) (plain L2 normalisation for one part).

    Args:
        feats: float (N, D) raw features (any float dtype; the result has the same).
        center: optional (D,) centering vector.
        groups: number of equal parts (a divisor of D), or the parts' widths (summing to D).

    Returns:
        float (N, D), rows of unit L2 norm (0 for an all-zero part).
    """
    if center is not None:
        feats = feats - center
    widths = [feats.shape[1] // groups] * groups if isinstance(groups, int) else list(groups)
    parts = [torch.nn.functional.normalize(p, dim=-1) for p in torch.split(feats, widths, dim=1)]
    return torch.cat(parts, dim=1) / len(parts) ** 0.5


def preprocess_description(**settings) -> str:
    """Canonical JSON of preprocessing settings (sorted keys, tuples as lists)."""
    return json.dumps(settings, sort_keys=True, default=list)


def infer_dim(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """Embedding dimension D of ``model`` by one forward pass on zeros of shape (1, 3, *size)."""
    with torch.inference_mode():
        return int(model(torch.zeros(1, 3, *size)).shape[-1])
