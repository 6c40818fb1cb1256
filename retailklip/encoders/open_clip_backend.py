"""OpenCLIP image-encoder backend (RetailKLIP's backbone: ViT-L/14, LAION-2B).

Only the vision tower (``model.visual``) is kept: the text tower is never used for 1-NN
recognition.  Preprocessing is open_clip's own evaluation transform
(``open_clip.image_transform_v2`` with the model's ``preprocess_cfg``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch

from ..errors import RetailKlipError, WeightsError, WeightsUnavailableError
from ..hub import hub_or_cache
from ..rng import seeded
from ..weights import file_sha256, load_state_dict, load_state_dict_strict
from .base import Encoder, EncoderIdentity, infer_dim, preprocess_description

logger = logging.getLogger(__name__)


def create_open_clip_encoder(
    model_name: str,
    pretrained: str | None = None,
    *,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    model_overrides: dict | None = None,
    resize_mode: str | None = None,
    cache_dir: str | None = None,
    **encoder_kwargs,
) -> Encoder:
    """Build an :class:`Encoder` from an open_clip model.

    Exactly one weights source is used, in this order: ``weights`` (a local file: a full CLIP
    checkpoint, whose ``visual.*`` keys are taken, or a bare vision-tower state dict as written by
    ``finetune``), then ``pretrained`` (an open_clip pretrained tag, downloaded into the hub
    cache), then ``random_init`` (seeded; for tests and benchmarks only).

    Args:
        model_name: an open_clip architecture, e.g. ``"ViT-L-14"`` (see ``open_clip.list_models()``).
        pretrained: an open_clip pretrained tag, e.g. ``"laion2b_s32b_b82k"``.
        weights: local weights file (safetensors or PyTorch state dict).
        random_init: build random weights when no other source is given.
        seed: RNG seed for ``random_init``.
        model_overrides: keyword overrides of the open_clip model config (e.g. a tiny
            ``vision_cfg`` for tests); part of the identity.
        resize_mode: override open_clip's ``resize_mode`` (``"shortest"``: resize + centre crop;
            ``"longest"``: letterbox the whole image; ``"squash"``).
        cache_dir: hub cache directory for pretrained tags.
        **encoder_kwargs: ``device``, ``precision``, ``batch_size``, ``background`` for :class:`Encoder`.

    Raises:
        RetailKlipError: unknown model name or pretrained tag.
        WeightsUnavailableError: the pretrained tag could not be downloaded (no network).
        WeightsError: the weights file is missing, unsafe, or does not fit the architecture.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if model_name not in open_clip.list_models():
        raise RetailKlipError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    overrides = dict(model_overrides or {})
    if weights is not None:
        model = _create(model_name, overrides, seed=seed)
        sd = load_state_dict(weights)
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        load_state_dict_strict(model.visual, sd, weights, f"open_clip:{model_name}")
        weights_id = "sha256:" + file_sha256(weights)
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise RetailKlipError(
                f"open_clip model {model_name} has no pretrained tag {pretrained!r}; known tags: {', '.join(tags) or 'none'}"
            )
        with hub_or_cache(f"open_clip:{model_name}/{pretrained}") as offline:
            try:
                model = _create(model_name, overrides, pretrained=pretrained, cache_dir=cache_dir)
            except Exception as e:  # noqa: BLE001 - hub errors come in many types
                why = f"{offline}, and not in the cache" if offline else f"no network or hub cache?: {_first_line(e)}"
                raise WeightsUnavailableError(
                    f"cannot load pretrained weights open_clip:{model_name}/{pretrained} ({why}); download them "
                    f"elsewhere and pass the local file, "
                    f"e.g. `catalog init --encoder open_clip:{model_name} --weights open_clip_model.safetensors`"
                ) from None
        weights_id = f"tag:{pretrained}"
    elif random_init:
        model = _create(model_name, overrides, seed=seed)
        weights_id = f"random:{seed}"
    else:
        raise WeightsError(
            f"open_clip:{model_name}: no weights given; name a pretrained tag (open_clip:{model_name}/TAG) "
            f"or a local file with --weights FILE"
        )
    if overrides:
        weights_id += ":cfg=" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    visual = model.visual
    del model  # drop the text tower
    cfg = dict(visual.preprocess_cfg)
    if resize_mode is not None:
        cfg["resize_mode"] = resize_mode
    pcfg = PreprocessCfg(**cfg)
    preprocess = image_transform_v2(pcfg, is_train=False)
    dim = infer_dim(visual.eval(), tuple(pcfg.size) if not isinstance(pcfg.size, int) else (pcfg.size, pcfg.size))
    identity = EncoderIdentity(
        backend="open_clip",
        model=model_name,
        weights=weights_id,
        dim=dim,
        preprocess=preprocess_description(library="open_clip", background=encoder_kwargs.get("background"), **cfg),
    )
    return Encoder(visual, preprocess, identity, **encoder_kwargs)


def _create(
    model_name: str, overrides: dict, *, seed: int = 0, pretrained: str | None = None, cache_dir: str | None = None
) -> torch.nn.Module:
    """``open_clip.create_model``: seeded random weights (``pretrained`` None; a local file is
    loaded into them after), or the pretrained tag's weights from the hub cache ``cache_dir``
    (downloaded there when missing).

    open_clip logs through the root logger: a warning for random init (the point here) and an
    error for a failed download (which the caller turns into one line).  Only open_clip's own
    records are dropped meanwhile: disabling the root logger would silence every other thread
    of the process too.
    """
    import open_clip

    root = logging.getLogger()
    root.addFilter(_drop_open_clip_records)
    try:
        with seeded(seed):
            return open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir, **overrides)
    finally:
        root.removeFilter(_drop_open_clip_records)


def _drop_open_clip_records(record: logging.LogRecord) -> bool:
    return "open_clip" not in record.pathname.replace("\\", "/").split("/")


def _first_line(e: Exception, limit: int = 200) -> str:
    """The first line of an error message, cut at a word within ``limit`` characters."""
    line = (str(e).splitlines() or [type(e).__name__])[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."
