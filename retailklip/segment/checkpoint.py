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

from ..weights import EMPTY, MISSING, NOT_A_FILE, NOT_A_STATE_DICT, load_state_dict, load_state_dict_strict

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
    return f"pass {what} with --checkpoint FILE (checkpoint=... in load_segmenter)"


def read_state_dict(path: str | os.PathLike, *, name: str, expected_file: str | None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict, without executing pickled code.

    The reading is :func:`retailklip.weights.load_state_dict` (safetensors, or
    ``torch.load(..., weights_only=True)``; ``state_dict`` / ``model`` / ``module`` wrappers and a
    ``module.`` key prefix removed); only the messages are the segmenter's, naming ``name``, the
    official file and ``--checkpoint``.

    Args:
        path: checkpoint file.
        name: segmenter name, for messages.
        expected_file: file name of the official checkpoint, for messages.

    Returns:
        The state dict, tensors on the CPU.

    Raises:
        WeightsError: missing, empty, unreadable, unsafe (pickled code) or not a state dict.
    """
    hint = _no_checkpoint_hint(expected_file)

    def message(problem: str, p: Path, detail: str) -> str:
        if problem == MISSING:
            return f"{name}: checkpoint {p} not found; {hint}"
        if problem == NOT_A_FILE:
            return f"{name}: checkpoint {p} is not a regular file; {hint}"
        if problem == NOT_A_STATE_DICT:
            return f"{name}: checkpoint {p} does not hold a state dict of tensors; {hint}"
        reason = detail or ("empty file" if problem == EMPTY else problem)
        return f"{name}: cannot read checkpoint {p} as a safe PyTorch state dict ({reason}); {hint}"

    return load_state_dict(path, message=message)


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    name: str,
    source: str,
    expected_file: str | None,
    key_map: Callable[[str], str] | None = None,
) -> None:
    """Load ``state_dict`` into ``model`` strictly, after renaming keys with ``key_map``
    (:func:`retailklip.weights.load_state_dict_strict` with the segmenter's message).

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
    load_state_dict_strict(
        model,
        mapped,
        source,
        name,
        optional=lambda k: k.endswith("num_batches_tracked"),
        message=lambda problem: f"{name}: {source} is not a {name} checkpoint: {problem}; {_no_checkpoint_hint(expected_file)}",
    )
    logger.info("loaded %d tensors into %s from %s", len(state_dict), name, source)
