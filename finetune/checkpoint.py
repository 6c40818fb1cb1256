"""Training checkpoints: save at each epoch end, resume from one.

A checkpoint is a directory written atomically (temporary directory + rename):

* ``model.safetensors``: the encoder module's state dict as trained (frozen BatchNorms as
  ``FrozenBatchNorm2d`` buffers);
* ``loss.safetensors``: the ArcFace class-weight matrix ``W``;
* ``state.pt``: optimizer, LR scheduler and gradient-scaler state, epoch, step counter, the
  metrics history and a fingerprint of the run (classes, encoder, parameter groups), read back
  with ``torch.load(weights_only=True)`` (plain tensors, numbers, strings and containers only).

No RNG state is stored: every epoch reseeds torch, numpy and Python's ``random`` from
``(seed, epoch)`` and the class-balanced sampler is keyed on the same pair, so a run resumed at
an epoch boundary continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import FinetuneError

logger = logging.getLogger(__name__)

FILES = ("model.safetensors", "loss.safetensors", "state.pt")


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors that share storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, loss: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, scaler, epoch: int, step: int,
                    history: list[dict], fingerprint: dict) -> Path:
    """Write a checkpoint directory (replacing an older one atomically).

    Args:
        directory: target directory, e.g. ``OUT/checkpoint``.
        model: the encoder module.
        loss: the ArcFace loss (its ``W``).
        optimizer, scheduler, scaler: their ``state_dict()`` is stored (scaler may be None).
        epoch: number of epochs completed.
        step: optimizer steps completed.
        history: per-epoch metric dicts so far (JSON-like).
        fingerprint: what must match on resume (JSON-like).

    Returns:
        The directory.
    """
    d = Path(directory)
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_tensors(model), str(tmp / "model.safetensors"))
    save_file(_tensors(loss), str(tmp / "loss.safetensors"))
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "history": history,
        "fingerprint": fingerprint,
    }, tmp / "state.pt")
    old = d.with_name(d.name + ".old")
    if d.exists():
        if old.exists():
            shutil.rmtree(old)
        d.rename(old)
    tmp.rename(d)
    if old.exists():
        shutil.rmtree(old)
    return d


def load_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, loss: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, scaler, fingerprint: dict) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` into the given objects.

    Args:
        directory: the checkpoint directory.
        model, loss, optimizer, scheduler, scaler: built as for a fresh run with the same settings.
        fingerprint: this run's fingerprint; it must equal the stored one.

    Returns:
        ``{"epoch": int, "step": int, "history": list[dict]}``.

    Raises:
        FinetuneError: missing files, unreadable state, or a checkpoint of a different run
            (other classes, encoder or parameter groups).
    """
    d = Path(directory)
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise FinetuneError(f"{d}: not a finetune checkpoint (missing {', '.join(missing)})")
    try:
        state = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not ours
        raise FinetuneError(f"{d / 'state.pt'}: unreadable checkpoint state ({str(e).splitlines()[0][:200]})") from None
    stored = state.get("fingerprint", {})
    diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
    if diff:
        raise FinetuneError(f"{d}: checkpoint of a different run ({', '.join(diff)} differ); "
                            f"resume with the same data, encoder and optimizer settings")
    device = next(iter(model.state_dict().values())).device
    model.load_state_dict(load_file(str(d / "model.safetensors"), device=str(device)), strict=True)
    loss.load_state_dict(load_file(str(d / "loss.safetensors"), device=str(device)), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    logger.info("resumed from %s: %d epoch(s), %d step(s) done", d, state["epoch"], state["step"])
    return {"epoch": int(state["epoch"]), "step": int(state["step"]), "history": list(state["history"])}
