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
  The per-scale normalisation is :class:`~retailklip.encoders.Encoder`'s ``groups``;
* several stages at once (``feature_stage=["pooled", -1]``): the model's own pooled embedding
  next to an intermediate stage's, from one forward pass, each part normalised on its own --
  aggregation of several layers' pooled activations (multi-layer descriptors: Babenko &
  Lempitsky 2015, §5; Yue-Hei Ng et al., "Exploiting local features from deep networks for
  image retrieval", CVPR 2015 workshops, §4).  After an ArcFace finetune the last stage keeps
  what the trained head discards: +1.0 point of held-out-class top-1 in the class-disjoint CV
  (docs/finetune.md, "Seventh round").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import RetailKlipError

#: ``feature_stage`` entry naming the model's own pooled embedding (``forward_head`` of the
#: last features: for MobileNetV2 after its 1x1 head convolution, C = 1280).
POOLED = "pooled"


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
    """(N, 3, S, S) float -> (N, D) float: a backbone's average-pooled features at each input
    size in ``scales`` and, per scale, at each stage of ``stage``, concatenated in that order
    (scale-major); :attr:`widths` gives the parts' widths (D = their sum).

    The input is the image preprocessed at the largest scale ``S = max(scales)`` (pixels, square);
    each smaller scale is an antialiased bilinear resize of it (the same content: preprocessing
    with ``crop_pct`` then resizing equals preprocessing at the smaller size, up to interpolation).

    Args:
        backbone: a timm model.  With ``stage`` None its forward must return pooled (N, C) features
            (the classifier removed); otherwise it must have ``forward_intermediates`` (timm >= 1.0)
            and, where ``"pooled"`` is asked next to a stage, ``forward_head``.
        scales: input sides in pixels, distinct, each >= 32.
        stage: None: the backbone's own pooled output; an int: the index into
            ``backbone.feature_info`` (negative counts from the end) whose NCHW output is
            average-pooled; a list of such ints and/or ``"pooled"`` (the backbone's own pooled
            output), distinct: all of them from one forward pass, in the list's order.

    Attributes:
        stage: ``stage`` resolved (negative indices made positive), as the encoder's identity
            records it: None, an int, or a list of ints and ``"pooled"``.
        widths: the C of each part, one per (scale, stage).

    Raises:
        RetailKlipError: bad ``scales``; a ``stage`` that is not an integer, ``"pooled"`` or a
            list of them, is outside the backbone's feature stages or repeats one; a backbone
            without ``forward_intermediates`` when a stage is given.
    """

    def __init__(self, backbone: torch.nn.Module, scales: Sequence[int], stage: object = None) -> None:
        super().__init__()
        scales = check_scales(scales)
        stages: tuple[int | None, ...] = (None,)  # None = the backbone's own pooled output
        info = getattr(backbone, "feature_info", None)
        if stage is not None:
            many = isinstance(stage, Sequence) and not isinstance(stage, (str, bytes))
            if (many and not stage) or not all(
                    s == POOLED or (isinstance(s, int) and not isinstance(s, bool)) for s in (stage if many else [stage])):
                raise RetailKlipError(f"feature_stage must be an integer or a list of integers and {POOLED!r}, "
                                      f"got {stage!r}")
            if not hasattr(backbone, "forward_intermediates") or not info:
                raise RetailKlipError(f"{type(backbone).__name__} has no intermediate feature stages (feature_stage)")
            n = len(info)
            bad = [s for s in (stage if many else [stage]) if s != POOLED and not -n <= s < n]
            if bad:
                raise RetailKlipError(f"feature_stage must be in [{-n}, {n - 1}] for this model, got {bad[0]}")
            stages = tuple(None if s == POOLED else s % n for s in (stage if many else [stage]))
            if len(set(stages)) != len(stages):
                raise RetailKlipError(f"feature_stage lists a stage twice: {stage!r}")
            if None in stages and not hasattr(backbone, "forward_head"):
                raise RetailKlipError(f"{type(backbone).__name__} has no forward_head for {POOLED!r} next to a stage")
            stage = [POOLED if s is None else s for s in stages] if many else stages[0]
        self.backbone = backbone
        self.scales = scales
        self.stage = stage
        self._stages = stages
        pooled = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)  # timm >= 1.0
        self.widths: tuple[int, ...] = tuple(pooled if s is None else info[s]["num_chs"] for s in stages) * len(scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for s in self.scales:
            xs = x if tuple(x.shape[-2:]) == (s, s) else F.interpolate(
                x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            outs.extend(self._parts(xs))
        return torch.cat(outs, dim=1)

    def _parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One scale's pooled parts, one per stage of :attr:`stage`."""
        taken = sorted(s for s in self._stages if s is not None)
        if not taken:
            return [self.backbone(x)]
        pooled = None in self._stages
        got = self.backbone.forward_intermediates(x, indices=taken, intermediates_only=not pooled, stop_early=not pooled)
        final, fmaps = got if pooled else (None, got)
        by_stage = dict(zip(taken, fmaps))
        return [self.backbone.forward_head(final) if s is None else by_stage[s].mean(dim=(2, 3)) for s in self._stages]
