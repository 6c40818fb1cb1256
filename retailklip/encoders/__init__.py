"""Image encoders: ``create_encoder("open_clip:ViT-L-14/laion2b_s32b_b82k")`` or ``create_encoder("timm:mobilenetv2_100", weights=...)``.

An encoder SPEC names a backend and a model, in the style of timm's ``create_model``:

* ``open_clip:MODEL/TAG`` — an open_clip architecture and pretrained tag, e.g. the default
  ``open_clip:ViT-L-14/laion2b_s32b_b82k`` (RetailKLIP §4: ViT-L/14 trained on LAION-2B);
  ``open_clip:MODEL`` with ``weights=FILE`` for a local checkpoint (e.g. a finetuned one).
* ``timm:MODEL`` — a timm model's pooled features; ``weights=FILE`` for local weights, otherwise
  timm's pretrained weights from the hub.

The backends are a table (:data:`~retailklip.encoders.registry.ENCODER_BACKENDS`): another backend
is one ``@register_encoder("NAME")`` builder (see :mod:`retailklip.encoders.registry`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import RetailKlipError
from ..images import DEFAULT_BACKGROUND
from .identity import EncoderIdentity
from .registry import ENCODER_BACKENDS, EncoderBackend, get_backend, list_encoders, register_encoder, spec_forms

if TYPE_CHECKING:  # pragma: no cover
    from .base import Encoder

DEFAULT_ENCODER_SPEC = "open_clip:ViT-L-14/laion2b_s32b_b82k"

__all__ = [
    "DEFAULT_ENCODER_SPEC", "ENCODER_BACKENDS", "Encoder", "EncoderBackend", "EncoderIdentity",
    "EncoderSpec", "create_encoder", "list_encoders", "register_encoder",
]


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder SPEC (see module docstring).

    Attributes:
        backend: a registered backend (:func:`list_encoders`), e.g. ``"open_clip"`` or ``"timm"``.
        model: the backend's model name.
        tag: pretrained tag (only backends registered with ``tags=True``, e.g. open_clip), or None.
    """

    backend: str
    model: str
    tag: str | None = None

    @classmethod
    def parse(cls, spec: str | EncoderSpec) -> EncoderSpec:
        """Parse ``BACKEND:MODEL[/TAG]`` against the registered backends.

        Raises:
            RetailKlipError: malformed spec, unknown backend (the message lists the registered
                forms), or a /TAG for a backend without tags.
        """
        if isinstance(spec, EncoderSpec):
            return spec
        backend, sep, rest = str(spec).partition(":")
        if not sep or not rest:
            raise RetailKlipError(f"bad encoder spec {spec!r}: expected {spec_forms()}")
        row = get_backend(backend, spec)
        model, _, tag = rest.partition("/")
        if not model:
            raise RetailKlipError(f"bad encoder spec {spec!r}: no model name")
        if tag and not row.tags:
            tagged = ", ".join(b.name for b in ENCODER_BACKENDS.values() if b.tags) or "no"
            raise RetailKlipError(f"bad encoder spec {spec!r}: only {tagged} specs take a /TAG")
        return cls(backend, model, tag or None)

    def __str__(self) -> str:
        return f"{self.backend}:{self.model}" + (f"/{self.tag}" if self.tag else "")


def create_encoder(
    spec: str | EncoderSpec = DEFAULT_ENCODER_SPEC,
    *,
    weights: str | os.PathLike | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    batch_size: int = 32,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    random_init: bool = False,
    seed: int = 0,
    center=None,
    **options,
) -> Encoder:
    """Create an image encoder from a SPEC.

    Args:
        spec: ``open_clip:MODEL/TAG``, ``open_clip:MODEL``, ``timm:MODEL`` or ``BACKEND:MODEL`` of
            another registered backend (see module docstring).
        weights: local weights file (safetensors or PyTorch state dict); overrides the tag.
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        batch_size: images per forward pass.
        background: RGB colour that transparent pixels are composited onto.
        random_init: random weights when no weights file is given (tests, benchmarks).
        seed: seed of ``random_init``.
        center: optional float32 (D,) feature-centering vector (see :class:`Encoder`).
        **options: backend options: open_clip ``resize_mode``, ``model_overrides``,
            ``cache_dir``; timm ``interpolation``, ``crop_pct``, ``crop_mode``, ``input_size``.

    Returns:
        An :class:`Encoder` producing float32 (N, D) L2-normalised embeddings.

    Raises:
        RetailKlipError: bad spec (unknown backends: the message lists the registered ones) or
            options; WeightsError / WeightsUnavailableError for weights.
    """
    s = EncoderSpec.parse(spec)
    builder = get_backend(s.backend, str(s)).builder
    common = {"device": device, "precision": precision, "batch_size": batch_size, "background": tuple(background), "center": center}
    try:
        return builder(s.model, s.tag, weights=weights, random_init=random_init, seed=seed, **options, **common)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise RetailKlipError(f"encoder {s}: {e}") from None
        raise


def __getattr__(name: str):
    """``Encoder`` (of :mod:`.base`, which imports torch) on first use, so that
    importing the package for a spec, a default or an :class:`EncoderIdentity` stays light."""
    if name == "Encoder":
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
