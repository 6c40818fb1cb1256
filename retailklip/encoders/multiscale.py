"""Multi-scale, intermediate-stage pooled features of a timm backbone (the frozen-encoder option).

A frozen ImageNet CNN's final pooled features are tuned to ImageNet's classes; matching an iconic
packshot (white background, product filling the frame) to an in-store photo (clutter, product at
another scale) is helped by two old retrieval tricks, both measured on GroceryStore's train split
by photo-fold cross-validation (docs/evaluation.md, "Multi-scale, intermediate-stage embedding"):

* pooling an intermediate stage instead of the last (the lower layers transfer better to instance
  retrieval: Babenko & Lempitsky, "Aggregating deep convolutional features for image retrieval",
  ICCV 2015, §4; Razavian et al., "Visual instance retrieval with deep convolutional networks",
  ITE Trans. 2016, §3), read through timm's ``forward_intermediates``;
* embedding the image at several input sizes and concatenating the per-scale vectors, each
  centred and L2-normalised on its own, so the cosine similarity is the mean of the scales'
  cosine similarities (multi-resolution descriptors: Gordo et al., "End-to-end learning of deep
  visual representations for image retrieval", IJCV 2017, §5.2; Tolias et al., R-MAC, ICLR 2016).
  The per-scale normalisation is :class:`~retailklip.encoders.Encoder`'s ``groups``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import RetailKlipError


def check_scales(scales: object) -> tuple[int, ...]:
    """``scales`` as a tuple of input sides in pixels.

    Raises:
        RetailKlipError: not a non-empty sequence of distinct integers >= 32.
    """
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
        raise RetailKlipError(f"scales must be a list of input sides in pixels, e.g. [224, 320], got {scales!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 32 for s in scales):
        raise RetailKlipError(f"scales must be integers >= 32 (pixels), got {list(scales)!r}")
    if len(set(scales)) != len(scales):
        raise RetailKlipError(f"scales must be distinct, got {list(scales)!r}")
    return tuple(scales)


class MultiScalePooled(torch.nn.Module):
    """(N, 3, S, S) float -> (N, len(scales) * C) float: a backbone's average-pooled features at
    each input size in ``scales``, concatenated in that order.

    The input is the image preprocessed at the largest scale ``S = max(scales)`` (pixels, square);
    each smaller scale is an antialiased bilinear resize of it (the same content: preprocessing
    with ``crop_pct`` then resizing equals preprocessing at the smaller size, up to interpolation).

    Args:
        backbone: a timm model.  With ``stage`` None its forward must return pooled (N, C) features
            (the classifier removed); otherwise it must have ``forward_intermediates`` (timm >= 1.0).
        scales: input sides in pixels, distinct, each >= 32.
        stage: index into ``backbone.feature_info`` (negative counts from the end) whose NCHW
            output is average-pooled; None: the backbone's own pooled output.

    Raises:
        RetailKlipError: bad ``scales``, a ``stage`` outside the backbone's feature stages, or a
            backbone without ``forward_intermediates`` when ``stage`` is given.
    """

    def __init__(self, backbone: torch.nn.Module, scales: Sequence[int], stage: int | None = None) -> None:
        super().__init__()
        scales = check_scales(scales)
        if stage is not None:
            if isinstance(stage, bool) or not isinstance(stage, int):
                raise RetailKlipError(f"feature_stage must be an integer, got {stage!r}")
            info = getattr(backbone, "feature_info", None)
            if not hasattr(backbone, "forward_intermediates") or not info:
                raise RetailKlipError(f"{type(backbone).__name__} has no intermediate feature stages (feature_stage)")
            n = len(info)
            if not -n <= stage < n:
                raise RetailKlipError(f"feature_stage must be in [{-n}, {n - 1}] for this model, got {stage}")
            stage %= n
        self.backbone = backbone
        self.scales = scales
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for s in self.scales:
            xs = x if tuple(x.shape[-2:]) == (s, s) else F.interpolate(
                x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            outs.append(self._pooled(xs))
        return torch.cat(outs, dim=1)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage is None:
            return self.backbone(x)
        (fmap,) = self.backbone.forward_intermediates(x, indices=[self.stage], intermediates_only=True, stop_early=True)
        return fmap.mean(dim=(2, 3))
