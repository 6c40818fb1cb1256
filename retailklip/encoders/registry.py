"""The encoder backends: one table, :data:`ENCODER_BACKENDS`, from a SPEC's ``BACKEND`` to its builder.

In the style of timm's ``register_model``: adding a backend is one decorated builder::

    from retailklip.encoders import register_encoder

    @register_encoder("mylib")
    def build(model, tag, *, weights, random_init, seed, device, precision, batch_size, background,
              center, **options):
        ...  # return a retailklip.encoders.Encoder

after which ``create_encoder("mylib:MODEL")`` builds it.  A builder is called as
``builder(model, tag, **kwargs)`` with ``tag`` None unless the backend takes tags
(``tags=True``: the ``BACKEND:MODEL/TAG`` form), and the keyword arguments of
:func:`~retailklip.encoders.create_encoder` (``weights``, ``random_init``, ``seed``, ``device``,
``precision``, ``batch_size``, ``background``, ``center``, plus the backend's own options).
The built-in builders import their library (and torch) only when called, so reading this table
stays light.  Remove a backend with ``del ENCODER_BACKENDS[name]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import RetailKlipError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Encoder

EncoderBuilder = Callable[..., "Encoder"]


@dataclass(frozen=True)
class EncoderBackend:
    """One row of :data:`ENCODER_BACKENDS`.

    Attributes:
        name: the ``BACKEND`` of a SPEC, e.g. ``"open_clip"``.
        builder: ``builder(model, tag, **kwargs) -> Encoder`` (see module docstring).
        tags: whether SPECs of this backend may name a pretrained tag (``BACKEND:MODEL/TAG``).
    """

    name: str
    builder: EncoderBuilder
    tags: bool = False

    @property
    def forms(self) -> tuple[str, ...]:
        """The SPEC forms of this backend, for messages: ``("open_clip:MODEL/TAG", "open_clip:MODEL")``."""
        return (f"{self.name}:MODEL/TAG", f"{self.name}:MODEL") if self.tags else (f"{self.name}:MODEL",)


#: Every encoder backend, by name (insertion order is the order messages list them in).
ENCODER_BACKENDS: dict[str, EncoderBackend] = {}


def register_encoder(name: str, builder: EncoderBuilder | None = None, *, tags: bool = False):
    """Register the builder of backend ``name``; usable as ``@register_encoder(name)``.

    Args:
        name: the SPEC's ``BACKEND`` (no ``:`` or ``/``).
        builder: ``builder(model, tag, **kwargs) -> Encoder``; omitted: returns a decorator.
        tags: SPECs of this backend may carry ``/TAG``.

    Returns:
        ``builder`` (or the decorator, which returns the function it decorates).

    Raises:
        ValueError: ``name`` is empty, contains ``:`` or ``/``, or is registered already.
    """

    def add(fn: EncoderBuilder) -> EncoderBuilder:
        if not name or ":" in name or "/" in name:
            raise ValueError(f"bad encoder backend name {name!r}")
        if name in ENCODER_BACKENDS:
            raise ValueError(f"encoder backend {name!r} is registered already")
        ENCODER_BACKENDS[name] = EncoderBackend(name, fn, tags)
        return fn

    return add if builder is None else add(builder)


def list_encoders() -> tuple[str, ...]:
    """Names of the registered encoder backends, e.g. ``("open_clip", "timm")``."""
    return tuple(ENCODER_BACKENDS)


def spec_forms() -> str:
    """The accepted SPEC forms, for messages: ``"open_clip:MODEL/TAG, open_clip:MODEL or timm:MODEL"``."""
    forms = [f for b in ENCODER_BACKENDS.values() for f in b.forms]
    return forms[0] if len(forms) == 1 else ", ".join(forms[:-1]) + " or " + forms[-1]


def get_backend(name: str, spec: str) -> EncoderBackend:
    """The row of backend ``name`` (of SPEC ``spec``, for the message).

    Raises:
        RetailKlipError: no such backend; the message lists the registered SPEC forms.
    """
    try:
        return ENCODER_BACKENDS[name]
    except KeyError:
        raise RetailKlipError(f"bad encoder spec {spec!r}: expected {spec_forms()}") from None


@register_encoder("open_clip", tags=True)
def _build_open_clip(model: str, tag: str | None, **kwargs) -> Encoder:
    from .open_clip_backend import create_open_clip_encoder

    return create_open_clip_encoder(model, tag, **kwargs)


@register_encoder("timm")
def _build_timm(model: str, tag: str | None, **kwargs) -> Encoder:
    from .timm_backend import create_timm_encoder

    return create_timm_encoder(model, **kwargs)
