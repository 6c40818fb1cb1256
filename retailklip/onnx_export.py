"""Export a torch module to a serialised ONNX graph, on every torch the project supports.

torch's TorchScript-based exporter (``dynamo=False``) needs only ``onnx``; newer torch releases
default to the ``torch.export``-based exporter, which also needs ``onnxscript``. :func:`export_graph`
uses the TorchScript one and falls back to the other where it is gone. Used by the mask decoder's
ONNX Runtime graph (:mod:`retailklip.segment.onnx_runtime`) and the finetune's encoder export.
"""
from __future__ import annotations

import io
import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Default ONNX opset (17: LayerNormalization is a standard op).
OPSET = 17


def export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
                 dynamic: dict[str, dict[int, str]] | None = None, opset: int = OPSET) -> bytes:
    """``module(*args)`` as a serialised ONNX graph (float32, opset ``opset``), the axes in
    ``dynamic`` (input or output name -> {axis: name}) left free.

    Uses torch's TorchScript exporter (available on every torch the project supports) and falls
    back to the ``torch.export``-based one where that is removed. ``nn.MultiheadAttention``'s
    fused inference kernel (``aten::_native_multi_head_attention``, e.g. in OpenCLIP's ViT) has
    no ONNX form: it is switched off during the export (``torch.backends.mha``), so the
    attention is traced as its plain operations.
    """
    module = module.eval()
    names = {"input_names": input_names, "output_names": output_names}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return _export(module, args, names, dynamic, opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], names: dict, dynamic: dict | None, opset: int) -> bytes:
    input_names = names["input_names"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        try:
            buf = io.BytesIO()
            torch.onnx.export(module, args, buf, opset_version=opset, dynamo=False, dynamic_axes=dynamic or {}, **names)
            return buf.getvalue()
        except Exception as exc:  # noqa: BLE001 - a torch without the TorchScript exporter
            logger.info("TorchScript ONNX export failed (%s); using torch.export", exc)
            shapes = {n: ({a: torch.export.Dim(d, min=1, max=65536) for a, d in (dynamic or {}).get(n, {}).items()} or None)
                      for n in input_names}
            program = torch.onnx.export(module, args, None, opset_version=max(opset, 18), dynamo=True,
                                        dynamic_shapes=shapes, **names)
            return program.model_proto.SerializeToString()


__all__ = ["OPSET", "export_graph"]
