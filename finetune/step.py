"""One optimizer step on one GPU (or the CPU): autocast forward, scaled backward, accumulation, clipping.

Each micro-batch goes through the encoder under autocast (bf16, or fp16 with a gradient
scaler; fp32: none), the float32 features into the loss (ArcFace); the loss divided by
``accum_steps`` is backpropagated, so gradients accumulate over ``accum_steps`` micro-batches.
At the end of a cycle the gradients are unscaled and clipped (``clip_grad``), AdamW steps, the
scaler updates, the gradients are zeroed and the learning-rate schedule advances one step.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from retailklip.devices import autocast
from retailklip.encoders.base import normalize_embeddings


def seed_everything(seed: int, epoch: int = 0) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` from ``(seed, epoch)``."""
    s = (int(seed) * 1_000_003 + int(epoch)) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


class Stepper:
    """Forward / backward of micro-batches and the optimizer step (module docstring).

    Args:
        model: the encoder module being trained.
        loss_fn: the loss module (features float32 (B, D), targets int64 (B,) -> scalar).
        optimizer: AdamW over the parameter groups.
        scheduler: the learning-rate schedule, stepped once per optimizer step.
        device: where the model is.
        precision: ``fp32``, ``bf16`` or ``fp16`` (fp16 enables the gradient scaler).
        accum_steps: micro-batches per optimizer step (>= 1).
        clip_grad: gradient-norm clipping threshold, or None.
        groups: the encoder's parts (:attr:`retailklip.encoders.Encoder.groups`: a count of equal
            parts or their widths).  With more than one part (multi-scale or pooled + stage
            embeddings) each part of the features is L2-normalised on its own before the loss, as
            the catalog's embedding is, so that ArcFace's cosine is the mean of the parts' cosines
            (the similarity 1-NN ranks by); with one part the features go in as they are.

    Attributes:
        scaler: the ``torch.amp.GradScaler`` (disabled unless fp16).
        step: optimizer steps taken (the schedule's position).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, *,
                 device: torch.device, precision: str, accum_steps: int = 1, clip_grad: float | None = None,
                 groups: int | tuple[int, ...] = 1) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.precision = precision
        self.accum_steps = accum_steps
        self.clip_grad = clip_grad
        self.groups = groups
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.step = 0

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, *, step: bool = True) -> float:
        """Forward and backward one micro-batch; with ``step`` also :meth:`optimizer_step`.

        Args:
            images: float32 (B, 3, H, W) preprocessed images.
            targets: int64 (B,) class indices.
            step: end of an accumulation cycle.

        Returns:
            The batch's loss (float, before division by ``accum_steps``).
        """
        self.model.train()
        x = images.to(self.device, non_blocking=True)
        y = targets.to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            feats = self.model(x)
        feats = feats.float()
        if self.groups != 1:
            feats = normalize_embeddings(feats, groups=self.groups)
        loss = self.loss_fn(feats, y)
        self.scaler.scale(loss / self.accum_steps).backward()
        if step:
            self.optimizer_step()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        """Clip, step the optimizer and the scaler, zero the gradients, advance the schedule."""
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def skip_step(self) -> None:
        """Advance the schedule without an update (every image of the cycle was bad), so the
        schedule stays on time."""
        self.scheduler.step()
        self.step += 1
