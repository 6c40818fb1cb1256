"""Where and in what precision models run: device names -> usable ``torch.device``, and the
autocast context of a precision name.

::

    dev = resolve_device("cuda:1")          # DeviceError at once if there is no such GPU
    with autocast(dev, "bf16"):             # nullcontext() for "fp32"
        feats = model(batch.to(dev))

Imported only by modules that run models (they import torch anyway); ``import retailklip``
and the catalog commands without a model never import it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from .errors import RetailKlipError

#: Precision names -> the dtype a forward pass is autocast to (``"fp32"``: no autocast).
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RetailKlipError, ValueError):
    """A device that cannot be parsed or is not available on this machine."""


def resolve_device(spec: str | torch.device, *, error: type[Exception] = DeviceError) -> torch.device:
    """Parse a device name and check that this machine has it.

    Args:
        spec: ``"auto"`` (``cuda`` when a CUDA GPU is available, else ``cpu``), a torch device
            string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or a ``torch.device``.
        error: the exception class raised (default :class:`DeviceError`), so that a component
            reports the device among its own option errors (e.g. ``SegmenterOptionError``).

    Returns:
        The ``torch.device``.

    Raises:
        error: one line naming ``spec`` and the remedy: an unparsable name, CUDA or MPS asked
            for where it is not available, or a CUDA index beyond the GPUs present.
    """
    if isinstance(spec, str) and spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as e:
        raise error(f"invalid device {spec!r} ({e}); use e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"device {spec!r} requested but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise error(f"device {spec!r} requested but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise error(f"device {spec!r} requested but MPS is not available here; use --device cpu")
    return dev


def autocast(device: str | torch.device, precision: str) -> AbstractContextManager:
    """The context a forward pass runs in for ``precision`` on ``device``.

    Args:
        device: where the model runs (its type picks the autocast backend).
        precision: a :data:`PRECISIONS` name: ``"fp32"`` (a no-op context), ``"bf16"`` or ``"fp16"``
            (``torch.autocast`` to that dtype; outputs of autocast ops are in that dtype).

    Raises:
        ValueError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=PRECISIONS[precision])
