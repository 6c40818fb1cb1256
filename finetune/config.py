"""The settings of a training run (what ``python -m finetune`` flags set), written to ``config.json``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from retailklip.augment import DEFAULT_AUGMENTATIONS
from retailklip.encoders import DEFAULT_ENCODER_SPEC, EncoderSpec

from .errors import FinetuneError
from .export import EXPORT_FORMATS
from .loss import DEFAULT_MARGIN_DEGREES, DEFAULT_OUTLIER_WEIGHT, DEFAULT_SCALE
from .optim import DEFAULT_LR, DEFAULT_LR_DECAY


@dataclass
class TrainConfig:
    """Settings of one finetuning run; defaults follow RetailKLIP §4.1 where it gives a value.

    Attributes (units in brackets):
        data: training CSV (``image,label[,role]``) or folder per class.
        reference_copies: times each training image with role ``reference`` (a product's reference
            image, e.g. its packshot) enters the class-balanced sampler's pool; 1 = once, like any image.
        reference_backgrounds: probability [0, 1] that a drawn reference image gets a random crop of
            one of the training ``query`` photos pasted behind it (:mod:`finetune.backgrounds`); 0 = never.
        outlier_data: CSV or folder of images of other products (neither training nor evaluation
            classes) for Outlier Exposure (:class:`finetune.loss.OutlierExposureLoss`), or None.
        outlier_weight: weight lambda > 0 of the Outlier Exposure term.
        eval_data: held-out classes, CSV (``image,label[,role]``) or folder per class.
        out: output directory.
        encoder: encoder SPEC as in ``catalog init``.
        weights: local weights file, or None (tag or ``random_init``).
        random_init: random initial weights (tests, benchmarks).
        encoder_options: backend options as in ``catalog init --encoder-option``.
        epochs: training epochs (one epoch = breadth x depth images).
        depth: d, images per class per epoch (§4.1.3).
        sweep_depth: depths to try in short runs before the real one (§4.1.3), or None.
        sweep_epochs: epochs of each sweep run (None: ``epochs``).
        sweep_eval_data: held-out classes that pick the depth (None: ``eval_data``).
        batch_size: images per forward pass.
        accum_steps: micro-batches per optimizer step (effective batch = batch_size x accum_steps).
        lr: learning rate of the top block and head (§4.1.2: 2e-4).
        lr_decay: per-block learning-rate factor (§4.1.2: 0.7).
        loss_lr: learning rate of the ArcFace class-weight matrix W.
        weight_decay: AdamW weight decay of weight matrices and kernels.
        warmup_epochs: linear warm-up length [epochs, fractional]; cosine decay afterwards.
        min_lr_ratio: final learning rate as a fraction of each group's rate.
        clip_grad: gradient-norm clipping threshold, or None.
        margin: ArcFace additive angular margin [degrees].
        scale: ArcFace logit scale.
        sub_centers: ArcFace proxies per class (1: ArcFace; > 1: Sub-center ArcFace, ECCV 2020).
        init_class_weights: ``"mean"`` (imprint W with class-mean embeddings) or ``"random"``.
        freeze_bn: ``auto`` / ``on`` / ``off`` (auto: CNN at batch < 32 or folded statistics).
        freeze_blocks: freeze the embeddings and this many lowest blocks.
        grad_checkpointing: ``auto`` / ``on`` / ``off`` (auto: ViT-L and larger).
        precision: ``auto`` / ``fp32`` / ``bf16`` / ``fp16`` (auto: bf16 on a GPU that has it,
            else fp16 with a gradient scaler; fp32 on the CPU).
        device: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1`` ...
        train_size: square training resolution [px], or None for the encoder's own.
        crop_scale: smallest random-resized-crop area [fraction of the image].
        augmentations: K views per reference in the zero-shot evaluation (the catalog's K).
        eval_seed: augmentation seed of the evaluation (the catalog's default 0).
        eval_every: evaluate every this many epochs (the last epoch always).
        eval_batch_size: evaluation batch size.
        eval_cache_mb: memory for cached evaluation tensors [MiB].
        workers: data-loader processes (None: 0 on the CPU, up to 8 on a GPU).
        threads: torch intra-op CPU threads (None: torch's default, one per core); 1 is much
            faster on a CPU shared with other busy processes.
        seed: seed of everything (sampler, transforms, ArcFace init).
        resume: checkpoint directory, ``"auto"`` (``OUT/checkpoint`` if present) or None.
        export: extra encoder exports, among ``torchscript``, ``onnx``.
        tensorboard: also log to TensorBoard (needs the tensorboard package).
        log_every: optimizer steps between ``train_log.csv`` rows.
        progress: tqdm progress bars.
    """

    data: str
    eval_data: str
    out: str
    encoder: str = DEFAULT_ENCODER_SPEC
    weights: str | None = None
    random_init: bool = False
    encoder_options: dict = field(default_factory=dict)
    epochs: int = 10
    depth: int = 20
    sweep_depth: list[int] | None = None
    sweep_epochs: int | None = None
    sweep_eval_data: str | None = None
    reference_copies: int = 1
    reference_backgrounds: float = 0.0
    outlier_data: str | None = None
    outlier_weight: float = DEFAULT_OUTLIER_WEIGHT
    batch_size: int = 32
    accum_steps: int = 1
    lr: float = DEFAULT_LR
    lr_decay: float = DEFAULT_LR_DECAY
    loss_lr: float = 1e-2
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.0
    clip_grad: float | None = 1.0
    margin: float = DEFAULT_MARGIN_DEGREES
    scale: float = DEFAULT_SCALE
    sub_centers: int = 1
    init_class_weights: str = "mean"
    freeze_bn: str = "auto"
    freeze_blocks: int = 0
    grad_checkpointing: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    train_size: int | None = None
    crop_scale: float = 0.35
    augmentations: int = DEFAULT_AUGMENTATIONS
    eval_seed: int = 0
    eval_every: int = 1
    eval_batch_size: int = 64
    eval_cache_mb: float = 4096
    workers: int | None = None
    threads: int | None = None
    seed: int = 0
    resume: str | None = None
    export: list[str] = field(default_factory=list)
    tensorboard: bool = False
    log_every: int = 10
    progress: bool = True

    def validate(self) -> TrainConfig:
        """Check ranges and choices; returns self.

        Raises:
            FinetuneError: the first bad setting, named by its command-line flag.
        """
        EncoderSpec.parse(self.encoder)
        positive = {"--epochs": self.epochs, "--depth": self.depth, "--batch-size": self.batch_size,
                    "--accum-steps": self.accum_steps, "--augmentations": self.augmentations,
                    "--eval-every": self.eval_every, "--eval-batch-size": self.eval_batch_size,
                    "--log-every": self.log_every, "--sub-centers": self.sub_centers,
                    "--reference-copies": self.reference_copies}
        for flag, v in positive.items():
            if v < 1:
                raise FinetuneError(f"{flag} must be >= 1, got {v}")
        if not 0.0 <= self.reference_backgrounds <= 1.0:
            raise FinetuneError(f"--reference-backgrounds must be in [0, 1], got {self.reference_backgrounds}")
        if not self.outlier_weight > 0:
            raise FinetuneError(f"--outlier-weight must be > 0, got {self.outlier_weight}")
        if self.sweep_depth is not None and (not self.sweep_depth or min(self.sweep_depth) < 1):
            raise FinetuneError(f"--sweep-depth needs depths >= 1, got {self.sweep_depth}")
        if self.sweep_epochs is not None and self.sweep_epochs < 1:
            raise FinetuneError(f"--sweep-epochs must be >= 1, got {self.sweep_epochs}")
        if self.warmup_epochs < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise FinetuneError("--warmup-epochs must be >= 0 and --min-lr-ratio in [0, 1]")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise FinetuneError(f"--clip-grad must be > 0, got {self.clip_grad}")
        if not 0 < self.crop_scale <= 1:
            raise FinetuneError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if self.train_size is not None and self.train_size < 16:
            raise FinetuneError(f"--train-size must be >= 16 px, got {self.train_size}")
        if self.init_class_weights not in ("mean", "random"):
            raise FinetuneError(f"--init-class-weights must be mean or random, got {self.init_class_weights!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise FinetuneError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.freeze_blocks < 0:
            raise FinetuneError(f"--freeze-blocks must be >= 0, got {self.freeze_blocks}")
        if self.threads is not None and self.threads < 1:
            raise FinetuneError(f"--threads must be >= 1, got {self.threads}")
        if self.workers is not None and self.workers < 0:
            raise FinetuneError(f"--workers must be >= 0, got {self.workers}")
        bad = [e for e in self.export if e not in EXPORT_FORMATS]
        if bad:
            raise FinetuneError(f"--export takes {', '.join(EXPORT_FORMATS)}; got {', '.join(bad)}")
        if self.weights is not None and not os.path.isfile(self.weights):
            raise FinetuneError(f"weights file {self.weights} not found (pass an existing file with --weights)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_precision(choice: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a GPU with bf16, ``fp16`` on an older GPU, ``fp32`` on the CPU."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
