"""What made a vector: the :class:`EncoderIdentity` stored with every vector (no torch needed to
read or compare it, so catalog commands that only list or check do not import torch)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from ..errors import EncoderMismatchError


@dataclass(frozen=True)
class EncoderIdentity:
    """What made a vector; stored with every vector, compared before any search.

    Attributes:
        backend: the encoder backend (a name of ``list_encoders()``), e.g. ``"open_clip"`` or ``"timm"``.
        model: the backend's model name, e.g. ``"ViT-L-14"`` or ``"mobilenetv2_100"``.
        weights: ``"sha256:<hex>"`` of a local weights file, ``"tag:<pretrained tag>"`` for a
            backend's named pretrained weights, or ``"random:<seed>"`` for random init (tests).
        dim: embedding dimension D.
        preprocess: canonical JSON of the preprocessing settings (size, resize mode, mean, std,
            interpolation, background), so vectors made with different preprocessing never mix.
        center: ``"none"``, or ``"sha256:<hex>"`` of the float32 feature-centering vector
            subtracted before normalisation (see :class:`Encoder`).
    """

    backend: str
    model: str
    weights: str
    dim: int
    preprocess: str
    center: str = "none"

    @property
    def key(self) -> str:
        """A short stable string for this identity: ``backend:model@weights[:12]/d=D/p=<hash>``."""
        phash = hashlib.sha256(self.preprocess.encode()).hexdigest()[:8]
        weights = self.weights if len(self.weights) <= 40 else self.weights[:19]
        center = "" if self.center == "none" else f"/c={self.center[7:15]}"
        return f"{self.backend}:{self.model}@{weights}/d={self.dim}/p={phash}{center}"

    def to_dict(self) -> dict:
        return asdict(self)

    def check_same(self, other: EncoderIdentity) -> None:
        """Raise :class:`EncoderMismatchError` unless ``other`` is the same identity."""
        if self != other:
            raise EncoderMismatchError(
                f"encoder mismatch: vectors were made by {other.key} but the encoder is {self.key}; "
                f"rebuild the catalog with one encoder"
            )
