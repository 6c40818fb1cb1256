"""Reading model weights from local files, safely.

Only two formats are read: safetensors (preferred: no code can ride along) and PyTorch pickles
through ``torch.load(weights_only=True)``, which refuses any pickle that would construct
arbitrary objects (a checkpoint "carrying code").  Nothing here downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover - torch is imported where state dicts are read
    import torch

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file's bytes (the weights' identity stored with every vector)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_weights_file(path: str | os.PathLike, flag: str = "--weights") -> Path:
    """Check that ``path`` is an existing, non-empty regular file.

    Raises:
        WeightsError: naming the file and the command-line flag that sets it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"weights file {p} not found (pass an existing file with {flag})")
    if not p.is_file():
        raise WeightsError(f"weights path {p} is not a regular file (pass a file with {flag})")
    if p.stat().st_size == 0:
        raise WeightsError(f"weights file {p} is empty")
    return p


def load_state_dict(path: str | os.PathLike, flag: str = "--weights") -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file or a PyTorch checkpoint.

    PyTorch checkpoints are read with ``torch.load(..., weights_only=True)``.  Wrappers are
    unwrapped: ``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``, and a ``module.``
    prefix (DistributedDataParallel) is stripped from every key.

    Args:
        path: weights file.
        flag: the command-line flag to name in errors.

    Returns:
        Mapping of parameter name to tensor (on the CPU).

    Raises:
        WeightsError: missing, empty, corrupt, unsafe (pickled code) or non-state-dict file.
    """
    import torch

    p = check_weights_file(path, flag)
    with open(p, "rb") as f:
        head = f.read(8)
    try:
        if p.suffix == ".safetensors" or _looks_like_safetensors(head, p):
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            with warnings.catch_warnings():  # the error below says it in one line
                warnings.simplefilter("ignore", UserWarning)
                sd = torch.load(p, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is the file's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "UnpicklingError" in type(e).__name__:
            raise WeightsError(
                f"weights file {p} is a pickle that carries code or non-tensor objects; refused "
                f"(only safetensors or plain tensor state dicts are loaded)"
            ) from None
        raise WeightsError(f"weights file {p} is not a readable safetensors or PyTorch state dict ({first})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights file {p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _looks_like_safetensors(head: bytes, p: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    if len(head) < 8:
        return False
    n = int.from_bytes(head, "little")
    if not 0 < n < 100_000_000:
        return False
    with open(p, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


class KeyValueError(ValueError, argparse.ArgumentTypeError):
    """A malformed ``KEY=VALUE`` option: a ``ValueError`` for library callers, and an
    ``ArgumentTypeError`` so that ``argparse`` prints its message as the usage error."""


def parse_key_value(text: str) -> tuple[str, object]:
    """Parse a ``KEY=VALUE`` command-line option; VALUE is JSON when it parses, else a string.
    Usable directly as an ``argparse`` ``type=``.

    Raises:
        KeyValueError (a ValueError): no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise KeyValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def state_dict_mismatch(
    own: Mapping[str, torch.Tensor],
    given: Mapping[str, torch.Tensor],
    *,
    optional: Callable[[str], bool] = lambda key: False,
) -> str | None:
    """Describe how ``given`` fails to fit a module's state dict ``own``, or None if it fits.

    Args:
        own: the module's ``state_dict()``.
        given: tensors to load.
        optional: keys of ``own`` that may be absent from ``given`` (e.g. BatchNorm
            ``num_batches_tracked`` counters).

    Returns:
        ``"N missing keys (e.g. ...); N unexpected keys (e.g. ...); N shape mismatches (e.g. ...)"``
        (only the parts that apply), or None.
    """
    missing = [k for k in own if k not in given and not optional(k)]
    unexpected = [k for k in given if k not in own]
    mismatched = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in given and tuple(given[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:2])})")
    return "; ".join(problems) or None


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path, what: str) -> None:
    """Load ``state_dict`` into ``module`` after checking it fits exactly.

    Raises:
        WeightsError: ``weights file PATH does not fit WHAT: <mismatch>``.
    """
    problem = state_dict_mismatch(module.state_dict(), state_dict)
    if problem:
        raise WeightsError(f"weights file {path} does not fit {what}: {problem}")
    module.load_state_dict(state_dict, strict=True)
