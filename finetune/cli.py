"""``python -m finetune``: RetailKLIP finetuning of a catalog encoder (see docs/finetune.md).

    python -m finetune --data TRAIN.csv --eval-data EVAL.csv --encoder SPEC --weights FILE \\
        --epochs N --depth D --out DIR

Exit codes: 0 success; 1 a clear error (bad data, bad setting, missing weights), printed as one
line ``finetune: error: ...`` on stderr; 2 bad command-line usage; 130 interrupted (the last
epoch's checkpoint stays in ``OUT/checkpoint``; rerun with ``--resume auto``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from retailklip.augment import DEFAULT_AUGMENTATIONS
from retailklip.encoders import DEFAULT_ENCODER_SPEC
from retailklip.errors import RetailKlipError
from retailklip.weights import parse_key_value

from .config import TrainConfig
from .export import EXPORT_FORMATS
from .loss import DEFAULT_MARGIN_DEGREES, DEFAULT_SCALE
from .optim import DEFAULT_LR, DEFAULT_LR_DECAY

logger = logging.getLogger("finetune")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one depth")
    return values


def _formats(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in EXPORT_FORMATS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown export format(s) {', '.join(bad)}; choose from {', '.join(EXPORT_FORMATS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig("", "", "")
    p = argparse.ArgumentParser(
        prog="finetune",
        description="Finetune a retailklip encoder RetailKLIP-style (ArcFace, blockwise learning-rate decay, "
                    "class balancing) and evaluate it zero-shot on held-out classes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="TRAIN",
                   help="training CSV image,label[,role] (paths relative to the CSV; role reference|query) or folder per class")
    g.add_argument("--eval-data", required=True, metavar="EVAL",
                   help="held-out classes: CSV image,label[,role] (role reference|query; default: first image of a label is its reference) or folder per class")
    g.add_argument("--out", required=True, metavar="DIR", help="output directory")
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default=DEFAULT_ENCODER_SPEC, metavar="SPEC", help="open_clip:MODEL[/TAG] or timm:MODEL, as in catalog init")
    g.add_argument("--weights", default=None, metavar="FILE", help="initial weights (safetensors or PyTorch state dict)")
    g.add_argument("--encoder-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, repeatable, as in catalog init (e.g. interpolation=bilinear)")
    g.add_argument("--random-init", action="store_true", help="random initial weights (tests, benchmarks)")
    g = p.add_argument_group("class balancing (RetailKLIP 4.1.3)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--depth", type=int, default=d.depth, metavar="D", help="images per class per epoch")
    g.add_argument("--sweep-depth", type=_int_list, default=None, metavar="D1,D2,...",
                   help="first run short trainings with these depths and keep the best (held-out per-class top-1)")
    g.add_argument("--sweep-epochs", type=int, default=None, help="epochs of each sweep run (default: --epochs)")
    g.add_argument("--sweep-eval-data", default=None, metavar="EVAL", help="held-out classes that pick the depth (default: --eval-data)")
    g.add_argument("--reference-copies", type=int, default=d.reference_copies, metavar="N",
                   help="each training row of role 'reference' (a packshot) counts N times in the class-balanced draw")
    g.add_argument("--reference-backgrounds", type=float, default=d.reference_backgrounds, metavar="P",
                   help="probability that a drawn reference image (a packshot on white) gets a random crop of a training "
                        "photo (role 'query') pasted behind it (finetune/backgrounds.py; default 0: never)")
    g.add_argument("--outlier-data", default=None, metavar="OUTLIERS",
                   help="Outlier Exposure (Hendrycks et al., ICLR 2019): CSV image,label or folder per label of OTHER "
                        "products (no training or evaluation class), pushed away from every class; each label is "
                        "balanced like a class")
    g.add_argument("--outlier-weight", type=float, default=d.outlier_weight, metavar="LAMBDA",
                   help="weight of the Outlier Exposure term (default 0.5, the paper's)")
    g = p.add_argument_group("loss and optimizer (RetailKLIP 4.1, 4.1.2)")
    g.add_argument("--margin", type=float, default=DEFAULT_MARGIN_DEGREES, help="ArcFace angular margin, degrees")
    g.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="ArcFace logit scale")
    g.add_argument("--sub-centers", type=int, default=d.sub_centers, metavar="K",
                   help="ArcFace proxies per class (> 1: Sub-center ArcFace, Deng et al. ECCV 2020)")
    g.add_argument("--init-class-weights", choices=("mean", "random"), default=d.init_class_weights,
                   help="ArcFace W from class-mean embeddings (imprinting) or random")
    g.add_argument("--lr", type=float, default=DEFAULT_LR, help="learning rate of the top block, final norm and projection")
    g.add_argument("--lr-decay", type=float, default=DEFAULT_LR_DECAY, help="learning-rate factor per lower block")
    g.add_argument("--loss-lr", type=float, default=d.loss_lr, help="learning rate of ArcFace's class-weight matrix W")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (not on norms, biases, W)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up, then cosine decay")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final learning rate / initial")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="gradient-norm clipping (0: off)")
    g.add_argument("--freeze-blocks", type=int, default=0, metavar="N", help="freeze the embeddings and the N lowest blocks")
    g = p.add_argument_group("single GPU")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--accum-steps", type=int, default=d.accum_steps, help="gradient accumulation micro-batches per step")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision (auto: bf16 on GPUs that have it, else fp16 + grad scaler; fp32 on CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--freeze-bn", choices=("auto", "on", "off"), default="auto",
                   help="freeze BatchNorm (auto: CNN trunks at batch < 32, or folded BatchNorm statistics)")
    g.add_argument("--grad-checkpointing", choices=("auto", "on", "off"), default="auto", help="auto: ViT-L and larger")
    g.add_argument("--train-size", type=int, default=None, metavar="PX", help="train at this square size (default: the encoder's)")
    g.add_argument("--crop-scale", type=float, default=d.crop_scale, help="smallest random-resized-crop area fraction")
    g.add_argument("--workers", type=int, default=None, help="data-loader processes (default: 0 on CPU, up to 8 on GPU)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core; 1 on a busy shared CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default=None, metavar="DIR|auto", help="resume from a checkpoint (auto: OUT/checkpoint if present)")
    g = p.add_argument_group("zero-shot evaluation (RetailKLIP 4.2)")
    g.add_argument("--augmentations", type=int, default=DEFAULT_AUGMENTATIONS, metavar="K",
                   help="views per reference image, the catalog's augmentation")
    g.add_argument("--eval-seed", type=int, default=0, help="augmentation seed (the catalog's default)")
    g.add_argument("--eval-every", type=int, default=1, metavar="N", help="evaluate every N epochs (the last always)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g = p.add_argument_group("output")
    g.add_argument("--export", type=_formats, default=[], metavar="FORMATS", help=f"also export {','.join(EXPORT_FORMATS)}")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (needs tensorboard)")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="STEPS", help="train_log.csv interval")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Map parsed arguments onto a :class:`TrainConfig`."""
    return TrainConfig(
        data=args.data, eval_data=args.eval_data, out=args.out, encoder=args.encoder, weights=args.weights,
        random_init=args.random_init, encoder_options=dict(args.encoder_option), epochs=args.epochs, depth=args.depth,
        sweep_depth=args.sweep_depth, sweep_epochs=args.sweep_epochs, sweep_eval_data=args.sweep_eval_data,
        reference_copies=args.reference_copies, reference_backgrounds=args.reference_backgrounds,
        outlier_data=args.outlier_data, outlier_weight=args.outlier_weight,
        batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr, lr_decay=args.lr_decay, loss_lr=args.loss_lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, min_lr_ratio=args.min_lr_ratio,
        clip_grad=args.clip_grad or None, margin=args.margin, scale=args.scale, sub_centers=args.sub_centers, init_class_weights=args.init_class_weights,
        freeze_bn=args.freeze_bn, freeze_blocks=args.freeze_blocks, grad_checkpointing=args.grad_checkpointing,
        precision=args.precision, device=args.device, train_size=args.train_size, crop_scale=args.crop_scale,
        augmentations=args.augmentations, eval_seed=args.eval_seed, eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size, workers=args.workers, threads=args.threads, seed=args.seed, resume=args.resume, export=args.export,
        tensorboard=args.tensorboard, log_every=args.log_every, progress=not args.no_progress,
    )


def run(cfg: TrainConfig) -> dict:
    """Sweep the depth if asked, then train, evaluate and export; returns the metrics."""
    from pathlib import Path

    from .data import prepare_data
    from .sweep import sweep_depth
    from .train import Trainer

    cfg.validate()
    data = prepare_data(cfg.data, cfg.eval_data, workers=max(2, cfg.workers or 0), reference_copies=cfg.reference_copies,
                        outlier_data=cfg.outlier_data)
    sweep, before = None, None
    if cfg.sweep_depth:
        best, sweep, sweep_before = sweep_depth(cfg, data)
        if not cfg.sweep_eval_data:
            before = sweep_before
        logger.info("depth sweep chose d = %d", best)
        cfg = dataclasses.replace(cfg, depth=best)
    metrics = Trainer(cfg, data).fit(before)
    if sweep is not None:
        metrics["depth_sweep"] = sweep
        (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("huggingface_hub").propagate = False  # it prints through its own handler: not twice
    try:
        m = run(config_from_args(args))
    except RetailKlipError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("finetune: interrupted; resume with --resume auto", file=sys.stderr)
        return 130
    print(f"zero-shot top-1 on held-out classes: {m['zero_shot_top1_before']:.4f} -> {m['zero_shot_top1_after']:.4f} "
          f"(per-class average {m['zero_shot_per_class_top1_before']:.4f} -> {m['zero_shot_per_class_top1_after']:.4f}); "
          f"weights: {args.out}/encoder.safetensors")
    return 0
