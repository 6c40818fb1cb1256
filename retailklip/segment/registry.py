"""Segmenter names, their expected checkpoint files, and model creation by name.

In the style of ``timm.create_model``: one table of names (:data:`SEGMENTER_SPECS`), one
factory (:func:`create_model`). Nothing is ever downloaded: a model needs a local checkpoint,
or an explicit ``random_init=True`` (tests, benchmarks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from segment_anything import sam_model_registry
from torch import nn

from ..devices import resolve_device
from ..errors import WeightsError
from .checkpoint import load_state_dict_checked, official_to_local_key, read_state_dict
from .errors import SegmenterOptionError, UnknownSegmenterError
from .modeling.efficientvit_sam import EFFICIENTVIT_SAM_CONFIGS, build_efficientvit_sam

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterSpec:
    """What a segmenter name stands for.

    Attributes:
        name: registry name (the ``--segment`` value).
        family: ``"efficientvit-sam"``, ``"sam"`` (original SAM ViT) or ``"whole-image"``.
        checkpoint_file: file name of the official checkpoint, None when no weights are needed.
        url: where the official checkpoint is published (for messages/docs), or None.
    """

    name: str
    family: str
    checkpoint_file: str | None
    url: str | None


_EVIT_URL = "https://huggingface.co/mit-han-lab/efficientvit-sam"
_SAM_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"

#: Every valid segmenter name and its specification.
SEGMENTER_SPECS: dict[str, SegmenterSpec] = {
    **{
        name: SegmenterSpec(name, "efficientvit-sam", cfg.checkpoint_file, _EVIT_URL)
        for name, cfg in EFFICIENTVIT_SAM_CONFIGS.items()
    },
    "sam-vit-b": SegmenterSpec("sam-vit-b", "sam", "sam_vit_b_01ec64.pth", _SAM_URL),
    "sam-vit-l": SegmenterSpec("sam-vit-l", "sam", "sam_vit_l_0b3195.pth", _SAM_URL),
    "sam-vit-h": SegmenterSpec("sam-vit-h", "sam", "sam_vit_h_4b8939.pth", _SAM_URL),
    "whole-image": SegmenterSpec("whole-image", "whole-image", None, None),
}

#: Valid ``--segment`` names.
SEGMENTER_NAMES: tuple[str, ...] = tuple(SEGMENTER_SPECS)

_SAM_REGISTRY_KEYS = {"sam-vit-b": "vit_b", "sam-vit-l": "vit_l", "sam-vit-h": "vit_h"}


def get_spec(name: str) -> SegmenterSpec:
    """Specification of segmenter ``name``.

    Raises:
        UnknownSegmenterError: ``name`` is not in :data:`SEGMENTER_NAMES`.
    """
    try:
        return SEGMENTER_SPECS[name]
    except (KeyError, TypeError):
        raise UnknownSegmenterError(
            f"unknown segmenter {name!r}; choose --segment from: {', '.join(SEGMENTER_NAMES)}"
        ) from None


def missing_checkpoint_message(spec: SegmenterSpec) -> str:
    """The error text for a model segmenter created without a checkpoint."""
    return (
        f"segmenter {spec.name} needs its weights file {spec.checkpoint_file} (published at {spec.url}); "
        f"pass it with --checkpoint {spec.checkpoint_file} (checkpoint=... in load_segmenter); "
        "nothing is downloaded. For tests without weights use random_init=True; "
        "or use --segment whole-image, which needs no weights"
    )


def create_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Create the SAM-family model of segmenter ``name``, in eval mode on ``device``.

    Args:
        name: an ``efficientvit-sam-*`` or ``sam-vit-*`` name.
        checkpoint: local weights file: for EfficientViT-SAM the official ``efficientvit_sam_*.pt``
            (raw state dict or ``{"state_dict": ...}``, official key names remapped), for SAM the
            official ``sam_vit_*.pth``; also accepted: our own state dicts and ``.safetensors``.
        random_init: build with random weights instead (tests, benchmarks); exclusive with
            ``checkpoint``.
        device: torch device.

    Returns:
        :class:`~retailklip.segment.modeling.EfficientViTSam` or ``segment_anything.modeling.Sam``.

    Raises:
        UnknownSegmenterError: unknown name, or ``whole-image`` (which has no model).
        WeightsError: no checkpoint (and no ``random_init``), or a missing, unreadable, unsafe
            or wrong-architecture checkpoint; the message names the expected file and ``--checkpoint``.
        SegmenterOptionError: both ``checkpoint`` and ``random_init`` given, or an unusable device.
    """
    spec = get_spec(name)
    if spec.family == "whole-image":
        raise UnknownSegmenterError(f"segmenter {name} has no model; use load_segmenter({name!r})")
    dev = resolve_device(device, error=SegmenterOptionError)
    if checkpoint is not None and random_init:
        raise SegmenterOptionError(f"{name}: give either a checkpoint or random_init=True, not both")
    if checkpoint is None and not random_init:
        raise WeightsError(missing_checkpoint_message(spec))
    state_dict = None
    if checkpoint is not None:  # read first: a bad file fails before any slow model building
        state_dict = read_state_dict(checkpoint, name=name, expected_file=spec.checkpoint_file)
    if spec.family == "efficientvit-sam":
        model = build_efficientvit_sam(name)
        key_map = official_to_local_key
    else:
        model = sam_model_registry[_SAM_REGISTRY_KEYS[name]](checkpoint=None)
        key_map = None
    if state_dict is not None:
        load_state_dict_checked(
            model, state_dict, name=name, source=str(checkpoint), expected_file=spec.checkpoint_file, key_map=key_map
        )
    else:
        logger.warning("%s: using RANDOM weights (random_init=True); segments are meaningless", name)
    return model.to(dev).eval()
