"""Reading checkpoints safely and remapping the official EfficientViT-SAM key layout.

The official ``efficientvit_sam_*.pt`` files (``mit-han-lab/efficientvit``) hold a raw state
dict or ``{"state_dict": ...}`` keyed by the official module tree. Our modules are timm's, so a
few key prefixes differ; :func:`official_to_local_key` / :func:`local_to_official_key` are
exact inverses:

==========================================================  ==========================================
official                                                    local
==========================================================  ==========================================
``image_encoder.backbone.stages.0.op_list.0.*``             ``image_encoder.backbone.stem.in_conv.*``
``image_encoder.backbone.stages.0.op_list.{k>=1}.*``        ``image_encoder.backbone.stem.res{k-1}.*``
``image_encoder.backbone.stages.{s>=1}.op_list.{k}.*``      ``image_encoder.backbone.stages.{s-1}.blocks.{k}.*``
``image_encoder.neck.input_ops.{i}.op_list.0.*``            ``image_encoder.neck.inputs.{i}.*``
``image_encoder.neck.middle.op_list.{k}.*``                 ``image_encoder.neck.blocks.{k}.*``
``image_encoder.neck.output_ops.0.op_list.0.*``             ``image_encoder.neck.out_conv.*``
==========================================================  ==========================================

Everything else (inner block names, ``image_encoder.norm``, ``prompt_encoder.*``,
``mask_decoder.*``) is identical.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from ..weights import state_dict_mismatch

logger = logging.getLogger(__name__)

_P = r"^image_encoder\."
_OFFICIAL_TO_LOCAL: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(_P + r"backbone\.stages\.0\.op_list\.0\.(.+)$"), lambda m: f"image_encoder.backbone.stem.in_conv.{m[1]}"),
    (
        re.compile(_P + r"backbone\.stages\.0\.op_list\.(\d+)\.(.+)$"),
        lambda m: f"image_encoder.backbone.stem.res{int(m[1]) - 1}.{m[2]}",
    ),
    (
        re.compile(_P + r"backbone\.stages\.(\d+)\.op_list\.(\d+)\.(.+)$"),
        lambda m: f"image_encoder.backbone.stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}",
    ),
    (re.compile(_P + r"neck\.input_ops\.(\d+)\.op_list\.0\.(.+)$"), lambda m: f"image_encoder.neck.inputs.{m[1]}.{m[2]}"),
    (re.compile(_P + r"neck\.middle\.op_list\.(\d+)\.(.+)$"), lambda m: f"image_encoder.neck.blocks.{m[1]}.{m[2]}"),
    (re.compile(_P + r"neck\.output_ops\.0\.op_list\.0\.(.+)$"), lambda m: f"image_encoder.neck.out_conv.{m[1]}"),
]
_LOCAL_TO_OFFICIAL: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(_P + r"backbone\.stem\.in_conv\.(.+)$"), lambda m: f"image_encoder.backbone.stages.0.op_list.0.{m[1]}"),
    (
        re.compile(_P + r"backbone\.stem\.res(\d+)\.(.+)$"),
        lambda m: f"image_encoder.backbone.stages.0.op_list.{int(m[1]) + 1}.{m[2]}",
    ),
    (
        re.compile(_P + r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)$"),
        lambda m: f"image_encoder.backbone.stages.{int(m[1]) + 1}.op_list.{m[2]}.{m[3]}",
    ),
    (re.compile(_P + r"neck\.inputs\.(\d+)\.(.+)$"), lambda m: f"image_encoder.neck.input_ops.{m[1]}.op_list.0.{m[2]}"),
    (re.compile(_P + r"neck\.blocks\.(\d+)\.(.+)$"), lambda m: f"image_encoder.neck.middle.op_list.{m[1]}.{m[2]}"),
    (re.compile(_P + r"neck\.out_conv\.(.+)$"), lambda m: f"image_encoder.neck.output_ops.0.op_list.0.{m[1]}"),
]


def _apply(rules: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]], key: str) -> str:
    for pattern, repl in rules:
        m = pattern.match(key)
        if m:
            return repl(m)
    return key


def official_to_local_key(key: str) -> str:
    """Map an official EfficientViT-SAM state-dict key to ours (identity where names agree)."""
    return _apply(_OFFICIAL_TO_LOCAL, key)


def local_to_official_key(key: str) -> str:
    """Map one of our EfficientViT-SAM state-dict keys to the official name (inverse of
    :func:`official_to_local_key`)."""
    return _apply(_LOCAL_TO_OFFICIAL, key)


def to_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of :class:`~retailklip.segment.modeling.EfficientViTSam` to the official
    layout, e.g. to save a checkpoint the official code loads."""
    return {local_to_official_key(k): v for k, v in state_dict.items()}


def _no_checkpoint_hint(expected_file: str | None) -> str:
    what = f"the official {expected_file}" if expected_file else "a checkpoint file"
    return f"pass {what} with --checkpoint FILE (checkpoint=... in load_segmenter); nothing is downloaded"


def read_state_dict(path: str | os.PathLike, *, name: str, expected_file: str | None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict, without executing pickled code.

    Accepts a PyTorch file (``torch.load(..., weights_only=True)``) holding a state dict or a
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper, or a ``.safetensors`` file. A
    ``module.`` prefix (saved from ``DataParallel``) is stripped.

    Args:
        path: checkpoint file.
        name: segmenter name, for messages.
        expected_file: file name of the official checkpoint, for messages.

    Returns:
        The state dict, tensors on the CPU.

    Raises:
        WeightsError: missing, unreadable, unsafe (pickled code) or not a state dict.
    """
    p = Path(path)
    hint = _no_checkpoint_hint(expected_file)
    if not p.exists():
        raise WeightsError(f"{name}: checkpoint {p} not found; {hint}")
    if not p.is_file():
        raise WeightsError(f"{name}: checkpoint {p} is not a regular file; {hint}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load on garbage raises anything (IndexError, KeyError, ...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{name}: cannot read checkpoint {p} as a safe PyTorch state dict ({reason}); {hint}") from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise WeightsError(f"{name}: checkpoint {p} does not hold a state dict of tensors; {hint}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str,
    source: str,
    expected_file: str | None,
    key_map: Callable[[str], str] | None = None,
) -> None:
    """Load ``state_dict`` into ``model`` strictly, after renaming keys with ``key_map``.

    BatchNorm ``num_batches_tracked`` counters absent from the file are tolerated (they do
    not affect inference). Any other missing or unexpected key, or any shape mismatch, is an
    error that lists a few offenders.

    Args:
        model: target module (parameters are overwritten in place).
        state_dict: tensors to load.
        name: segmenter name, for messages.
        source: where the tensors came from (a path), for messages.
        expected_file: file name of the official checkpoint, for messages.
        key_map: renames a file key to a model key (e.g. :func:`official_to_local_key`).

    Raises:
        WeightsError: the keys or shapes are not those of ``name``.
    """
    mapped = {(key_map(k) if key_map else k): v for k, v in state_dict.items()}
    own = model.state_dict()
    problem = state_dict_mismatch(own, mapped, optional=lambda k: k.endswith("num_batches_tracked"))
    if problem:
        raise WeightsError(f"{name}: {source} is not a {name} checkpoint: {problem}; {_no_checkpoint_hint(expected_file)}")
    for k, v in own.items():
        if k not in mapped:  # only num_batches_tracked reaches here
            mapped[k] = v
    model.load_state_dict(mapped, strict=True)
    logger.info("loaded %d tensors into %s from %s", len(state_dict), name, source)
