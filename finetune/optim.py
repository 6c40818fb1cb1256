"""AdamW with blockwise learning-rate decay, and the warm-up + cosine schedule (RetailKLIP §4.1.2).

The encoder is split into levels, bottom to top:

* **embed** (level 0): what comes before the first block — for an OpenCLIP ViT the patch
  embedding ``conv1``, ``class_embedding``, ``positional_embedding`` and the pre-norm
  ``ln_pre``; for a timm trunk its ``stem`` group;
* **block i** (level i + 1, i = 0 .. L-1): OpenCLIP ``transformer.resblocks.i``; timm's coarse
  ``group_matcher`` groups (ViT ``blocks.i``, ResNet ``layer1..4``, MobileNet/EfficientNet
  stages ``blocks.i``, ConvNeXt ``stages.i``);
* **head** (level L + 1): what comes after the last block — OpenCLIP ``ln_post`` and ``proj``,
  timm's final norm / ``conv_head`` / neck.

Learning rates: the top block gets ``lr`` (RetailKLIP: 2e-4) and each lower block ``decay``
(0.7) times the one above, so block i gets ``lr * decay**(L-1-i)``; the embed level, below
block 0, gets the lowest rate ``lr * decay**L``; the head (final norm and projection) gets the
top rate ``lr``.  The ArcFace class-weight matrix ``W`` is its own group with its own rate.
Weight decay applies to weight matrices and convolution kernels only: biases and norm weights
(every parameter with fewer than 2 dimensions), ``W`` (normalised inside the loss) and what
the model lists in ``no_weight_decay()`` (OpenCLIP and timm: positional / class embeddings)
get none.

Blocks can also be frozen outright (``frozen_blocks = k``: embed and blocks 0..k-1 get no
gradient at all), which also saves their backward pass.

Why not timm's own layer decay (``timm.optim.param_groups_layer_decay``, which
``create_optimizer_v2(..., layer_decay=...)`` calls; timm 1.0.31, checked): its groups equal
these only for timm ViTs.  It asks ``group_matcher(coarse=False)``, so a CNN trunk decays per
sub-block (MobileNetV2: 18 levels, not its 7 stages ``blocks.i``); an OpenCLIP
``VisionTransformer`` has no ``group_matcher``, and timm's fallback (``auto_group_layers``)
puts every parameter in one layer (no decay at all); it returns ``lr_scale`` factors that only
timm's schedulers apply; and it has no frozen blocks nor a group for the loss's ``W``.
``tests/test_finetune.py`` pins the stage-wise CNN rates and the OpenCLIP ViT's.  What timm
does give is used: its coarse ``group_matcher`` and ``timm.models.group_parameters`` number the
blocks of every timm trunk (:func:`parameter_levels`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from .errors import FinetuneError

logger = logging.getLogger(__name__)

#: RetailKLIP §4.1.2: learning rate of the top transformer block and the per-block decay.
DEFAULT_LR = 2e-4
DEFAULT_LR_DECAY = 0.7

_OPEN_CLIP_EMBED = re.compile(r"^(conv1\.|class_embedding$|positional_embedding$|ln_pre\.|patch_embed\.)")
_OPEN_CLIP_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
#: Attributes under which an encoder module wraps a timm model: open_clip's ``TimmModel.trunk`` and
#: retailklip's ``MultiScalePooled.backbone`` (multi-scale or intermediate-stage embeddings).
_WRAPPED_TIMM = ("trunk", "backbone")


@dataclass(frozen=True)
class Level:
    """Where a parameter sits: ``level`` 0 = embed, 1..L = blocks 0..L-1, L+1 = head."""

    level: int
    name: str


def parameter_levels(module: torch.nn.Module) -> tuple[dict[str, Level], int]:
    """Assign every parameter of an encoder module to a level (see module docstring).

    Args:
        module: an OpenCLIP ``VisionTransformer`` (``model.visual``), an OpenCLIP ``TimmModel``
            (``model.visual`` with a timm ``trunk``), a timm model with a ``group_matcher``, or
            :class:`retailklip.encoders.multiscale.MultiScalePooled` around one (``backbone``).

    Returns:
        ``(levels, L)``: parameter name -> :class:`Level`, and the number of blocks L.

    Raises:
        FinetuneError: an architecture whose blocks cannot be found.
    """
    names = [n for n, _ in module.named_parameters()]
    if hasattr(module, "transformer") and hasattr(module.transformer, "resblocks"):
        return _levels_open_clip(names)
    for wrapped in _WRAPPED_TIMM:
        inner = getattr(module, wrapped, None)
        if inner is not None and hasattr(inner, "group_matcher"):
            levels, num = _levels_timm(inner)
            out = {f"{wrapped}.{k}": v for k, v in levels.items()}
            for n in names:  # open_clip's head / projection on top of the trunk
                out.setdefault(n, Level(num + 1, "head"))
            return out, num
    if hasattr(module, "group_matcher"):
        return _levels_timm(module)
    raise FinetuneError(
        f"blockwise learning-rate decay: cannot find the blocks of {type(module).__name__} "
        f"(supported: OpenCLIP ViTs with visual.transformer.resblocks, timm models with a group_matcher)"
    )


def _levels_open_clip(names: list[str]) -> tuple[dict[str, Level], int]:
    blocks = {n: int(m.group(1)) for n in names if (m := _OPEN_CLIP_BLOCK.match(n))}
    if not blocks:
        raise FinetuneError("blockwise learning-rate decay: the OpenCLIP ViT has no transformer.resblocks parameters")
    num = max(blocks.values()) + 1
    out = {}
    for n in names:
        if n in blocks:
            out[n] = Level(blocks[n] + 1, f"block {blocks[n]}")
        elif _OPEN_CLIP_EMBED.match(n):
            out[n] = Level(0, "embed")
        else:  # ln_post, proj, attention pooling: final norm and projection
            out[n] = Level(num + 1, "head")
    return out, num


def _levels_timm(model: torch.nn.Module) -> tuple[dict[str, Level], int]:
    """timm: the coarse group_matcher's ``stem`` is the embed level, its numbered groups the
    blocks; parameters it leaves unmatched or attaches to the last group (final norm,
    ``conv_head``) are the head."""
    from timm.models import group_parameters

    matcher = model.group_matcher(coarse=True)
    names = [n for n, _ in model.named_parameters()]
    groups = group_parameters(model, matcher, reverse=True)  # name -> consecutive group id
    head = set()
    if isinstance(matcher, dict):
        stem = re.compile(matcher["stem"]) if isinstance(matcher.get("stem"), str) else None
        block_specs = matcher.get("blocks") or []
        if isinstance(block_specs, str):
            block_specs = [(block_specs, None)]
        for n in names:
            spec = next((s for s in block_specs if re.match(s[0], n)), None)
            matched_stem = stem is not None and stem.match(n)
            # Unmatched (timm maps them to the largest ordinal) or a "same group as the last
            # block" suffix such as (99999,): final norm, conv_head, neck.
            if not matched_stem and (spec is None or spec[1] is not None):
                head.add(n)
        first = min(groups.values())
        stem_group = first if stem is not None and any(groups[n] == first and stem.match(n) for n in names) else None
    else:  # a callable matcher: group 0 is the stem
        stem_group = min(groups.values())
    block_ids = sorted({g for n, g in groups.items() if n not in head and g != stem_group})
    if not block_ids:
        raise FinetuneError(f"blockwise learning-rate decay: timm model {type(model).__name__} has no blocks in its group_matcher")
    rank = {g: i for i, g in enumerate(block_ids)}
    num = len(block_ids)
    out = {}
    for n in names:
        g = groups[n]
        if n in head:
            out[n] = Level(num + 1, "head")
        elif g == stem_group:
            out[n] = Level(0, "embed")
        else:
            out[n] = Level(rank[g] + 1, f"block {rank[g]}")
    return out, num


def level_lr(level: int, num_blocks: int, lr: float, decay: float) -> float:
    """Learning rate of a level: head and top block ``lr``, block i ``lr*decay**(L-1-i)``, embed ``lr*decay**L``."""
    return lr * decay ** max(0, num_blocks - level)


def _no_decay_names(module: torch.nn.Module) -> set[str]:
    fn = getattr(module, "no_weight_decay", None)
    names = set(fn()) if callable(fn) else set()
    for wrapped in _WRAPPED_TIMM:
        inner = getattr(module, wrapped, None)
        if inner is not None and callable(getattr(inner, "no_weight_decay", None)):
            names |= {f"{wrapped}.{n}" for n in inner.no_weight_decay()}
    return names


def param_groups(
    module: torch.nn.Module,
    *,
    lr: float = DEFAULT_LR,
    decay: float = DEFAULT_LR_DECAY,
    weight_decay: float = 0.05,
    loss: torch.nn.Module | None = None,
    loss_lr: float = 1e-2,
    frozen_blocks: int = 0,
) -> list[dict]:
    """AdamW parameter groups with blockwise learning-rate decay (RetailKLIP §4.1.2).

    One group per (level, with/without weight decay), bottom to top, then the loss's
    parameters (ArcFace ``W``) as group ``"arcface W"`` with ``loss_lr`` and no weight decay.
    Each group dict has ``params``, ``lr``, ``weight_decay`` and, for the table and for
    resuming, ``name`` and ``param_names``.  Parameters frozen here (``frozen_blocks``) get
    ``requires_grad = False`` and no group; parameters already frozen (``requires_grad`` False,
    e.g. frozen BatchNorm) are left out.

    Args:
        module: the encoder module (see :func:`parameter_levels`).
        lr: learning rate of the top block and the head (RetailKLIP: 2e-4).
        decay: per-block factor in (0, 1] (RetailKLIP: 0.7).
        weight_decay: AdamW decoupled weight decay for weight matrices and kernels.
        loss: module whose parameters get their own group (ArcFace), or None.
        loss_lr: learning rate of the loss's parameters.
        frozen_blocks: freeze the embed level and the lowest ``frozen_blocks`` blocks (0..L).

    Raises:
        FinetuneError: bad ``lr``, ``decay`` or ``frozen_blocks``, or nothing left to train.
    """
    if not lr > 0 or not loss_lr > 0:
        raise FinetuneError(f"learning rates must be > 0, got lr={lr}, loss lr={loss_lr}")
    if not 0 < decay <= 1:
        raise FinetuneError(f"--lr-decay must be in (0, 1], got {decay}")
    if weight_decay < 0:
        raise FinetuneError(f"--weight-decay must be >= 0, got {weight_decay}")
    levels, num = parameter_levels(module)
    if not 0 <= frozen_blocks <= num:
        raise FinetuneError(f"--freeze-blocks must be in 0..{num} (the encoder has {num} blocks), got {frozen_blocks}")
    no_decay_names = _no_decay_names(module)
    buckets: dict[tuple[int, bool], dict] = {}
    for n, p in module.named_parameters():
        lv = levels[n]
        if frozen_blocks and lv.level <= frozen_blocks:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        decays = p.ndim >= 2 and n not in no_decay_names
        g = buckets.setdefault((lv.level, decays), {
            "name": f"{lv.name}/{'decay' if decays else 'no_decay'}",
            "lr": level_lr(lv.level, num, lr, decay),
            "weight_decay": weight_decay if decays else 0.0,
            "params": [],
            "param_names": [],
        })
        g["params"].append(p)
        g["param_names"].append(n)
    groups = [buckets[k] for k in sorted(buckets, key=lambda k: (k[0], not k[1]))]
    if loss is not None:
        lp = [(n, p) for n, p in loss.named_parameters() if p.requires_grad]
        if lp:
            groups.append({"name": "arcface W", "lr": loss_lr, "weight_decay": 0.0,
                           "params": [p for _, p in lp], "param_names": [f"loss.{n}" for n, _ in lp]})
    if not groups:
        raise FinetuneError("nothing to train: every parameter is frozen")
    return groups


def create_optimizer(groups: list[dict], *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                     fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``groups`` (from :func:`param_groups`); each group keeps its ``lr`` and ``weight_decay``."""
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=fused)


def format_lr_table(groups: list[dict]) -> str:
    """A text table: group, (peak) learning rate, weight decay, tensors, parameters (bottom to top)."""
    rows = [("group", "lr", "weight_decay", "tensors", "params")]
    for g in groups:
        rows.append((g["name"], f"{g.get('initial_lr', g['lr']):.3e}", f"{g['weight_decay']:g}", str(len(g["params"])),
                     f"{sum(p.numel() for p in g['params']):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def describe_groups(groups: list[dict]) -> list[dict]:
    """JSON-ready summary of the groups (for the run config); ``lr`` is the peak (scheduled) rate."""
    return [{"name": g["name"], "lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"], "tensors": len(g["params"]),
             "params": sum(p.numel() for p in g["params"])} for g in groups]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps`` optimizer steps, then cosine decay to
    ``min_ratio`` times each group's rate at ``total_steps``.

    The factor multiplies every group's own rate, so the blockwise ratios hold throughout.
    Step it once per optimizer step.

    Raises:
        FinetuneError: ``total_steps < 1`` or negative ``warmup_steps``.
    """
    if total_steps < 1 or warmup_steps < 0:
        raise FinetuneError(f"schedule: need total steps >= 1 and warm-up >= 0, got {total_steps}, {warmup_steps}")
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
