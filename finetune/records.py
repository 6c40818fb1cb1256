"""What a run writes besides weights and checkpoints: ``config.json``, ``metrics.json``, CSV logs, TensorBoard.

Output files (directory ``OUT``)::

    OUT/config.json           settings, resolved choices, parameter-group table, classes, versions
    OUT/metrics.json          zero_shot_top1_before / _after, per-class averages, history, speed
    OUT/epochs.csv            one row per epoch (EPOCH_COLUMNS)
    OUT/train_log.csv         loss, learning rate, images/s every --log-every steps (STEP_COLUMNS)
    OUT/tensorboard/          with --tensorboard

The zero-shot numbers in them use the finetune's on-disk keys (``zero_shot_per_class_top1``,
``per_class_top1``; :func:`finetune.evaluate.result_record`).
"""

from __future__ import annotations

import csv
import json
import logging
import resource
import shlex
import sys
from pathlib import Path

import torch

from .config import TrainConfig

logger = logging.getLogger(__name__)

STEP_COLUMNS = ["epoch", "step", "loss", "lr_top", "lr_w", "images_per_s"]
EPOCH_COLUMNS = ["epoch", "step", "train_loss", "zero_shot_top1", "zero_shot_per_class_top1", "train_images", "skipped",
                 "images_per_s", "train_seconds", "eval_seconds"]


class CsvLog:
    """A CSV file written row by row and flushed after each (floats with 6 significant digits).

    Args:
        path: the file; ``columns``: its header (other keys of a row are ignored).
        append: continue an existing file (a resumed run) instead of starting a new one.
    """

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


def open_tensorboard(out: Path, enabled: bool):
    """A ``SummaryWriter`` on ``OUT/tensorboard``, or None when disabled or tensorboard is not
    installed (then a warning: the CSV logs still have everything)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("--tensorboard: the tensorboard package is not installed; logging to CSV only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory [MiB]: CUDA max allocated on a GPU, else the process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def write_config(path: Path, cfg: TrainConfig, resolved: dict, *, spec: str, weights: Path, **tables) -> None:
    """Write ``config.json``: ``settings`` (``cfg``), ``resolved`` (choices made at start),
    the ``tables`` given (parameter groups, sampler, classes), the ``catalog init`` command for
    ``weights`` with encoder ``spec`` (``backend:model``), library versions and the command line."""
    import open_clip
    import pytorch_metric_learning
    import timm

    opts = " ".join("--encoder-option " + shlex.quote(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}")
                    for k, v in cfg.encoder_options.items())
    config = {
        "settings": cfg.to_dict(),
        "resolved": resolved,
        **tables,
        "catalog_command": f"catalog init --encoder {spec} --weights {shlex.quote(str(weights))}" + (f" {opts}" if opts else ""),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "open_clip": open_clip.__version__,
                     "pytorch_metric_learning": pytorch_metric_learning.__version__},
        "command": sys.argv,
    }
    path.write_text(json.dumps(config, indent=1, default=str) + "\n")


def run_metrics(before: dict, history: list[dict], *, augmentations: int, train_classes: int, train_images: int, depth: int,
                epochs: int, steps: int, seconds: float, device: torch.device, precision: str,
                skipped_images: dict[str, int]) -> dict:
    """The ``metrics.json`` dict.

    Args:
        before: :func:`finetune.evaluate.result_record` of the initial weights.
        history: the run's history; its epoch rows (``epoch >= 1``) that were evaluated carry
            ``zero_shot_top1``, ``zero_shot_per_class_top1`` and ``per_class`` (at least one).
        augmentations ... precision: recorded as given (``seconds``: the run's wall time [s]).
        skipped_images: bad images dropped, ``{"train", "eval", "at_load"}``.

    Returns:
        ``zero_shot_top1_before/_after``, ``zero_shot_per_class_top1_before/_after``,
        ``best_epoch`` / ``best_zero_shot_per_class_top1``, ``held_out_classes`` / ``_queries``,
        the arguments, ``train_images_per_s``, ``train_seconds``, ``peak_memory_mb``, the
        per-class results before / after and the history without per-class detail.
    """
    epochs_done = [h for h in history if h.get("epoch", 0) >= 1]
    evaluated = [h for h in epochs_done if "zero_shot_top1" in h]
    last = evaluated[-1]
    best = max(evaluated, key=lambda h: h["zero_shot_per_class_top1"])
    train_s = sum(h["train_seconds"] for h in epochs_done)
    return {
        "zero_shot_top1_before": before["top1"],
        "zero_shot_top1_after": last["zero_shot_top1"],
        "zero_shot_per_class_top1_before": before["per_class_top1"],
        "zero_shot_per_class_top1_after": last["zero_shot_per_class_top1"],
        "best_epoch": best["epoch"],
        "best_zero_shot_per_class_top1": best["zero_shot_per_class_top1"],
        "held_out_classes": before["num_classes"],
        "held_out_queries": before["num_queries"],
        "augmentations": augmentations,
        "train_classes": train_classes,
        "train_images": train_images,
        "depth": depth,
        "epochs": epochs,
        "steps": steps,
        "train_images_per_s": sum(h["train_images"] for h in epochs_done) / max(1e-9, train_s),
        "train_seconds": train_s,
        "run_seconds": seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
        "precision": precision,
        "skipped_images": skipped_images,
        "per_class_before": before["per_class"],
        "per_class_after": last["per_class"],
        "history": [{k: v for k, v in h.items() if k not in ("per_class", "before")} for h in epochs_done],
    }
