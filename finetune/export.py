"""Hand the finetuned encoder to the catalog, and optionally to POS CPUs as TorchScript / ONNX.

``encoder.safetensors`` is the bare state dict of the module the catalog runs: for timm the
model without its classifier (``reset_classifier(0)``), for OpenCLIP the vision tower
(``model.visual`` keys, no ``visual.`` prefix).  ``create_encoder(SPEC, weights=FILE)`` and
``catalog init --encoder SPEC --weights FILE`` load it strictly.  Frozen BatchNorms are turned
back into ``BatchNorm2d`` first, so the keys match the architecture.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from retailklip.encoders.multiscale import MultiScalePooled
from retailklip.onnx_export import export_graph

from .errors import FinetuneError
from .model import unfreeze_batchnorm

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx")


def inference_module(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy of ``module`` in eval mode with plain BatchNorms and no gradient
    checkpointing; ``module`` itself is not changed."""
    m = copy.deepcopy(module).to("cpu").float().eval()
    m = unfreeze_batchnorm(m).eval()
    fn = getattr(m, "set_grad_checkpointing", None)
    if callable(fn):
        fn(False)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def save_encoder(module: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the encoder's bare state dict (float32) as safetensors.

    For a multi-scale or intermediate-stage encoder (``Encoder.model`` a
    :class:`~retailklip.encoders.multiscale.MultiScalePooled`) the file holds the wrapped timm
    model's state dict, the same keys as the plain encoder's: ``create_encoder(SPEC, weights=FILE)``
    loads it with or without the ``scales`` / ``feature_stage`` options.

    Args:
        module: the trained encoder module (``Encoder.model``).
        path: output file, e.g. ``OUT/encoder.safetensors``.
        metadata: string key/values stored in the safetensors header (e.g. the SPEC).

    Returns:
        The path.
    """
    m = inference_module(module)
    if isinstance(m, MultiScalePooled):  # the pooling around it has no weights: the file is the timm model's
        m = m.backbone
    sd = {k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}
    p = Path(path)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, p)
    return p


def export_torchscript(module: torch.nn.Module, path: str | os.PathLike, size: tuple[int, int]) -> Path:
    """Trace the encoder (float32, CPU) into a TorchScript file: input float (N, 3, H, W)
    preprocessed as the catalog does, output (N, D) features (not normalised).

    Raises:
        FinetuneError: tracing fails.
    """
    m = inference_module(module)
    example = torch.zeros(1, 3, *size)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.x, still loadable by libtorch
            traced = torch.jit.trace(m, example, check_trace=False)
    except Exception as e:  # noqa: BLE001 - tracing errors come in many types
        raise FinetuneError(f"TorchScript export failed: {str(e).splitlines()[0][:200]}") from None
    p = Path(path)
    traced.save(str(p))
    return p


def export_onnx(module: torch.nn.Module, path: str | os.PathLike, size: tuple[int, int], opset: int = 17) -> Path:
    """Export the encoder to ONNX (float32, dynamic batch): input ``images`` (N, 3, H, W),
    output ``features`` (N, D); through :func:`retailklip.onnx_export.export_graph` (torch's
    TorchScript exporter, which needs only ``onnx``, else the ``torch.export`` one).

    Raises:
        FinetuneError: the ``onnx`` package is not installed, or the export fails.
    """
    try:
        import onnx  # noqa: F401 - torch.onnx needs it
    except ImportError:
        raise FinetuneError("ONNX export needs the onnx package (pip install onnx)") from None
    m = inference_module(module)
    p = Path(path)
    try:
        graph = export_graph(m, (torch.zeros(1, 3, *size),), ["images"], ["features"],
                             {"images": {0: "batch"}, "features": {0: "batch"}}, opset=opset)
    except Exception as e:  # noqa: BLE001
        raise FinetuneError(f"ONNX export failed: {str(e).splitlines()[0][:200]}") from None
    p.write_bytes(graph)
    return p


def export_run(module: torch.nn.Module, out: Path, *, spec: str, size: tuple[int, int], formats: list[str],
               encoder_options: dict | None = None) -> Path:
    """Write ``OUT/encoder.safetensors`` (and ``formats``: ``OUT/encoder.torchscript.pt``,
    ``OUT/encoder.onnx``), after checking that :func:`retailklip.create_encoder` loads the
    weights and computes what ``module`` computes.

    Args:
        module: the trained encoder module.
        out: the run's output directory.
        spec: ``backend:model`` of the encoder (no pretrained tag: the weights are the file).
        size: input (H, W) [px] for the check and the traced exports.
        formats: among :data:`EXPORT_FORMATS`.
        encoder_options: backend options, as given to the trainer's ``create_encoder``.

    Returns:
        The safetensors path.

    Raises:
        RuntimeError: the reloaded encoder's features differ from ``module``'s (> 1e-4).
        FinetuneError: a TorchScript / ONNX export fails.
    """
    from retailklip import create_encoder

    path = save_encoder(module, out / "encoder.safetensors", metadata={"spec": spec, "producer": "retailklip finetune"})
    enc = create_encoder(spec, weights=path, **(encoder_options or {}))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = enc.model(x)
        b = inference_module(module)(x)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"{path}: the exported encoder does not reproduce the trained one "
                           f"(max difference {float((a - b).abs().max()):.3g})")
    if "torchscript" in formats:
        logger.info("wrote %s", export_torchscript(module, out / "encoder.torchscript.pt", size))
    if "onnx" in formats:
        logger.info("wrote %s", export_onnx(module, out / "encoder.onnx", size))
    logger.info("wrote %s; use it with: catalog init --encoder %s --weights %s", path, spec, path)
    return path
