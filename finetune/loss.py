"""The metric-learning loss: ArcFace (RetailKLIP §4.1, Deng et al. 2019) from pytorch-metric-learning.

ArcFace keeps one learnable unit "proxy" per class, the columns of ``W`` (shape (D, C), D =
encoder output dimension), and trains the encoder so that an embedding's angle to its own
class's proxy, plus an additive angular ``margin``, is smaller than its angles to the other
proxies; the cosine logits are multiplied by ``scale`` before the softmax cross-entropy.  The
proxies are only a training device: the catalog matches embeddings to augmented reference
images, never to ``W``.  ``W`` starts random and has to move much faster than the pretrained
encoder, so it gets its own learning rate (see :mod:`finetune.optim`).

Sub-center ArcFace (Deng et al., "Sub-center ArcFace: boosting face recognition by large-scale
noisy web faces", ECCV 2020, §3.1): each class has ``sub_centers`` proxies and a sample's cosine to
its class is the largest over them (pytorch-metric-learning ``SubCenterArcFaceLoss``), so a class
whose photos form several modes (packshot vs shelf photo, front vs side) need not be pulled onto
one direction.  ``W`` is then (D, C * k), class c's sub-centers in columns ``c*k .. c*k + k - 1``.

Outlier Exposure (:class:`OutlierExposureLoss`; Hendrycks, Mazeika & Dietterich, "Deep anomaly
detection with outlier exposure", ICLR 2019, §3): images of products that are neither training
nor evaluation classes are added to the batches and their softmax over ArcFace's scaled cosine
logits is pulled towards the uniform distribution, so that an unseen product's embedding learns
to sit away from every class rather than on one of them (the open-set aim of issue 14).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import ArcFaceLoss, SubCenterArcFaceLoss

from .errors import FinetuneError

#: pytorch-metric-learning's defaults: 28.6 degrees (= 0.5 rad, the ArcFace paper's m) and s = 64.
DEFAULT_MARGIN_DEGREES = 28.6
DEFAULT_SCALE = 64.0
#: Weight of the outlier term: Hendrycks et al.'s value for vision (ICLR 2019, §4.2, lambda = 0.5).
DEFAULT_OUTLIER_WEIGHT = 0.5


def create_arcface(num_classes: int, embedding_size: int, *, margin: float = DEFAULT_MARGIN_DEGREES,
                   scale: float = DEFAULT_SCALE, sub_centers: int = 1) -> ArcFaceLoss:
    """Build pytorch-metric-learning's ``ArcFaceLoss`` (``SubCenterArcFaceLoss`` when
    ``sub_centers`` > 1; module docstring).

    Call it as ``loss(embeddings, targets)`` with float32 embeddings (N, D) (they are
    L2-normalised inside; pass float32, because the loss casts ``W`` to the embeddings' dtype)
    and int64 targets (N,) in ``[0, num_classes)``; it returns a scalar float32 tensor.

    Args:
        num_classes: C, training classes (>= 2).
        embedding_size: D, the encoder's output dimension.
        margin: additive angular margin in **degrees** (PML's unit), in [0, 90).
        scale: logit scale s > 0.
        sub_centers: proxies per class k >= 1 (1: plain ArcFace; Sub-center ArcFace, ECCV 2020,
            uses k = 3).

    Raises:
        FinetuneError: out-of-range arguments.
    """
    if num_classes < 2:
        raise FinetuneError(f"ArcFace needs at least 2 classes, got {num_classes}")
    if embedding_size < 1:
        raise FinetuneError(f"embedding size must be >= 1, got {embedding_size}")
    if not 0.0 <= margin < 90.0:
        raise FinetuneError(f"--margin is an angle in degrees in [0, 90), got {margin}")
    if not scale > 0:
        raise FinetuneError(f"--scale must be > 0, got {scale}")
    if sub_centers < 1:
        raise FinetuneError(f"--sub-centers must be >= 1, got {sub_centers}")
    if sub_centers > 1:
        return SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale,
                                    sub_centers=sub_centers)
    return ArcFaceLoss(num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale)


@torch.no_grad()
def imprint_class_weights(loss: ArcFaceLoss, embeddings: torch.Tensor, targets: torch.Tensor) -> int:
    """Set each class's proxy (column of ``W``) to the mean direction of its embeddings (the
    normalised mean of the L2-normalised embeddings).

    "Weight imprinting" (Qi et al. 2018): starting ArcFace from class means rather than random
    directions avoids the first steps' large, random gradients into a pretrained encoder.
    Classes without an embedding keep their random column.  With k sub-centers per class
    (``SubCenterArcFaceLoss``) the class's embeddings are dealt round-robin in their given order:
    sub-center j is the mean direction of embeddings j, j + k, ... of the class (the class mean
    where the class has fewer than j + 1 embeddings), so the sub-centers start apart.

    Args:
        loss: the ArcFace loss whose ``W`` (D, C) is overwritten in place.
        embeddings: float (N, D) embeddings of training images (any norm).
        targets: int64 (N,) class indices.

    Returns:
        The number of classes imprinted.

    Raises:
        FinetuneError: shape mismatch.
    """
    W = loss.W
    k = int(getattr(loss, "sub_centers", 1))
    if embeddings.ndim != 2 or embeddings.shape[1] != W.shape[0] or embeddings.shape[0] != targets.shape[0]:
        raise FinetuneError(f"imprinting: embeddings {tuple(embeddings.shape)} do not fit W {tuple(W.shape)} / targets {tuple(targets.shape)}")
    n_classes = W.shape[1] // k
    e = torch.nn.functional.normalize(embeddings.float(), dim=1).to(W.device)
    t = targets.to(W.device)
    sums = torch.zeros(n_classes, W.shape[0], device=W.device).index_add_(0, t, e)
    counts = torch.bincount(t, minlength=n_classes)
    present = counts > 0
    # Keep the column norms PML's init gave W (the loss normalises W anyway).
    norms = W.norm(dim=0, keepdim=True)
    means = torch.nn.functional.normalize(sums, dim=1)  # (C, D)
    cols = means.repeat_interleave(k, dim=0)  # (C * k, D): every sub-center starts at its class mean
    if k > 1:  # then sub-center j = mean of the class's embeddings j, j + k, ...
        rank = torch.zeros_like(t)
        for c in t.unique():
            idx = (t == c).nonzero().flatten()
            rank[idx] = torch.arange(len(idx), device=W.device)
        sub = t * k + rank % k
        sub_sums = torch.zeros(n_classes * k, W.shape[0], device=W.device).index_add_(0, sub, e)
        filled = torch.bincount(sub, minlength=n_classes * k) > 0
        cols[filled] = torch.nn.functional.normalize(sub_sums[filled], dim=1)
    cols = cols.T * norms
    col_present = present.repeat_interleave(k)
    W[:, col_present] = cols[:, col_present].to(W.dtype)
    return int(present.sum())


class OutlierExposureLoss(torch.nn.Module):
    """ArcFace on class images plus Outlier Exposure on outlier images (module docstring).

    ``loss(embeddings, targets)``: float32 embeddings (N, D) and int64 targets (N,); a target
    ``>= 0`` is a class index of the wrapped ArcFace, a target ``< 0`` marks an outlier image
    (no class).  Returns the scalar ``arcface(class rows) + weight * mean over outlier rows of
    H(U; softmax(z))``, ``z`` = ArcFace's scaled cosine logits without the margin (PML
    ``get_logits``) and ``H(U; p) = logsumexp(z) - mean(z)`` the cross-entropy from the uniform
    distribution; a term without rows is left out.  The proxies ``W`` stay the wrapped loss's
    (imprinting, the optimizer's group and checkpoints see the ArcFace module itself).

    Args:
        arcface: the ArcFace (or Sub-center ArcFace) loss of :func:`create_arcface`.
        weight: lambda > 0, the outlier term's weight.

    Raises:
        FinetuneError: weight <= 0.
    """

    def __init__(self, arcface: ArcFaceLoss, weight: float = DEFAULT_OUTLIER_WEIGHT) -> None:
        super().__init__()
        if not weight > 0:
            raise FinetuneError(f"--outlier-weight must be > 0, got {weight}")
        self.arcface = arcface
        self.weight = float(weight)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        inlier = targets >= 0
        total = embeddings.new_zeros(())
        if inlier.any():
            total = total + self.arcface(embeddings[inlier], targets[inlier])
        if not inlier.all():
            z = self.arcface.get_logits(embeddings[~inlier])
            total = total + self.weight * (torch.logsumexp(z, dim=1) - z.mean(dim=1)).mean()
        return total
