"""SAM's image-shared mask decoder run by ONNX Runtime on the CPU.

On a 2-core CPU the mask decoder is memory-bound: the per-prompt (B, 4096, 256) tensors go
through many small element-wise kernels (adds, softmax over 7 tokens, GELU, LayerNorm) between
the matrix products. ONNX Runtime's CPU provider fuses them (its graph optimisations: LayerNorm,
GELU, attention and MatMul+Add fusions) and runs the same arithmetic in float32, so the masks
stay within the exact-mode tolerance (measured: max |logit difference| ~4e-7) while a prompt
costs ~0.27x of :class:`~retailklip.segment.fast_decoder.ImageSharedMaskDecoder` in eager
torch (``benchmarks/bench_decoder.py``). Unlike ``torch.compile`` it needs no C++ compiler and
no per-batch-size compilation: the graph is exported once, with a dynamic prompt batch.

:class:`OnnxMaskDecoder` is a drop-in for ``model.mask_decoder`` in calls without a mask prompt
on one image on the CPU (what automatic mask generation and box/point prompts do); any other
call, and any call when ONNX Runtime is not installed, goes to the torch decoder. (The
EfficientViT image encoder was tried too: 0.68x its torch time alone, but ~500 MiB more peak
RSS and no end-to-end gain in ``benchmarks/bench_checkout.py``, so it stays in torch.)

:class:`CachedGraph` holds the graph's life cycle: the exported graph (~16 MB: it holds the
decoder's weights) is cached on disk under
:func:`onnx_cache_dir`, keyed by a digest of the weights, the torch version and the graph's
kind, so a process pays the export (a few seconds on 2 cores) once per checkpoint, not once
per start. A freshly exported graph is checked against the torch module on random inputs
before it is used or cached; one that disagrees by more than :data:`TOLERANCE` is not used
(one warning, torch module).

Needs the optional dependencies ``onnxruntime`` and ``onnx`` (``pip install
'retailklip[onnx]'``); :func:`onnxruntime_available` tells whether they are importable.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..onnx_export import OPSET, export_graph
from .fast_decoder import ImageSharedMaskDecoder

logger = logging.getLogger(__name__)

#: Largest |mask logit| or |IoU| difference against the torch decoder a graph may show (the
#: exact mode's tolerance of tests/test_segment_model.py).
TOLERANCE = 1e-5
#: Bumped when the exported graph's inputs/outputs change (part of the cache key).
GRAPH_VERSION = 1


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` and ``onnx`` (the exporter's dependency) are importable."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def onnx_cache_dir() -> Path:
    """Where exported decoder graphs are cached: ``$RETAILKLIP_CACHE/onnx`` if set, else
    ``$XDG_CACHE_HOME/retailklip/onnx`` (default ``~/.cache/retailklip/onnx``)."""
    root = os.environ.get("RETAILKLIP_CACHE")
    if root:
        return Path(root) / "onnx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retailklip" / "onnx"


class _AllMasks(nn.Module):
    """The exported function: ``ImageSharedMaskDecoder.predict_masks`` (all 4 mask tokens)."""

    def __init__(self, decoder: ImageSharedMaskDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image: torch.Tensor, pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        return self.decoder.predict_masks(image, pe, sparse, dense)


def _weights_digest(module: nn.Module, kind: str) -> str:
    """sha256 over the module's state dict (names, shapes, float32 bytes), the torch version
    and the graph kind."""
    h = hashlib.sha256(f"{kind}|{torch.__version__}|opset{OPSET}|v{GRAPH_VERSION}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _decoder_inputs(decoder: ImageSharedMaskDecoder, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Random (image embedding, dense PE, sparse prompts (batch, 2, C), dense prompt) of the
    decoder's width: export and agreement-check inputs (a point prompt has 2 sparse tokens)."""
    g = torch.Generator().manual_seed(seed)
    c = decoder.transformer_dim
    return (torch.randn(1, c, 64, 64, generator=g), torch.randn(1, c, 64, 64, generator=g),
            torch.randn(batch, 2, c, generator=g), torch.randn(1, c, 64, 64, generator=g))


def export_decoder(decoder: ImageSharedMaskDecoder) -> bytes:
    """The decoder's ``predict_masks`` as an ONNX graph (inputs ``image`` (1, C, 64, 64), ``pe``
    (1, C, 64, 64), ``sparse`` (B, N, C) with B and N dynamic, ``dense`` (1, C, 64, 64); outputs
    ``masks`` float32 (B, 4, 256, 256) and ``iou`` (B, 4)), serialised."""
    return export_graph(_AllMasks(decoder), _decoder_inputs(decoder, 2, seed=0), ["image", "pe", "sparse", "dense"],
                        ["masks", "iou"], {"sparse": {0: "prompts", 1: "tokens"}, "masks": {0: "prompts"}, "iou": {0: "prompts"}})


class CachedGraph:
    """A torch module's ONNX Runtime session, built on first use: from the cache, else exported
    (``export(module)``), checked against ``reference`` on ``check_inputs`` and cached.

    Args:
        module: the torch module (its state dict keys the cache).
        kind: name of the graph (part of the cache file name and key).
        export: ``module -> bytes`` (serialised ONNX graph).
        check_inputs: inputs (a dict of graph input name -> tensor) for the agreement check.
        reference: ``check_inputs -> list of arrays`` computed by the torch module.
        tolerance: largest |difference| of any output allowed by the check.
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()`` when built).
        cache_dir: cache folder (default :func:`onnx_cache_dir`); ``""`` disables the cache.

    Attributes:
        active: True once a session runs; False if ONNX Runtime is unavailable or the graph
            failed export or check; None before the first :meth:`session` call.
    """

    def __init__(self, module: nn.Module, kind: str, export, check_inputs, reference, tolerance: float, *,
                 threads: int | None = None, cache_dir: str | os.PathLike | None = None) -> None:
        self.module, self.kind, self.export = module, kind, export
        self.check_inputs, self.reference, self.tolerance = check_inputs, reference, tolerance
        self.threads = threads
        self.cache_dir = onnx_cache_dir() if cache_dir is None else (Path(cache_dir) if str(cache_dir) else None)
        self.active: bool | None = None
        self._session = None
        self._lock = threading.Lock()

    def session(self):
        """The ONNX Runtime ``InferenceSession``, or None (use the torch module)."""
        if self.active is None:
            with self._lock:
                if self.active is None:
                    self._build()
        return self._session

    def _session_from(self, data: bytes):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def _agreement(self, session) -> float:
        """Max |difference| of every output against the torch module on the check inputs."""
        inputs = self.check_inputs()
        with torch.no_grad():
            ref = self.reference(inputs)
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        return float(max(np.abs(a - np.asarray(b)).max() for a, b in zip(got, ref)))

    def _build(self) -> None:
        if not onnxruntime_available():
            logger.info("onnxruntime/onnx not installed: %s runs in torch (pip install 'retailklip[onnx]')", self.kind)
            self.active = False
            return
        digest = _weights_digest(self.module, self.kind)
        path = self.cache_dir / f"{self.kind}-{digest}.onnx" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                self._session = self._session_from(path.read_bytes())
                self.active = True
                logger.debug("%s graph from %s", self.kind, path)
                return
            except Exception as exc:  # noqa: BLE001 - a damaged cache file: export again
                logger.warning("ignoring unreadable cached %s graph %s (%s)", self.kind, path, exc)
        try:
            data = self.export(self.module)
            session = self._session_from(data)
            diff = self._agreement(session)
        except Exception as exc:  # noqa: BLE001 - any export/runtime failure: torch module
            logger.warning("ONNX export of the %s failed (%s: %s); using torch", self.kind, type(exc).__name__, exc)
            self.active = False
            return
        if not diff <= self.tolerance:
            logger.warning("ONNX Runtime %s differs from torch by %.2g (> %.0e); using torch", self.kind, diff, self.tolerance)
            self.active = False
            return
        self._session, self.active = session, True
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
                    f.write(data)
                os.replace(f.name, path)
            except OSError as exc:
                logger.info("could not cache the %s graph in %s (%s)", self.kind, path.parent, exc)


class OnnxMaskDecoder:
    """Drop-in for ``model.mask_decoder`` that runs the image-shared decoder in ONNX Runtime.

    Same call as ``segment_anything``'s ``MaskDecoder.forward``. Handled by ONNX Runtime: one
    image (``image_embeddings`` (1, C, 64, 64)) on the CPU, no mask prompt (the dense prompt
    embedding a broadcast of ``no_mask_embed``); everything else by the torch decoder
    :attr:`fallback`. The graph is built on the first call (from the cache, else exported and
    checked), so constructing one is cheap.

    Args:
        decoder: SAM's ``MaskDecoder`` or an :class:`ImageSharedMaskDecoder` around it.
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()`` when the
            graph is built).
        cache_dir: where graphs are cached (default :func:`onnx_cache_dir`); ``""`` disables
            the cache.

    Attributes:
        fallback: the :class:`ImageSharedMaskDecoder` used for the calls ONNX Runtime does not take.
        graph: the :class:`CachedGraph` (``graph.active``: None before the first call, then
            whether ONNX Runtime runs the calls).

    Raises:
        TypeError: ``decoder`` is not a ``segment_anything`` ``MaskDecoder``.
    """

    def __init__(self, decoder: nn.Module, *, threads: int | None = None, cache_dir: str | os.PathLike | None = None) -> None:
        self.fallback = decoder if isinstance(decoder, ImageSharedMaskDecoder) else ImageSharedMaskDecoder(decoder)
        names = ("image", "pe", "sparse", "dense")

        def check_inputs():
            return dict(zip(names, _decoder_inputs(self.fallback, 3, seed=1)))

        def reference(inputs):
            return [t.numpy() for t in self.fallback.predict_masks(*inputs.values())]

        self.graph = CachedGraph(self.fallback, "mask-decoder", export_decoder, check_inputs, reference, TOLERANCE,
                                 threads=threads, cache_dir=cache_dir)

    @property
    def active(self) -> bool | None:
        """Whether ONNX Runtime runs the calls (None before the first)."""
        return self.graph.active

    # -- the call --------------------------------------------------------------------------------
    def __call__(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and IoU predictions, as ``MaskDecoder.forward``.

        Args:
            image_embeddings: float32 (1, C, 64, 64) embedding of one image.
            image_pe: float32 (1, C, 64, 64) dense positional encoding (``get_dense_pe()``).
            sparse_prompt_embeddings: float32 (B, N, C) point/box embeddings of B prompts.
            dense_prompt_embeddings: float32 (B, C, 64, 64), a broadcast (batch stride 0) or
                B == 1 unless a mask prompt was given.
            multimask_output: three masks per prompt (True) or one.

        Returns:
            ``(masks, iou_pred)``: float32 (B, 3 or 1, 256, 256) mask logits (SAM's 1024 frame
            at 1/4 resolution) and float32 (B, 3 or 1) predicted IoU, on the CPU.
        """
        d = dense_prompt_embeddings
        ours = (image_embeddings.device.type == "cpu" and image_embeddings.shape[0] == 1
                and image_embeddings.dtype == torch.float32 and (d.shape[0] == 1 or d.stride(0) == 0)
                and self.fallback.shares_first_block)
        session = self.graph.session() if ours else None
        if session is None or sparse_prompt_embeddings.shape[0] == 0:
            return self.fallback(image_embeddings, image_pe, sparse_prompt_embeddings, d, multimask_output)
        feeds = {"image": image_embeddings.detach().contiguous().numpy(), "pe": image_pe.detach().contiguous().numpy(),
                 "sparse": sparse_prompt_embeddings.detach().contiguous().numpy(),
                 "dense": d[:1].detach().contiguous().numpy()}
        masks, iou = (torch.from_numpy(a) for a in session.run(None, feeds))
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou[:, mask_slice]


__all__ = [
    "GRAPH_VERSION", "OPSET", "TOLERANCE", "CachedGraph", "OnnxMaskDecoder", "export_decoder", "export_graph",
    "onnx_cache_dir", "onnxruntime_available",
]
