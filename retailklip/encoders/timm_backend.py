"""timm image-encoder backend: any timm model as a pooled-feature encoder (the edge-CPU option).

The classifier is removed (``reset_classifier(0)``), so the model returns its globally pooled
features, e.g. (N, 1280) for ``mobilenetv2_100``.  Preprocessing is timm's evaluation transform
(``timm.data.create_transform``) from the model's resolved data config, with optional overrides
(``interpolation``, ``crop_pct``, ``crop_mode``, ``input_size``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ..errors import RetailKlipError, WeightsUnavailableError
from ..hub import hub_or_cache
from ..rng import seeded
from ..weights import file_sha256, load_state_dict, load_state_dict_strict
from .base import Encoder, EncoderIdentity, infer_dim, preprocess_description
from .multiscale import MultiScalePooled, check_scales

logger = logging.getLogger(__name__)


def create_timm_encoder(
    model_name: str,
    *,
    weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    input_size: int | None = None,
    scales: Sequence[int] | None = None,
    feature_stage: int | None = None,
    **encoder_kwargs,
) -> Encoder:
    """Build an :class:`Encoder` from a timm model.

    Weights source, in this order: ``weights`` (a local safetensors / PyTorch state dict, either
    with the classifier, as timm's checkpoints are, or without, as ``finetune`` writes), then
    ``random_init``, else timm's own pretrained weights for ``model_name`` (``MODEL.TAG`` names a
    tag) from the hub.

    Args:
        model_name: a timm model name, e.g. ``"mobilenetv2_100"`` (see ``timm.list_models()``).
        weights: local weights file.
        random_init: random weights (tests and benchmarks).
        seed: RNG seed for ``random_init``.
        interpolation, crop_pct, crop_mode: overrides of the model's data config.
        input_size: side in pixels of the square network input (default: the model's, 224 for
            ``mobilenetv2_100``); the resize before the centre crop scales with it
            (``input_size / crop_pct``).  Convolutional models with global pooling accept any
            size; testing above the training resolution can help (FixRes, Touvron et al. 2019, §3).
        scales: input sides in pixels of a multi-scale embedding (e.g. ``[224, 320]``): the image
            is preprocessed at the largest, embedded at each, and the per-scale vectors are
            concatenated, each centred and L2-normalised on its own (D = len(scales) * C; see
            :mod:`retailklip.encoders.multiscale`).  Excludes ``input_size``.
        feature_stage: average-pool the output of this stage of ``model.feature_info`` (timm's
            ``forward_intermediates``; negative counts from the end, e.g. -1 = the last stage,
            before ``mobilenetv2_100``'s 1x1 head convolution: C = 320) instead of the model's
            pooled output; or a list of stages and ``"pooled"`` (the model's pooled output),
            e.g. ``["pooled", -1]`` (D = 1280 + 320 per scale), each part normalised on its own
            (:mod:`retailklip.encoders.multiscale`).
        **encoder_kwargs: ``device``, ``precision``, ``batch_size``, ``background`` for :class:`Encoder`.

    Raises:
        RetailKlipError: unknown model name; bad ``input_size``, ``scales`` or ``feature_stage``.
        WeightsUnavailableError: hub weights cannot be downloaded.
        WeightsError: the weights file is missing, unsafe or does not fit the architecture.
    """
    import timm
    from timm.data import create_transform, resolve_model_data_config

    arch = model_name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise RetailKlipError(f"unknown timm model {model_name!r} (see timm.list_models())")
    if weights is not None:
        sd = load_state_dict(weights)
        model = _create(timm, model_name, seed)
        head = set(model.state_dict()) - set(sd)
        if head and head <= _classifier_keys(model):
            model.reset_classifier(0)  # headless checkpoint (e.g. from finetune)
            load_state_dict_strict(model, sd, weights, f"timm:{model_name} (without classifier)")
        else:
            load_state_dict_strict(model, sd, weights, f"timm:{model_name}")
            model.reset_classifier(0)
        weights_id = "sha256:" + file_sha256(weights)
    elif random_init:
        model = _create(timm, model_name, seed)
        model.reset_classifier(0)
        weights_id = f"random:{seed}"
    else:
        with hub_or_cache(f"timm:{model_name}") as offline:
            try:
                model = timm.create_model(model_name, pretrained=True, num_classes=0)
            except Exception as e:  # noqa: BLE001 - hub errors come in many types
                why = (f"{offline}, and not in the Hugging Face cache" if offline else
                       f"no network or hub cache?: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")
                raise WeightsUnavailableError(
                    f"cannot load pretrained weights for timm:{model_name} ({why}); pass a local file with --weights FILE"
                ) from None
        weights_id = f"tag:{getattr(model, 'pretrained_cfg', {}).get('tag') or 'default'}"
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32):
        raise RetailKlipError(f"input_size must be an integer >= 32 (pixels), got {input_size!r}")
    if scales is not None and input_size is not None:
        raise RetailKlipError("give input_size or scales, not both (the largest scale is the input size)")
    if scales is not None:
        scales = check_scales(scales)
        input_size = max(scales)
    model.eval()
    cfg = resolve_model_data_config(model)
    if input_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], input_size, input_size)
    for k, v in (("interpolation", interpolation), ("crop_pct", crop_pct), ("crop_mode", crop_mode)):
        if v is not None:
            cfg[k] = v
    extra, groups = {}, 1
    if scales is not None or feature_stage is not None:
        side = cfg["input_size"][1]
        model = MultiScalePooled(model, scales if scales is not None else [side], feature_stage)
        extra = {"scales": list(model.scales), "feature_stage": model.stage}
        groups = len(model.widths) if len(set(model.widths)) == 1 else model.widths
    preprocess = create_transform(**cfg, is_training=False)
    dim = infer_dim(model, tuple(cfg["input_size"][1:]))
    identity = EncoderIdentity(
        backend="timm",
        model=model_name,
        weights=weights_id,
        dim=dim,
        preprocess=preprocess_description(library="timm", background=encoder_kwargs.get("background"), **cfg, **extra),
    )
    return Encoder(model, preprocess, identity, groups=groups, **encoder_kwargs)


def _create(timm, model_name: str, seed: int) -> torch.nn.Module:
    with seeded(seed):
        return timm.create_model(model_name, pretrained=False)


def _classifier_keys(model: torch.nn.Module) -> set[str]:
    name = model.default_cfg.get("classifier", "classifier") if hasattr(model, "default_cfg") else "classifier"
    names = name if isinstance(name, (list, tuple)) else [name]
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}
