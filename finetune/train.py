"""The training run: RetailKLIP finetuning on one GPU (or the CPU), §4.1, orchestrated.

:class:`Trainer` puts the pieces together; each lives in its own module:

* data: :func:`finetune.data.prepare_data` (read, check, drop bad images), the class-balanced
  sampler (:mod:`finetune.sampler`, §4.1.3) and timm's training transform (:mod:`finetune.model`);
* model: :func:`retailklip.create_encoder` (the catalog's own encoder), BatchNorm freezing and
  gradient checkpointing (:mod:`finetune.model`);
* loss: ArcFace with imprinted class weights (:mod:`finetune.loss`);
* optimiser and schedule: AdamW with blockwise learning-rate decay (§4.1.2), warm-up + cosine
  (:mod:`finetune.optim`); the step itself (autocast, accumulation, clipping) in :mod:`finetune.step`;
* evaluation: zero-shot on the held-out classes (§4.2) by the library's evaluator (:mod:`finetune.evaluate`);
* logging and run records: ``epochs.csv``, ``train_log.csv``, ``config.json``, ``metrics.json``
  (:mod:`finetune.records`);
* checkpoints (:mod:`finetune.checkpoint`) and the export (:mod:`finetune.export`).

Per epoch: the sampler draws breadth x depth images, each micro-batch is one
:meth:`~finetune.step.Stepper.train_batch`; after the epoch: evaluation (every ``eval_every``
epochs and the last), a row in ``epochs.csv`` and a checkpoint.  At the end:
``encoder.safetensors`` (loadable by ``catalog init``), ``config.json``, ``metrics.json``.

Output directory::

    OUT/encoder.safetensors   finetuned encoder (bare state dict; catalog init --weights)
    OUT/config.json           settings, resolved choices, parameter-group table, classes
    OUT/metrics.json          zero_shot_top1_before / _after, per-class averages, history, speed
    OUT/epochs.csv            one row per epoch
    OUT/train_log.csv         loss, learning rate, images/s every --log-every steps
    OUT/skipped_images.csv    bad images and why (when there are any)
    OUT/checkpoint/           last epoch's training state (for --resume)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from retailklip import create_encoder
from retailklip.devices import resolve_device
from retailklip.encoders import EncoderSpec
from retailklip.evaluation import ZeroShotResult

from .backgrounds import BackgroundPaster
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, resolve_precision
from .data import ImageDataset, PreparedData, collate_skipping_bad, prepare_data, write_skipped
from .errors import FinetuneError
from .evaluate import ZeroShotEvaluator, result_record
from .export import export_run
from .loss import OutlierExposureLoss, create_arcface, imprint_class_weights
from .model import (
    freeze_batchnorm,
    input_config,
    resolve_freeze_bn,
    resolve_grad_checkpointing,
    set_grad_checkpointing,
    train_transform,
)
from .optim import create_optimizer, describe_groups, format_lr_table, param_groups, warmup_cosine
from .records import EPOCH_COLUMNS, STEP_COLUMNS, CsvLog, open_tensorboard, run_metrics, write_config
from .sampler import ClassBalancedSampler
from .step import Stepper, seed_everything

logger = logging.getLogger(__name__)

#: Training images per class (eval preprocessing, no augmentation) whose mean embedding imprints W.
IMPRINT_IMAGES = 4


class Trainer:
    """One finetuning run (see module docstring).

    Building it reads and checks the data, builds the encoder (BatchNorm freezing, gradient
    checkpointing), the loss, the parameter groups (logging the learning-rate table), the
    optimizer, schedule and evaluator.  :meth:`fit` trains; :meth:`train_batch` is one
    micro-batch, for tests and benchmarks.

    Args:
        cfg: the settings (validated here).
        data: already prepared data (a depth sweep reuses it), or None to read ``cfg.data``.

    Raises:
        FinetuneError / RetailKlipError: bad data or settings (one-line messages).
    """

    def __init__(self, cfg: TrainConfig, data: PreparedData | None = None) -> None:
        self.cfg = cfg.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device, error=FinetuneError)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu" and self.precision == "fp16":
            logger.warning("fp16 autocast on the CPU is slow and unscaled; prefer bf16 or fp32")
        self.workers = cfg.workers if cfg.workers is not None else (0 if self.device.type == "cpu" else min(8, os.cpu_count() or 1))
        self.data = data or prepare_data(cfg.data, cfg.eval_data, workers=max(2, self.workers), reference_copies=cfg.reference_copies,
                                         outlier_data=cfg.outlier_data)
        seed_everything(cfg.seed)

        # The zero-shot evaluation runs in float32, as a catalog does by default.
        self.encoder = create_encoder(cfg.encoder, weights=cfg.weights, random_init=cfg.random_init, seed=cfg.seed,
                                      device=str(self.device), precision="fp32", batch_size=cfg.eval_batch_size,
                                      **cfg.encoder_options)
        self.spec = EncoderSpec.parse(cfg.encoder)
        self.freeze_bn = resolve_freeze_bn(cfg.freeze_bn, self.encoder.model, cfg.batch_size)
        self.frozen_bn_layers = freeze_batchnorm(self.encoder) if self.freeze_bn else 0
        if self.frozen_bn_layers:
            logger.info("froze %d BatchNorm layers (running statistics and affine kept as buffers)", self.frozen_bn_layers)
        self.grad_checkpointing = resolve_grad_checkpointing(cfg.grad_checkpointing, cfg.encoder)
        if self.grad_checkpointing:
            set_grad_checkpointing(self.encoder.model, True)
        self.model = self.encoder.model.to(self.device)
        self.embedding_size = self.encoder.dim

        n_classes = len(self.data.train.classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.loss_fn = create_arcface(n_classes, self.embedding_size, margin=cfg.margin, scale=cfg.scale,
                                          sub_centers=cfg.sub_centers).to(self.device)
        self.groups = param_groups(self.model, lr=cfg.lr, decay=cfg.lr_decay, weight_decay=cfg.weight_decay,
                                   loss=self.loss_fn, loss_lr=cfg.loss_lr, frozen_blocks=cfg.freeze_blocks)
        logger.info("AdamW parameter groups (blockwise learning-rate decay, RetailKLIP 4.1.2):\n%s", format_lr_table(self.groups))
        self.optimizer = create_optimizer(self.groups, fused=True if self.device.type == "cuda" else None)

        # Outlier Exposure: outlier images join the draw with negative targets, each outlier label balanced like a class
        self.objective = OutlierExposureLoss(self.loss_fn, cfg.outlier_weight) if self.data.outliers else self.loss_fn
        self.samples = self.data.train.samples + self.data.outliers
        self.targets = np.concatenate([self.data.train.targets, self.data.outlier_targets()])
        self.sampler = ClassBalancedSampler(self.targets, cfg.depth, seed=cfg.seed)
        logger.info("%s", self.sampler.summary())
        batches = math.ceil(len(self.sampler) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(batches / cfg.accum_steps)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = warmup_cosine(self.optimizer, self.warmup_steps, self.total_steps, cfg.min_lr_ratio)
        self.stepper = Stepper(self.model, self.objective, self.optimizer, self.scheduler, device=self.device,
                               precision=self.precision, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
                               groups=self.encoder.groups)
        self.transform = train_transform(self.encoder, scale=(cfg.crop_scale, 1.0), size=cfg.train_size)
        self.evaluator = ZeroShotEvaluator(self.data.eval, self.encoder, augmentations=cfg.augmentations, seed=cfg.eval_seed,
                                           cache_mb=cfg.eval_cache_mb, progress=cfg.progress)
        self.epoch = 0
        self.history: list[dict] = []
        self.skipped_at_load = 0

    # ------------------------------------------------------------------ pieces
    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.stepper.step

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The gradient scaler (enabled for fp16 only)."""
        return self.stepper.scaler

    def fingerprint(self) -> dict:
        """What a checkpoint must share with this run to be resumed."""
        return {"encoder": str(self.spec), "classes": list(self.data.train.classes), "embedding_size": self.embedding_size,
                "groups": [g["name"] for g in self.groups], "depth": self.cfg.depth, "batch_size": self.cfg.batch_size,
                "accum_steps": self.cfg.accum_steps, "epochs": self.cfg.epochs, "seed": self.cfg.seed,
                **({"outlier_images": len(self.data.outliers), "outlier_weight": self.cfg.outlier_weight} if self.data.outliers else {})}

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, *, step: bool = True) -> float:
        """One micro-batch (:meth:`finetune.step.Stepper.train_batch`): forward, backward and,
        with ``step``, the optimizer step.  Returns the batch's loss (ArcFace, plus the Outlier Exposure
        term with ``--outlier-data``)."""
        return self.stepper.train_batch(images, targets, step=step)

    def evaluate(self) -> ZeroShotResult:
        """Zero-shot 1-NN evaluation of the current weights on the held-out classes."""
        t0 = time.perf_counter()
        if self.grad_checkpointing:
            set_grad_checkpointing(self.model, False)
        try:
            res = self.evaluator()
        finally:
            if self.grad_checkpointing:
                set_grad_checkpointing(self.model, True)
        logger.info("zero-shot on %d held-out classes, %d queries, K=%d: top-1 %.4f, per-class average %.4f [%.1fs]",
                    res.classes, res.queries, self.evaluator.k, res.top1, res.per_class_average, time.perf_counter() - t0)
        return res

    @torch.no_grad()
    def imprint(self) -> None:
        """Initialise ArcFace's W with the class-mean embeddings of up to :data:`IMPRINT_IMAGES` training images per class."""
        t0 = time.perf_counter()
        targets = self.data.train.targets
        rng = np.random.default_rng(self.cfg.seed)
        idx = np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:min(IMPRINT_IMAGES, self.cfg.depth)]
                              for c in range(len(self.data.train.classes))])
        paths = [self.data.train.samples[i].path for i in idx]
        was = self.model.training
        self.model.eval()
        emb = torch.from_numpy(self.encoder.embed(paths))
        self.model.train(was)
        n = imprint_class_weights(self.loss_fn, emb, torch.from_numpy(targets[idx]))
        logger.info("ArcFace W imprinted with the mean embedding of %d classes (%d images) [%.1fs]", n, len(idx),
                    time.perf_counter() - t0)

    def _loader(self) -> torch.utils.data.DataLoader:
        paster = None
        if self.cfg.reference_backgrounds > 0:
            photos = list(dict.fromkeys(s.path for s in self.data.train.samples if s.role == "query"))
            paster = BackgroundPaster(photos, self.cfg.reference_backgrounds, self.encoder.background)
        ds = ImageDataset(self.samples, self.targets, self.transform, self.encoder.background,
                          reference_transform=paster)
        return torch.utils.data.DataLoader(
            ds, batch_size=self.cfg.batch_size, sampler=self.sampler, num_workers=self.workers,
            collate_fn=collate_skipping_bad, pin_memory=self.device.type == "cuda", drop_last=False,
            persistent_workers=False,
        )

    def save_checkpoint(self) -> Path:
        """Write ``OUT/checkpoint`` with the state after :attr:`epoch` epochs."""
        return save_checkpoint(self.out / "checkpoint", model=self.model, loss=self.loss_fn, optimizer=self.optimizer,
                               scheduler=self.scheduler, scaler=self.scaler, epoch=self.epoch, step=self.step,
                               history=self.history, fingerprint=self.fingerprint())

    def resume(self, directory: str | os.PathLike) -> None:
        """Load a checkpoint (epoch, step, history, weights, optimizer state)."""
        st = load_checkpoint(directory, model=self.model, loss=self.loss_fn, optimizer=self.optimizer,
                             scheduler=self.scheduler, scaler=self.scaler, fingerprint=self.fingerprint())
        self.epoch, self.stepper.step, self.history = st["epoch"], st["step"], st["history"]

    # ------------------------------------------------------------------ the loop
    def train_epoch(self, step_log: CsvLog | None = None, tb=None) -> dict:
        """Train one epoch (``self.epoch`` -> ``self.epoch + 1``).

        Returns:
            ``{"train_loss", "train_images", "skipped", "images_per_s", "train_seconds"}``.
        """
        cfg = self.cfg
        seed_everything(cfg.seed, self.epoch + 1)
        self.sampler.set_epoch(self.epoch)
        loader = self._loader()
        n_batches = len(loader)
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=n_batches, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        losses, images, skipped = [], 0, 0
        win_loss, win_images, win_t = [], 0, time.perf_counter()
        train_time = 0.0
        t_batch = time.perf_counter()
        pending = False  # gradients accumulated since the last optimizer step
        for i, (x, y, bad) in enumerate(loader):
            skipped += bad
            stepping = (i + 1) % cfg.accum_steps == 0 or i == n_batches - 1
            if len(y):
                losses.append(self.train_batch(x, y, step=False))
                images += len(y)
                win_loss.append(losses[-1])
                win_images += len(y)
                pending = True
            if stepping:
                if pending:
                    self.stepper.optimizer_step()
                else:  # every image of the cycle was bad: keep the schedule on time
                    self.stepper.skip_step()
                pending = False
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            train_time += now - t_batch
            t_batch = now
            lr_top = max(g["lr"] for g in self.optimizer.param_groups if g["name"] != "arcface W")
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses else "-", lr=f"{lr_top:.2e}")
                bar.update(1)
            if stepping and win_loss and (self.step % cfg.log_every == 0 or i == n_batches - 1):
                row = {"epoch": self.epoch + 1, "step": self.step, "loss": float(np.mean(win_loss)), "lr_top": lr_top,
                       "lr_w": self.optimizer.param_groups[-1]["lr"], "images_per_s": win_images / max(1e-9, now - win_t)}
                if step_log is not None:
                    step_log.write(row)
                if tb is not None:
                    tb.add_scalar("train/loss", row["loss"], self.step)
                    tb.add_scalar("train/lr_top", row["lr_top"], self.step)
                win_loss, win_images, win_t = [], 0, now
        if bar is not None:
            bar.close()
        self.epoch += 1
        self.skipped_at_load += skipped
        return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "train_images": images,
                "skipped": skipped, "images_per_s": images / max(1e-9, train_time), "train_seconds": train_time}

    def fit(self, before: ZeroShotResult | None = None, *, export: bool = True, stop_after: int | None = None) -> dict | None:
        """Train ``cfg.epochs`` epochs (resuming if asked), evaluating and checkpointing after
        each, then write the outputs.

        Args:
            before: a zero-shot result of the initial weights already measured (depth sweep).
            export: write ``encoder.safetensors`` and the extra exports.
            stop_after: stop once this many epochs are done, leaving only the checkpoint (an
                interruption, for tests); returns None then.

        Returns:
            The metrics (also written to ``metrics.json``), or None when stopped early.
        """
        cfg = self.cfg
        t_start = time.perf_counter()
        resume = cfg.resume
        if resume == "auto":
            resume = str(self.out / "checkpoint") if (self.out / "checkpoint").is_dir() else None
        if resume:
            self.resume(resume)
        if self.skipped_files():
            write_skipped(self.out / "skipped_images.csv", self.data.skipped)
        before_d = next((h["before"] for h in self.history if "before" in h), None)
        if before_d is None:
            res = before or self.evaluate()
            before_d = result_record(res)
            if cfg.init_class_weights == "mean":
                self.imprint()
            self.history.append({"epoch": 0, "before": before_d})
        self._write_config()
        append = bool(resume)
        step_log = CsvLog(self.out / "train_log.csv", STEP_COLUMNS, append)
        epoch_log = CsvLog(self.out / "epochs.csv", EPOCH_COLUMNS, append)
        tb = open_tensorboard(self.out, cfg.tensorboard)
        try:
            while self.epoch < cfg.epochs:
                row = self.train_epoch(step_log, tb)
                row.update(epoch=self.epoch, step=self.step)
                if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
                    t0 = time.perf_counter()
                    res = self.evaluate()
                    rec = result_record(res)
                    row.update(zero_shot_top1=rec["top1"], zero_shot_per_class_top1=rec["per_class_top1"],
                               eval_seconds=time.perf_counter() - t0, per_class=rec["per_class"])
                    if tb is not None:
                        tb.add_scalar("zero_shot/top1", res.top1, self.epoch)
                        tb.add_scalar("zero_shot/per_class_top1", rec["per_class_top1"], self.epoch)
                logger.info("epoch %d/%d: loss %.4f, %d images (%d skipped), %.1f images/s", self.epoch, cfg.epochs,
                            row["train_loss"], row["train_images"], row["skipped"], row["images_per_s"])
                epoch_log.write(row)
                self.history.append(row)
                self.save_checkpoint()
                if stop_after is not None and self.epoch >= stop_after and self.epoch < cfg.epochs:
                    return None
        finally:
            step_log.close()
            epoch_log.close()
            if tb is not None:
                tb.close()
        metrics = self._metrics(before_d, time.perf_counter() - t_start)
        if export:
            self.export()
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        logger.info("zero-shot top-1 %.4f -> %.4f, per-class average %.4f -> %.4f (held-out classes); outputs in %s",
                    metrics["zero_shot_top1_before"], metrics["zero_shot_top1_after"],
                    metrics["zero_shot_per_class_top1_before"], metrics["zero_shot_per_class_top1_after"], self.out)
        return metrics

    def skipped_files(self) -> int:
        """Bad images dropped when the data were read."""
        return len(self.data.skipped)

    def _metrics(self, before: dict, seconds: float) -> dict:
        skipped = {"train": sum(1 for s in self.data.skipped if s[0] == "train"),
                   "eval": sum(1 for s in self.data.skipped if s[0] == "eval"), "at_load": self.skipped_at_load}
        return run_metrics(before, self.history, augmentations=self.cfg.augmentations, train_classes=len(self.data.train.classes),
                           train_images=len(self.data.train.samples), depth=self.cfg.depth, epochs=self.epoch, steps=self.step,
                           seconds=seconds, device=self.device, precision=self.precision, skipped_images=skipped)

    def _write_config(self) -> None:
        resolved = {
            "device": str(self.device), "precision": self.precision, "freeze_bn": self.freeze_bn,
            "frozen_bn_layers": self.frozen_bn_layers, "grad_checkpointing": self.grad_checkpointing,
            "workers": self.workers, "embedding_size": self.embedding_size, "initial_encoder": self.encoder.identity.key,
            "input": {k: list(v) if isinstance(v, tuple) else v for k, v in input_config(self.encoder).items()},
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
            "effective_batch_size": self.cfg.batch_size * self.cfg.accum_steps,
        }
        write_config(self.out / "config.json", self.cfg, resolved, spec=f"{self.spec.backend}:{self.spec.model}",
                     weights=self.out / "encoder.safetensors", param_groups=describe_groups(self.groups),
                     sampler=self.sampler.summary(), train_classes=list(self.data.train.classes),
                     eval_classes=self.data.eval.classes)

    def export(self) -> Path:
        """Write ``encoder.safetensors`` (and ``--export`` formats), checked to load in
        :func:`retailklip.create_encoder` with the same features (:func:`finetune.export.export_run`)."""
        return export_run(self.model, self.out, spec=f"{self.spec.backend}:{self.spec.model}",
                          size=tuple(input_config(self.encoder)["size"]), formats=self.cfg.export,
                          encoder_options=self.cfg.encoder_options)
