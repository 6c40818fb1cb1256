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


#: The ways a weights file can fail to be read (the ``problem`` passed to a message function).
MISSING, NOT_A_FILE, EMPTY, UNSAFE, UNREADABLE, NOT_A_STATE_DICT = (
    "missing", "not a file", "empty", "unsafe", "unreadable", "not a state dict",
)

#: ``message(problem, path, detail) -> str``: the error text for a weights file that cannot be
#: read; ``detail`` is the decoder's first error line (UNSAFE, UNREADABLE), else "".
FileMessage = Callable[[str, Path, str], str]


def weights_file_message(problem: str, path: Path, detail: str, flag: str = "--weights") -> str:
    """The error text of :func:`load_state_dict` for a ``--weights`` file (the default)."""
    return {
        MISSING: f"weights file {path} not found (pass an existing file with {flag})",
        NOT_A_FILE: f"weights path {path} is not a regular file (pass a file with {flag})",
        EMPTY: f"weights file {path} is empty",
        UNSAFE: f"weights file {path} is a pickle that carries code or non-tensor objects; refused "
        f"(only safetensors or plain tensor state dicts are loaded)",
        UNREADABLE: f"weights file {path} is not a readable safetensors or PyTorch state dict ({detail})",
        NOT_A_STATE_DICT: f"weights file {path} does not hold a state dict of tensors",
    }[problem]


def check_weights_file(path: str | os.PathLike, flag: str = "--weights", *, message: FileMessage | None = None) -> Path:
    """Check that ``path`` (``~`` expanded) is an existing, non-empty regular file.

    Args:
        flag: the command-line flag the default message names.
        message: builds the error text (default :func:`weights_file_message`).

    Raises:
        WeightsError: missing, not a regular file, or empty.
    """
    msg = message or (lambda problem, p, detail: weights_file_message(problem, p, detail, flag))
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(msg(MISSING, p, ""))
    if not p.is_file():
        raise WeightsError(msg(NOT_A_FILE, p, ""))
    if p.stat().st_size == 0:
        raise WeightsError(msg(EMPTY, p, ""))
    return p


def load_state_dict(
    path: str | os.PathLike, flag: str = "--weights", *, message: FileMessage | None = None
) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.safetensors`` file or a PyTorch checkpoint, without running
    pickled code (the one reader of encoder weights and segmenter checkpoints).

    A file named ``*.safetensors``, or starting with a safetensors header, is read by
    ``safetensors.torch.load_file``; anything else by ``torch.load(..., weights_only=True)``.
    Wrappers are unwrapped: ``{"state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``, and
    a ``module.`` prefix (DataParallel / DistributedDataParallel) is stripped from every key.

    Args:
        path: weights file.
        flag: the command-line flag the default messages name.
        message: builds each error text from ``(problem, path, detail)`` (default
            :func:`weights_file_message`).

    Returns:
        Mapping of parameter name (str) to tensor (on the CPU).

    Raises:
        WeightsError: missing, empty, corrupt, unsafe (pickled code) or non-state-dict file.
    """
    import torch

    msg = message or (lambda problem, p, detail: weights_file_message(problem, p, detail, flag))
    p = check_weights_file(path, message=msg)
    with open(p, "rb") as f:
        head = f.read(8)
    try:
        if p.suffix == ".safetensors" or _looks_like_safetensors(head, p):
            from safetensors.torch import load_file

            sd: object = load_file(str(p), device="cpu")
        else:
            with warnings.catch_warnings():  # the error below says it in one line
                warnings.simplefilter("ignore", UserWarning)
                sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load on garbage raises anything (IndexError, KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        unsafe = "weights_only" in str(e) or "Unsupported global" in str(e) or "UnpicklingError" in type(e).__name__
        raise WeightsError(msg(UNSAFE if unsafe else UNREADABLE, p, first)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise WeightsError(msg(NOT_A_STATE_DICT, p, ""))
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


def load_state_dict_strict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    what: str,
    *,
    optional: Callable[[str], bool] = lambda key: False,
    message: Callable[[str], str] | None = None,
) -> None:
    """Load ``state_dict`` into ``module`` after checking that it fits exactly.

    Args:
        module: target module (parameters are overwritten in place).
        state_dict: tensors to load (keys already in the module's naming).
        path: where the tensors came from, for the default message.
        what: the model's name, for the default message.
        optional: keys of the module that may be absent from ``state_dict`` (e.g. BatchNorm
            ``num_batches_tracked`` counters, which do not affect inference); they keep the
            module's own values.
        message: builds the error text from the :func:`state_dict_mismatch` description
            (default ``weights file PATH does not fit WHAT: <mismatch>``).

    Raises:
        WeightsError: a missing (non-optional) or unexpected key, or a shape mismatch.
    """
    own = module.state_dict()
    problem = state_dict_mismatch(own, state_dict, optional=optional)
    if problem:
        raise WeightsError(message(problem) if message else f"weights file {path} does not fit {what}: {problem}")
    full = dict(state_dict)
    for k, v in own.items():
        full.setdefault(k, v)  # only optional keys are absent here
    module.load_state_dict(full, strict=True)
