"""The encoder being trained: built by retailklip's own factory, plus what training needs.

The module trained is exactly the one the catalog runs: :func:`retailklip.create_encoder` (called
by the trainer with the same SPEC and options as ``catalog init``) returns an
:class:`~retailklip.encoders.Encoder` whose ``.model`` is the timm model with
``reset_classifier(0)`` or the OpenCLIP ``model.visual``; the finetuned weights are that
module's ``state_dict()``.  This module adds:

* **BatchNorm freezing** (``timm.layers.freeze_batch_norm_2d``): BatchNorm layers become
  ``FrozenBatchNorm2d`` (running statistics and affine as buffers, no batch statistics, no
  gradient).  Needed for CNN trunks at the small batches one GPU (or a CPU) allows, and always
  for the shared MobileNetV2, whose BatchNorms are folded identity placeholders that a
  train-mode forward destroys (``../shared/models/README.md``).  :func:`bn_looks_folded`
  detects such placeholders.  The export turns them back into ``BatchNorm2d``.
* **Gradient checkpointing** (OpenCLIP and timm ``set_grad_checkpointing``): recompute block
  activations in the backward pass; needed to fit ViT-L/14 at useful batch sizes on one GPU.
* **The training transform**: timm's ``create_transform(is_training=True)`` (random resized
  crop, horizontal flip, colour jitter) at the encoder's input size and with its normalisation
  (mean, std, interpolation read from the encoder's evaluation preprocessing).
"""

from __future__ import annotations

import json
import logging

import torch

from retailklip.encoders import Encoder, EncoderSpec

from .errors import FinetuneError

logger = logging.getLogger(__name__)

_BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
#: Below this batch size (per step, before accumulation) a CNN's BatchNorm is frozen by default.
SMALL_BATCH = 32


def count_batchnorm(module: torch.nn.Module) -> int:
    """Number of trainable-statistics BatchNorm layers (``_BatchNorm`` subclasses) in ``module``."""
    return sum(isinstance(m, _BN_TYPES) for m in module.modules())


def bn_looks_folded(module: torch.nn.Module) -> bool:
    """True when every BatchNorm has ``running_mean == 0`` and ``running_var + eps == 1``: the
    statistics were folded into the convolutions (as in the shared MobileNetV2), so batch
    statistics in train mode would not match what the weights expect."""
    bns = [m for m in module.modules() if isinstance(m, _BN_TYPES) and m.running_mean is not None]
    if not bns:
        return False
    return all(
        bool(torch.all(m.running_mean == 0)) and bool(torch.allclose(m.running_var + m.eps, torch.ones_like(m.running_var)))
        for m in bns
    )


def resolve_freeze_bn(choice: str, module: torch.nn.Module, batch_size: int) -> bool:
    """Decide ``--freeze-bn {auto,on,off}``: ``auto`` freezes when the module has BatchNorm and
    the batch is smaller than :data:`SMALL_BATCH` or the statistics look folded.

    Raises:
        FinetuneError: an unknown choice.
    """
    if choice not in ("auto", "on", "off"):
        raise FinetuneError(f"--freeze-bn must be auto, on or off, got {choice!r}")
    n = count_batchnorm(module)
    folded = n > 0 and bn_looks_folded(module)
    if choice == "off":
        if folded:
            logger.warning("--freeze-bn off, but the BatchNorm statistics look folded (mean 0, var 1): "
                           "train-mode BatchNorm will destroy these weights")
        return False
    if choice == "on":
        return n > 0
    return n > 0 and (batch_size < SMALL_BATCH or folded)


def freeze_batchnorm(encoder: Encoder) -> int:
    """Replace every BatchNorm of ``encoder.model`` by timm's frozen BatchNorm, in place.

    Returns:
        The number of layers frozen.
    """
    from timm.layers import freeze_batch_norm_2d

    n = count_batchnorm(encoder.model)
    encoder.model = freeze_batch_norm_2d(encoder.model)
    return n


def unfreeze_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Turn frozen BatchNorms back into ``BatchNorm2d`` (same values), so the state dict has the
    keys the original architecture expects.  Modifies and returns ``module``."""
    from timm.layers import unfreeze_batch_norm_2d

    return unfreeze_batch_norm_2d(module)


def resolve_grad_checkpointing(choice: str, spec: str) -> bool:
    """``--grad-checkpointing {auto,on,off}``; ``auto`` enables it for ViT-L / H / g / bigG models.

    Raises:
        FinetuneError: an unknown choice.
    """
    if choice not in ("auto", "on", "off"):
        raise FinetuneError(f"--grad-checkpointing must be auto, on or off, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    model = EncoderSpec.parse(spec).model.lower()
    return any(tag in model for tag in ("vit-l", "vit_large", "vit-h", "vit_huge", "vit-g", "vit-bigg", "vit_giant"))


def set_grad_checkpointing(module: torch.nn.Module, enable: bool = True) -> None:
    """Enable OpenCLIP / timm gradient checkpointing.

    Raises:
        FinetuneError: the module has no ``set_grad_checkpointing``.
    """
    fn = getattr(module, "set_grad_checkpointing", None)
    if not callable(fn):
        raise FinetuneError(f"{type(module).__name__} does not support gradient checkpointing")
    fn(enable)


def input_config(encoder: Encoder) -> dict:
    """The encoder's evaluation preprocessing: ``size`` (H, W), ``mean``, ``std``, ``interpolation``."""
    cfg = json.loads(encoder.identity.preprocess)
    if "input_size" in cfg:  # timm
        size = tuple(cfg["input_size"][1:])
    else:  # open_clip
        s = cfg["size"]
        size = (s, s) if isinstance(s, int) else tuple(s)
    return {"size": size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "interpolation": cfg.get("interpolation", "bicubic")}


def train_transform(encoder: Encoder, *, scale: tuple[float, float] = (0.35, 1.0), hflip: float = 0.5,
                    color_jitter: float = 0.3, size: int | None = None):
    """timm's training transform at the encoder's input size and normalisation.

    Args:
        encoder: the encoder (its preprocessing gives size, mean, std, interpolation).
        scale: random-resized-crop area range, fractions of the image.
        hflip: horizontal-flip probability.
        color_jitter: brightness / contrast / saturation jitter strength.
        size: train at this square size instead of the encoder's (e.g. lower on a CPU).

    Returns:
        A callable PIL ``RGB`` image -> float32 tensor (3, H, W), normalised.
    """
    from timm.data import create_transform

    cfg = input_config(encoder)
    h, w = (size, size) if size else cfg["size"]
    return create_transform(
        input_size=(3, h, w), is_training=True, scale=tuple(scale), ratio=(3 / 4, 4 / 3), hflip=hflip, vflip=0.0,
        color_jitter=color_jitter, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
    )
