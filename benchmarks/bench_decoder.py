#!/usr/bin/env python3
"""SAM mask decoder (+ prompt encoder) CPU time per prompt, and the agreement of faster variants.

Setting (issue 13, item 5): ``efficientvit-sam-l0`` with random weights (subnormals flushed, as
in bench_segment.py), the image embedding of a real GroceryStore photo, batches of single-point
prompts at random positions (one positive point each, ``multimask_output=True``: three masks
per prompt), i.e. what ``SamAutomaticMaskGenerator`` asks of the decoder per batch. One call
= prompt encoder + ``get_dense_pe`` + mask decoder, as ``SamPredictor.predict_torch`` does it
(without the upsampling to the photo size).

Variants (all in one process, timed interleaved: round i in order, round i+1 reversed, after a
warm-up; the minimum over rounds is the least disturbed figure):

* ``fp32`` (baseline): ``segment_anything``'s ``MaskDecoder`` as is.
* ``shared``: :class:`retailklip.segment.fast_decoder.ImageSharedMaskDecoder`, the first block's
  prompt-independent image projections once per batch, no per-prompt copies of the embedding.
* ``bf16`` / ``shared+bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)``.
* ``int8`` / ``shared+int8``: ``torch.ao.quantization.quantize_dynamic`` of the decoder's
  ``nn.Linear`` layers (int8 weights, dynamically quantised activations).
* ``compile`` / ``shared+compile``: ``torch.compile`` (inductor) of the plain / shared decoder
  (skipped if it fails here; the warm-up column shows the compilation time).
* ``shared+onnxruntime``: :class:`~retailklip.segment.onnx_runtime.OnnxMaskDecoder` (the
  shared decoder exported to ONNX, run by ONNX Runtime's CPU provider; no graph cache, so the
  warm-up column includes the export and its agreement check; needs ``retailklip[onnx]``).
* ``shared/bN``: the shared decoder on batches of N prompts (same prompts, concatenated).
* ``factored``: :class:`~retailklip.segment.factored_decoder.FactoredMaskDecoder` (image tokens
  in factored form, per prompt only low-rank work; its per-image terms are computed once per
  photo, on the warm-up call, and cached); ``factored+terms`` clears that cache before every
  call, so the per-image work is in its time (a photo gets up to 128 prompts, this run's batch
  counts as the whole photo).

Agreement with ``fp32`` on the same prompts: max |mask logit difference| (and the largest
|logit| for scale), max |IoU prediction difference|, and the mean IoU of the binary masks
(logit > 0) of the low-resolution 256x256 masks. With random weights logits are small (|x| <
~0.3), so absolute differences understate what trained weights would show; the mask IoU is the
figure that carries over.

Usage::

    python benchmarks/bench_decoder.py [--image PATH] [--prompts 64] [--repeats 3] [--threads 2]
        [--variants fp32,shared,...]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DEFAULT_IMAGE = REPO_ROOT.parent / "shared" / "data" / "grocery-store" / "dataset" / "train" / "Fruit" / "Kiwi" / "Kiwi_013.jpg"
ALL_VARIANTS = (
    "fp32", "shared", "bf16", "shared+bf16", "int8", "shared+int8", "compile", "shared+compile", "shared+onnxruntime",
    "shared/b16", "shared/b256", "factored", "factored+terms",
)


def _decoder_call(model, decoder, emb: torch.Tensor, points: torch.Tensor, batch: int, autocast: bool) -> Callable:
    """A zero-argument callable decoding all ``points`` ((P, 1, 2), SAM's 1024 frame) in batches
    of ``batch``; returns (masks (P, 3, 256, 256), iou (P, 3)) as float32."""
    labels = torch.ones(points.shape[0], 1, dtype=torch.int)

    def run():
        masks, ious = [], []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, points.shape[0], batch):
                sparse, dense = model.prompt_encoder(points=(points[i : i + batch], labels[i : i + batch]), boxes=None, masks=None)
                m, q = decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
                masks.append(m.float())
                ious.append(q.float())
        return torch.cat(masks), torch.cat(ious)

    return run


def build_variants(names: list[str], model, emb: torch.Tensor, points: torch.Tensor, prompts: int) -> dict[str, Callable]:
    from retailklip.segment.factored_decoder import FactoredMaskDecoder
    from retailklip.segment.fast_decoder import ImageSharedMaskDecoder
    from retailklip.segment.onnx_runtime import OnnxMaskDecoder, onnxruntime_available

    plain = model.mask_decoder
    shared = ImageSharedMaskDecoder(plain)
    runs: dict[str, Callable] = {}
    for name in names:
        base, _, size = name.partition("/b")
        batch = int(size) if size else prompts
        pts = points if batch <= len(points) else points.repeat(batch // len(points), 1, 1)
        if base == "fp32":
            runs[name] = _decoder_call(model, plain, emb, pts, batch, False)
        elif base == "shared":
            runs[name] = _decoder_call(model, shared, emb, pts, batch, False)
        elif base in ("bf16", "shared+bf16"):
            runs[name] = _decoder_call(model, shared if base.startswith("shared") else plain, emb, pts, batch, True)
        elif base in ("int8", "shared+int8"):
            quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(plain), {torch.nn.Linear}, dtype=torch.qint8)
            decoder = ImageSharedMaskDecoder(quantized) if base.startswith("shared") else quantized
            runs[name] = _decoder_call(model, decoder, emb, pts, batch, False)
        elif base == "shared+onnxruntime":
            if not onnxruntime_available():
                raise SystemExit("variant shared+onnxruntime needs pip install 'retailklip[onnx]'")
            runs[name] = _decoder_call(model, OnnxMaskDecoder(shared, cache_dir=""), emb, pts, batch, False)
        elif base in ("factored", "factored+terms"):
            factored = FactoredMaskDecoder(plain)
            call = _decoder_call(model, factored, emb, pts, batch, False)
            if base == "factored":
                runs[name] = call
            else:
                runs[name] = lambda call=call, factored=factored: (factored.clear_cache(), call())[1]
        elif base in ("compile", "shared+compile"):
            compiled = torch.compile(shared if base.startswith("shared") else plain)
            runs[name] = _decoder_call(model, compiled, emb, pts, batch, False)
        else:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
    return runs


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean IoU of the binary masks (logit > 0) of two (P, 3, H, W) logit stacks (empty-empty = 1)."""
    a, b = (a > 0).flatten(2), (b > 0).flatten(2)
    inter, union = (a & b).sum(-1).float(), (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SAM mask-decoder ms per prompt (ratios vs fp32 in one run).")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--prompts", type=int, default=64, help="prompts per batch (SAM's points_per_batch: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from PIL import Image

    from retailklip.segment import build_efficientvit_sam

    if not args.image.is_file():
        raise SystemExit(f"benchmark image {args.image} not found; pass --image")
    torch.manual_seed(0)
    model = build_efficientvit_sam("efficientvit-sam-l0")
    rgb = np.asarray(Image.open(args.image).convert("RGB"))
    emb = model.image_embeddings(rgb)
    h, w = rgb.shape[:2]
    scale = 1024 / max(h, w)
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(args.prompts, 1, 2, generator=gen) * torch.tensor([w * scale, h * scale])

    names = ["fp32"] + [v for v in args.variants.split(",") if v and v != "fp32"]
    runs, outputs, warmup = {}, {}, {}
    for name, run in build_variants(names, model, emb, points, args.prompts).items():
        try:
            start = time.perf_counter()
            outputs[name] = run()  # warm-up (and compilation)
            warmup[name] = time.perf_counter() - start
            runs[name] = run
        except Exception as exc:  # noqa: BLE001 (e.g. torch.compile without a working compiler)
            print(f"note: variant {name} failed and is skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                  file=sys.stderr)
    times: dict[str, list[float]] = {n: [] for n in runs}
    for i in range(args.repeats):
        order = list(runs.items())
        for name, run in order if i % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(f"  round {i}: {name} {times[name][-1]:.2f} s", file=sys.stderr)

    ref_masks, ref_iou = outputs["fp32"]
    base = min(times["fp32"]) / ref_masks.shape[0]
    print(f"\nefficientvit-sam-l0 mask decoder + prompt encoder, {args.prompts} single-point prompts per batch, "
          f"multimask, {w}x{h} photo, torch threads {torch.get_num_threads()}, {args.repeats} interleaved rounds\n")
    print("| variant | ms / prompt (min) | ratio | ms / prompt (median) | warm-up call (s) "
          "| max abs logit diff (of max abs logit) | max abs IoU-pred diff | mask IoU vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in runs:
        masks, iou = outputs[name]
        n = masks.shape[0]
        masks, iou = masks[: ref_masks.shape[0]], iou[: ref_iou.shape[0]]
        per = min(times[name]) / n
        med = sorted(times[name])[len(times[name]) // 2] / n
        print(f"| {name} | {per * 1000:.1f} | {per / base:.2f} | {med * 1000:.1f} | {warmup[name]:.1f} "
              f"| {(masks - ref_masks).abs().max().item():.2e} (of {ref_masks.abs().max().item():.3f}) "
              f"| {(iou - ref_iou).abs().max().item():.2e} | {mask_iou(masks, ref_masks):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
