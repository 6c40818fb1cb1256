"""The training loop: RetailKLIP finetuning on one GPU (or the CPU), §4.1.

Per epoch: the class-balanced sampler (§4.1.3) draws breadth x depth images; each batch goes
through the encoder under autocast (bf16, or fp16 with a gradient scaler), the float32
features into ArcFace; gradients are accumulated over ``accum_steps`` micro-batches, clipped,
and AdamW steps with blockwise learning-rate decay (§4.1.2) under a warm-up + cosine schedule.
After the epoch: zero-shot evaluation on the held-out classes (§4.2), a row in ``epochs.csv``
and a checkpoint.  At the end: ``encoder.safetensors`` (loadable by ``catalog init``),
``config.json``, ``metrics.json``.

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

import csv
import json
import logging
import math
import os
import random
import resource
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retailklip.encoders import PRECISIONS, EncoderSpec

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, resolve_device, resolve_precision
from .data import (
    EvalSplit,
    ImageDataset,
    LabeledData,
    check_disjoint,
    check_images,
    collate_skipping_bad,
    read_samples,
    write_skipped,
)
from retailklip.evaluation import ZeroShotResult

from .evaluate import ZeroShotEvaluator, result_record
from .export import export_onnx, export_torchscript, save_encoder
from .loss import create_arcface, imprint_class_weights
from .model import (
    build_encoder,
    freeze_batchnorm,
    input_config,
    resolve_freeze_bn,
    resolve_grad_checkpointing,
    set_grad_checkpointing,
    train_transform,
)
from .optim import create_optimizer, describe_groups, format_lr_table, param_groups, warmup_cosine
from .sampler import ClassBalancedSampler

logger = logging.getLogger(__name__)

#: Training images per class (eval preprocessing, no augmentation) whose mean embedding imprints W.
IMPRINT_IMAGES = 4


@dataclass
class PreparedData:
    """Checked training and evaluation data (reusable across the runs of a depth sweep).

    Attributes:
        train: training samples with targets.
        eval: held-out references and queries.
        skipped: ``(set, path, reason)`` of every bad image dropped.
    """

    train: LabeledData
    eval: EvalSplit
    skipped: list[tuple[str, Path, str]] = field(default_factory=list)


def prepare_data(data: str, eval_data: str, workers: int = 4) -> PreparedData:
    """Read both datasets, drop bad images (reported with a count) and check them.

    Raises:
        FinetuneError: empty or single-class training data, an unusable evaluation set, or
            evaluation classes that are also training classes.
    """
    t0 = time.perf_counter()
    train_samples, eval_samples = read_samples(data), read_samples(eval_data)
    train_good, train_bad = check_images(train_samples, workers)
    eval_good, eval_bad = check_images(eval_samples, workers)
    train = LabeledData.from_samples(train_good, f"training data {data}")
    split = EvalSplit.from_samples(eval_good, f"evaluation data {eval_data}")
    check_disjoint(train.classes, split.classes)
    skipped = [("train", p, r) for p, r in train_bad] + [("eval", p, r) for p, r in eval_bad]
    logger.info("data: %d training images in %d classes, %d held-out classes with %d queries; %d bad image(s) skipped "
                "(%d train, %d eval) [%.1fs]", len(train.samples), len(train.classes), len(split.references),
                len(split.queries), len(skipped), len(train_bad), len(eval_bad), time.perf_counter() - t0)
    return PreparedData(train, split, skipped)


def seed_everything(seed: int, epoch: int = 0) -> None:
    """Seed torch (CPU and CUDA), numpy and ``random`` from ``(seed, epoch)``."""
    s = (int(seed) * 1_000_003 + int(epoch)) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory [MiB]: CUDA max allocated on a GPU, else the process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class _CsvLog:
    def __init__(self, path: Path, columns: list[str], append: bool) -> None:
        self.columns = columns
        new = not (append and path.exists())
        self.f = open(path, "a" if not new else "w", newline="")  # noqa: SIM115 - closed by close()
        self.w = csv.DictWriter(self.f, columns, extrasaction="ignore")
        if new:
            self.w.writeheader()

    def write(self, row: dict) -> None:
        self.w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


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
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu" and self.precision == "fp16":
            logger.warning("fp16 autocast on the CPU is slow and unscaled; prefer bf16 or fp32")
        self.workers = cfg.workers if cfg.workers is not None else (0 if self.device.type == "cpu" else min(8, os.cpu_count() or 1))
        self.data = data or prepare_data(cfg.data, cfg.eval_data, workers=max(2, self.workers))
        seed_everything(cfg.seed)

        # The zero-shot evaluation runs in float32, as a catalog does by default.
        self.encoder = build_encoder(cfg.encoder, weights=cfg.weights, random_init=cfg.random_init, seed=cfg.seed,
                                     device=str(self.device), eval_precision="fp32",
                                     batch_size=cfg.eval_batch_size, options=cfg.encoder_options)
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
            self.loss_fn = create_arcface(n_classes, self.embedding_size, margin=cfg.margin, scale=cfg.scale).to(self.device)
        self.groups = param_groups(self.model, lr=cfg.lr, decay=cfg.lr_decay, weight_decay=cfg.weight_decay,
                                   loss=self.loss_fn, loss_lr=cfg.loss_lr, frozen_blocks=cfg.freeze_blocks)
        logger.info("AdamW parameter groups (blockwise learning-rate decay, RetailKLIP 4.1.2):\n%s", format_lr_table(self.groups))
        self.optimizer = create_optimizer(self.groups, fused=True if self.device.type == "cuda" else None)

        self.sampler = ClassBalancedSampler(self.data.train.targets, cfg.depth, seed=cfg.seed)
        logger.info("%s", self.sampler.summary())
        batches = math.ceil(len(self.sampler) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(batches / cfg.accum_steps)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = warmup_cosine(self.optimizer, self.warmup_steps, self.total_steps, cfg.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.transform = train_transform(self.encoder, scale=(cfg.crop_scale, 1.0), size=cfg.train_size)
        self.evaluator = ZeroShotEvaluator(self.data.eval, self.encoder, augmentations=cfg.augmentations, seed=cfg.eval_seed,
                                           cache_mb=cfg.eval_cache_mb, progress=cfg.progress)
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.skipped_at_load = 0

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=PRECISIONS[self.precision])

    def fingerprint(self) -> dict:
        """What a checkpoint must share with this run to be resumed."""
        return {"encoder": str(self.spec), "classes": list(self.data.train.classes), "embedding_size": self.embedding_size,
                "groups": [g["name"] for g in self.groups], "depth": self.cfg.depth, "batch_size": self.cfg.batch_size,
                "accum_steps": self.cfg.accum_steps, "epochs": self.cfg.epochs, "seed": self.cfg.seed}

    def train_batch(self, images: torch.Tensor, targets: torch.Tensor, *, step: bool = True) -> float:
        """Forward and backward one micro-batch; with ``step`` also clip, step the optimizer,
        the scheduler, and zero the gradients.

        Args:
            images: float32 (B, 3, H, W) preprocessed images.
            targets: int64 (B,) class indices.
            step: end of an accumulation cycle.

        Returns:
            The batch's ArcFace loss (float, before division by ``accum_steps``).
        """
        self.model.train()
        x = images.to(self.device, non_blocking=True)
        y = targets.to(self.device, non_blocking=True)
        with self._autocast():
            feats = self.model(x)
        loss = self.loss_fn(feats.float(), y)
        self.scaler.scale(loss / self.cfg.accum_steps).backward()
        if step:
            self._optimizer_step()
        return float(loss.detach())

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

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
        ds = ImageDataset(self.data.train.samples, self.data.train.targets, self.transform, self.encoder.background)
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
        self.epoch, self.step, self.history = st["epoch"], st["step"], st["history"]

    # ------------------------------------------------------------------ the loop
    def train_epoch(self, step_log: _CsvLog | None = None, tb=None) -> dict:
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
                    self._optimizer_step()
                else:  # every image of the cycle was bad: keep the schedule on time
                    self.scheduler.step()
                    self.step += 1
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
        step_log = _CsvLog(self.out / "train_log.csv", ["epoch", "step", "loss", "lr_top", "lr_w", "images_per_s"], append)
        epoch_log = _CsvLog(self.out / "epochs.csv", ["epoch", "step", "train_loss", "zero_shot_top1", "zero_shot_per_class_top1",
                                                       "train_images", "skipped", "images_per_s", "train_seconds", "eval_seconds"], append)
        tb = self._tensorboard()
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
        return len(self.data.skipped)

    def _metrics(self, before: dict, seconds: float) -> dict:
        epochs = [h for h in self.history if h.get("epoch", 0) >= 1]
        evaluated = [h for h in epochs if "zero_shot_top1" in h]
        last = evaluated[-1]
        best = max(evaluated, key=lambda h: h["zero_shot_per_class_top1"])
        train_s = sum(h["train_seconds"] for h in epochs)
        return {
            "zero_shot_top1_before": before["top1"],
            "zero_shot_top1_after": last["zero_shot_top1"],
            "zero_shot_per_class_top1_before": before["per_class_top1"],
            "zero_shot_per_class_top1_after": last["zero_shot_per_class_top1"],
            "best_epoch": best["epoch"],
            "best_zero_shot_per_class_top1": best["zero_shot_per_class_top1"],
            "held_out_classes": before["num_classes"],
            "held_out_queries": before["num_queries"],
            "augmentations": self.cfg.augmentations,
            "train_classes": len(self.data.train.classes),
            "train_images": len(self.data.train.samples),
            "depth": self.cfg.depth,
            "epochs": self.epoch,
            "steps": self.step,
            "train_images_per_s": sum(h["train_images"] for h in epochs) / max(1e-9, train_s),
            "train_seconds": train_s,
            "run_seconds": seconds,
            "peak_memory_mb": peak_memory_mb(self.device),
            "device": str(self.device),
            "precision": self.precision,
            "skipped_images": {"train": sum(1 for s in self.data.skipped if s[0] == "train"),
                               "eval": sum(1 for s in self.data.skipped if s[0] == "eval"),
                               "at_load": self.skipped_at_load},
            "per_class_before": before["per_class"],
            "per_class_after": last["per_class"],
            "history": [{k: v for k, v in h.items() if k not in ("per_class", "before")} for h in epochs],
        }

    def _write_config(self) -> None:
        import open_clip
        import pytorch_metric_learning
        import timm

        weights = self.out / "encoder.safetensors"
        opts = " ".join("--encoder-option " + shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}")
                        for k, v in self.cfg.encoder_options.items())
        config = {
            "settings": self.cfg.to_dict(),
            "resolved": {
                "device": str(self.device), "precision": self.precision, "freeze_bn": self.freeze_bn,
                "frozen_bn_layers": self.frozen_bn_layers, "grad_checkpointing": self.grad_checkpointing,
                "workers": self.workers, "embedding_size": self.embedding_size,
                "initial_encoder": self.encoder.identity.key, "input": {k: list(v) if isinstance(v, tuple) else v for k, v in input_config(self.encoder).items()},
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "effective_batch_size": self.cfg.batch_size * self.cfg.accum_steps,
            },
            "param_groups": describe_groups(self.groups),
            "sampler": self.sampler.summary(),
            "train_classes": list(self.data.train.classes),
            "eval_classes": self.data.eval.classes,
            "catalog_command": f"catalog init --encoder {self.spec.backend}:{self.spec.model} --weights {shlex.quote(str(weights))}" + (f" {opts}" if opts else ""),
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "open_clip": open_clip.__version__,
                         "pytorch_metric_learning": pytorch_metric_learning.__version__},
            "command": sys.argv,
        }
        (self.out / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("--tensorboard: the tensorboard package is not installed; logging to CSV only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def export(self) -> Path:
        """Write ``encoder.safetensors`` (and ``--export`` formats) and check that
        :func:`retailklip.create_encoder` loads it and computes the same features."""
        path = save_encoder(self.model, self.out / "encoder.safetensors",
                            metadata={"spec": f"{self.spec.backend}:{self.spec.model}", "producer": "retailklip finetune"})
        self._check_loadable(path)
        size = tuple(input_config(self.encoder)["size"])
        if "torchscript" in self.cfg.export:
            logger.info("wrote %s", export_torchscript(self.model, self.out / "encoder.torchscript.pt", size))
        if "onnx" in self.cfg.export:
            logger.info("wrote %s", export_onnx(self.model, self.out / "encoder.onnx", size))
        logger.info("wrote %s; use it with: catalog init --encoder %s:%s --weights %s", path, self.spec.backend,
                    self.spec.model, path)
        return path

    def _check_loadable(self, path: Path) -> None:
        from retailklip import create_encoder

        from .export import inference_module

        enc = create_encoder(f"{self.spec.backend}:{self.spec.model}", weights=path, **self.cfg.encoder_options)
        size = tuple(input_config(self.encoder)["size"])
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = enc.model(x)
            b = inference_module(self.model)(x)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"{path}: the exported encoder does not reproduce the trained one "
                               f"(max difference {float((a - b).abs().max()):.3g})")
