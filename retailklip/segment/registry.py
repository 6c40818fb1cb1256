"""Segmenter names, their expected checkpoint files, and model creation by name.

In the style of segment-anything's ``sam_model_registry`` and ``timm.create_model``: one table
of names (:data:`SEGMENTER_SPECS`), one factory (:func:`create_model`).  Adding a SAM-like model
is one row: ``register_segmenter(SegmenterSpec(NAME, FAMILY, CHECKPOINT_FILE, URL, build_model))``
(remove one with ``del SEGMENTER_SPECS[NAME]``); ``load_segmenter(NAME)`` and ``--segment NAME``
then find it.  Without a local checkpoint, a row with a download source (``hf_repo`` or
``download_url``) gets its official file from the standard cache, downloaded once
(:mod:`~retailklip.segment.download`); ``random_init=True`` builds random weights (tests,
benchmarks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from torch import nn

from ..devices import resolve_device
from ..errors import WeightsError
from .checkpoint import load_state_dict_checked, official_to_local_key, read_state_dict
from .download import hub_checkpoint, url_checkpoint
from .errors import SegmenterOptionError, UnknownSegmenterError
from .modeling.efficientvit_sam import EFFICIENTVIT_SAM_CONFIGS, build_efficientvit_sam

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterSpec:
    """What a segmenter name stands for: one row of :data:`SEGMENTER_SPECS`.

    Attributes:
        name: registry name (the ``--segment`` value).
        family: ``"efficientvit-sam"``, ``"sam"`` (original SAM ViT), ``"whole-image"``, or the
            family of a registered model (for messages and docs).
        checkpoint_file: file name of the official checkpoint, None when no weights are needed.
        url: where the official checkpoint is published (a page, for messages/docs), or None.
        build_model: builds the model with random weights (then :func:`create_model` loads the
            checkpoint into it): an :class:`~retailklip.segment.modeling.EfficientViTSam`, a
            ``segment_anything`` ``Sam``, or any model ``SamAutomaticMaskGenerator`` can drive;
            None for a segmenter without a model (``whole-image``).
        key_map: official checkpoint key -> our state-dict key, or None when they are the same.
        hf_repo: Hugging Face model repo holding ``checkpoint_file`` (downloaded into the HF
            cache when no checkpoint is given), or None.
        download_url: direct URL of the checkpoint (downloaded into torch's hub cache when no
            checkpoint is given and there is no ``hf_repo``), or None. Without either, a
            checkpoint must be given.
    """

    name: str
    family: str
    checkpoint_file: str | None
    url: str | None
    build_model: Callable[[], nn.Module] | None = None
    key_map: Callable[[str], str] | None = None
    hf_repo: str | None = None
    download_url: str | None = None


_EVIT_REPO = "mit-han-lab/efficientvit-sam"
_EVIT_URL = f"https://huggingface.co/{_EVIT_REPO}"
_SAM_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
_SAM_FILES_URL = "https://dl.fbaipublicfiles.com/segment_anything/"  # the links of SAM's README


def _sam(name: str, registry_key: str, checkpoint_file: str) -> SegmenterSpec:
    return SegmenterSpec(
        name, "sam", checkpoint_file, _SAM_URL, partial(sam_model_registry[registry_key], checkpoint=None),
        download_url=_SAM_FILES_URL + checkpoint_file,
    )


#: Every segmenter name and its specification (the registry; see module docstring).
SEGMENTER_SPECS: dict[str, SegmenterSpec] = {
    **{
        name: SegmenterSpec(
            name, "efficientvit-sam", cfg.checkpoint_file, _EVIT_URL, partial(build_efficientvit_sam, name),
            official_to_local_key, hf_repo=_EVIT_REPO,
        )
        for name, cfg in EFFICIENTVIT_SAM_CONFIGS.items()
    },
    "sam-vit-b": _sam("sam-vit-b", "vit_b", "sam_vit_b_01ec64.pth"),
    "sam-vit-l": _sam("sam-vit-l", "vit_l", "sam_vit_l_0b3195.pth"),
    "sam-vit-h": _sam("sam-vit-h", "vit_h", "sam_vit_h_4b8939.pth"),
    "whole-image": SegmenterSpec("whole-image", "whole-image", None, None),
}


def register_segmenter(spec: SegmenterSpec) -> SegmenterSpec:
    """Add a row to :data:`SEGMENTER_SPECS`.

    Args:
        spec: the new segmenter; it needs a ``build_model`` (only ``whole-image`` has none).

    Returns:
        ``spec``.

    Raises:
        ValueError: the name is registered already, or ``spec`` has no ``build_model``.
    """
    if spec.name in SEGMENTER_SPECS:
        raise ValueError(f"segmenter {spec.name!r} is registered already")
    if spec.build_model is None:
        raise ValueError(f"segmenter {spec.name!r} needs a build_model")
    SEGMENTER_SPECS[spec.name] = spec
    return spec


def list_segmenters() -> tuple[str, ...]:
    """Valid ``--segment`` names, in registration order (``efficientvit-sam-l0`` ... ``whole-image``)."""
    return tuple(SEGMENTER_SPECS)


def get_spec(name: str) -> SegmenterSpec:
    """Specification of segmenter ``name``.

    Raises:
        UnknownSegmenterError: ``name`` is not registered; the message lists :func:`list_segmenters`.
    """
    try:
        return SEGMENTER_SPECS[name]
    except (KeyError, TypeError):
        raise UnknownSegmenterError(
            f"unknown segmenter {name!r}; choose --segment from: {', '.join(list_segmenters())}"
        ) from None


def missing_checkpoint_message(spec: SegmenterSpec) -> str:
    """The error text for a model segmenter without a checkpoint and without a download source."""
    return (
        f"segmenter {spec.name} needs its weights file {spec.checkpoint_file} (published at {spec.url}); "
        f"pass it with --checkpoint {spec.checkpoint_file} (checkpoint=... in load_segmenter); "
        "it has no download source. For tests without weights use random_init=True; "
        "or use --segment whole-image, which needs no weights"
    )


def official_checkpoint(spec: SegmenterSpec) -> Path:
    """The official checkpoint file of ``spec`` in the standard cache, downloaded once:
    from ``spec.hf_repo`` into the Hugging Face cache, else from ``spec.download_url`` into
    torch's hub cache (:mod:`~retailklip.segment.download`).

    Raises:
        WeightsUnavailableError: not cached and not downloadable (offline); one line naming the
            file, where it was looked for and ``--checkpoint FILE``.
        WeightsError: the spec has neither download source.
    """
    if spec.hf_repo and spec.checkpoint_file:
        return hub_checkpoint(spec.hf_repo, spec.checkpoint_file, name=spec.name)
    if spec.download_url:
        return url_checkpoint(spec.download_url, name=spec.name)
    raise WeightsError(missing_checkpoint_message(spec))


def create_model(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Create the SAM-family model of segmenter ``name``, in eval mode on ``device``.

    Args:
        name: an ``efficientvit-sam-*`` or ``sam-vit-*`` name, or another registered model.
        checkpoint: local weights file: for EfficientViT-SAM the official ``efficientvit_sam_*.pt``
            (raw state dict or ``{"state_dict": ...}``, official key names remapped), for SAM the
            official ``sam_vit_*.pth``; also accepted: our own state dicts and ``.safetensors``.
            None (and no ``random_init``): the official file, from the standard cache or
            downloaded into it once (:func:`official_checkpoint`).
        random_init: build with random weights instead (tests, benchmarks); exclusive with
            ``checkpoint``.
        device: torch device.

    Returns:
        What the spec's ``build_model`` builds: :class:`~retailklip.segment.modeling.EfficientViTSam`
        or ``segment_anything.modeling.Sam`` for the built-in names.

    Raises:
        UnknownSegmenterError: unknown name, or ``whole-image`` (which has no model).
        WeightsUnavailableError: no checkpoint given, and the official one is neither cached nor
            downloadable (offline); one line naming the file, the cache and ``--checkpoint``.
        WeightsError: a missing, unreadable, unsafe or wrong-architecture checkpoint, or none
            given for a spec without a download source; the message names the expected file
            and ``--checkpoint``.
        SegmenterOptionError: both ``checkpoint`` and ``random_init`` given, or an unusable device.
    """
    spec = get_spec(name)
    if spec.build_model is None:
        raise UnknownSegmenterError(f"segmenter {name} has no model; use load_segmenter({name!r})")
    dev = resolve_device(device, error=SegmenterOptionError)
    if checkpoint is not None and random_init:
        raise SegmenterOptionError(f"{name}: give either a checkpoint or random_init=True, not both")
    if checkpoint is None and not random_init:
        checkpoint = official_checkpoint(spec)
    state_dict = None
    if checkpoint is not None:  # read first: a bad file fails before any slow model building
        state_dict = read_state_dict(checkpoint, name=name, expected_file=spec.checkpoint_file)
    model = spec.build_model()
    if state_dict is not None:
        load_state_dict_checked(
            model, state_dict, name=name, source=str(checkpoint), expected_file=spec.checkpoint_file,
            key_map=spec.key_map,
        )
    else:
        logger.warning("%s: using RANDOM weights (random_init=True); segments are meaningless", name)
    return model.to(dev).eval()
