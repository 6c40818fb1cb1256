"""Weight-space ensembling of the finetuned encoder with the one it started from (WiSE-FT).

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, §2 (Eq. 1): with
``θ0`` the weights before the finetune and ``θ1`` after it, the encoder
``θα = (1 − α)·θ0 + α·θ1`` costs nothing at inference and, for finetunes that start from the
same pretrained weights, often keeps more of the pretrained features' robustness to unseen
distributions than ``θ1`` while keeping most of the finetune's gain (their Fig. 1, α = 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def interpolate_weights(start: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """``(1 − alpha)·start + alpha·finetuned`` per floating-point tensor (WiSE-FT, Eq. 1).

    Args:
        start: the state dict the finetune started from (e.g. the ImageNet checkpoint); it may
            hold more keys than ``finetuned`` (a classifier the export drops), which are ignored.
        finetuned: the finetuned encoder's state dict (``OUT/encoder.safetensors``); its keys
            are the result's keys.
        alpha: weight of ``finetuned``, in [0, 1]: 0 gives ``start``'s values, 1 ``finetuned``.

    Returns:
        A new state dict with ``finetuned``'s keys, shapes and dtypes.  Floating-point tensors are
        interpolated in float64 and cast back; integer tensors (BatchNorm's
        ``num_batches_tracked``) are ``finetuned``'s.

    Raises:
        ValueError: ``alpha`` is not a number in [0, 1], a key of ``finetuned`` is missing from
            ``start``, or a tensor's shape differs (they are not the same architecture).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    missing = [k for k in finetuned if k not in start]
    if missing:
        raise ValueError(f"the start weights lack {len(missing)} of the finetuned keys, e.g. {missing[0]!r}: "
                         "not the architecture the finetune started from")
    out = {}
    for k, f in finetuned.items():
        s = start[k]
        if s.shape != f.shape:
            raise ValueError(f"{k}: start shape {tuple(s.shape)} != finetuned shape {tuple(f.shape)}")
        if f.is_floating_point():
            mix = (1 - alpha) * s.detach().double() + alpha * f.detach().double()
            out[k] = mix.to(f.dtype).contiguous()
        else:
            out[k] = f.detach().clone()
    return out
