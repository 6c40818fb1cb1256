#!/usr/bin/env python3
"""CPU benchmark of the segmentation stage; prints a table of ratios against in-run baselines.

Rows (same real photo for all):

* **automatic mask generation** with the same point grid and SAM's default thresholds:
  ``sam-vit-b`` (baseline) vs ``efficientvit-sam-l0``. Random weights cost the same as trained
  ones for the encoder and decoder; they make the filtered tail (RLE encoding, NMS) almost
  empty for both models, so the ratio is the model cost.
* **EfficientViT-SAM-L0 image encoder** incl. preprocessing: the official
  ``mit-han-lab/efficientvit`` implementation (baseline: the ``efficientsam`` package, a test
  extra; the row is skipped without it) vs ``retailklip.segment``, both with the same random weights (goal:
  ratio <= 1.0).

Subnormal floats are flushed to zero (``torch.set_flush_denormal``): random weights can produce
them, trained ones rarely do, and they would make timings depend on the random draw.

Time: the implementations of a task are built in one subprocess and timed interleaved (after a
warm-up, ``--repeats`` / ``--amg-repeats`` rounds, odd rounds in reverse order), so that load
changes on a shared machine affect them alike; median and minimum are reported (the minimum is
the least disturbed run). Memory: each implementation runs once in a fresh subprocess; its peak
resident memory (``ru_maxrss``) is reported, and the part above the RSS after importing the
implementation's modules ("model": weights + activations).

Usage::

    python benchmarks/bench_segment.py \
        [--image PATH] [--points-per-side 16] [--repeats 7] [--amg-repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery-store" / "dataset" / "train" / "Fruit" / "Kiwi" / "Kiwi_013.jpg"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _has_official() -> bool:
    return importlib.util.find_spec("efficientsam") is not None


def _build(task: str, model: str, args: argparse.Namespace, rgb):
    """Return a zero-argument callable running ``task`` with implementation ``model`` on ``rgb``."""
    if task == "amg":
        from retailklip.segment import MaskGeneratorOptions, build_mask_generator, create_model

        generator = build_mask_generator(
            create_model(model, random_init=True), MaskGeneratorOptions(points_per_side=args.points_per_side)
        )
        return lambda: generator.generate(rgb)
    import torch

    # Same seed, same parameter creation order and init: both encoders get identical weights
    # (checked: the state dicts are equal after key mapping), hence identical activations.
    torch.manual_seed(0)
    if model == "official":
        from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor
        from efficientsam.sam_model_zoo import create_efficientvit_sam_model

        predictor = EfficientViTSamPredictor(create_efficientvit_sam_model("efficientvit-sam-l0", pretrained=False).eval())
        return lambda: predictor.set_image(rgb)
    from retailklip.segment import create_model

    ours = create_model("efficientvit-sam-l0", random_init=True)
    return lambda: ours.image_embeddings(rgb)


def worker(args: argparse.Namespace) -> None:
    """``--worker time``: build every implementation of ``--task`` and time them interleaved
    (round i runs them in order, round i+1 in reverse), so that load changes on a shared machine
    hit all alike. ``--worker memory``: build one implementation, run it once, report peak RSS.
    Prints one JSON line."""
    sys.path.insert(0, str(REPO_ROOT))
    import numpy as np
    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    # Random weights can drive activations into subnormal floats, which are many times slower
    # on x86 and would make the timing depend on the random draw rather than on the model.
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    rgb = np.asarray(Image.open(args.image).convert("RGB"))
    with torch.no_grad():
        if args.worker == "memory":
            # Import the implementation's modules first, so that the model's own footprint
            # (weights + activations) can be told apart from library imports.
            if args.model == "official":
                import efficientsam.models.efficientvit.sam  # noqa: F401
            else:
                import retailklip.segment  # noqa: F401
            rss_imports = _peak_rss_mib()
            _build(args.task, args.model, args, rgb)()
            print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "rss_after_imports_mib": rss_imports}))
            return
        models = args.model.split(",")
        runs = [_build(args.task, m, args, rgb) for m in models]
        for run in runs:
            run()  # warm-up
        times: dict[str, list[float]] = {m: [] for m in models}
        repeats = args.amg_repeats if args.task == "amg" else args.repeats
        for i in range(repeats):
            order = list(zip(models, runs))
            for m, run in order if i % 2 == 0 else reversed(order):
                start = time.perf_counter()
                run()
                times[m].append(time.perf_counter() - start)
    print(json.dumps({"median_s": {m: statistics.median(t) for m, t in times.items()},
                      "min_s": {m: min(t) for m, t in times.items()}, "times_s": times,
                      "threads": torch.get_num_threads()}))


def _run_worker(mode: str, task: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", mode, "--task", task, "--model", model, "--image", str(args.image),
        "--points-per-side", str(args.points_per_side), "--repeats", str(args.repeats),
        "--amg-repeats", str(args.amg_repeats), "--threads", str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {mode}/{task}/{model} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {mode:6s} {task:8s} {model:32s} {result}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segmentation-stage CPU benchmark (ratios vs in-run baselines).")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--points-per-side", type=int, default=16, help="AMG point grid side (SAM default: 32)")
    parser.add_argument("--repeats", type=int, default=7, help="timed encoder runs per implementation after a warm-up")
    parser.add_argument("--amg-repeats", type=int, default=3, help="timed AMG runs per implementation after a warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=("amg", "encoder"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.image.is_file():
        raise SystemExit(f"benchmark image {args.image} not found; pass --image")

    from PIL import Image

    w, h = Image.open(args.image).size
    groups = [(
        f"automatic mask generation, {args.points_per_side}x{args.points_per_side} grid",
        [("amg", "sam-vit-b", "sam-vit-b (baseline)"), ("amg", "efficientvit-sam-l0", "efficientvit-sam-l0")],
    )]
    if _has_official():
        groups.append((
            "EfficientViT-SAM-L0 image encoder (incl. preprocessing)",
            [("encoder", "official", "official mit-han-lab code (baseline)"), ("encoder", "ours", "retailklip.segment")],
        ))
    else:
        print("note: efficientsam (the official code, a test extra) is not installed: the encoder row is skipped",
              file=sys.stderr)

    rows = []
    threads = None
    for title, runs in groups:
        task = runs[0][0]
        timing = _run_worker("time", task, ",".join(model for _, model, _ in runs), args)
        threads = timing["threads"]
        base = None
        for _, model, label in runs:
            memory = _run_worker("memory", task, model, args)
            r = {
                "median": timing["median_s"][model],
                "min": timing["min_s"][model],
                "peak": memory["peak_rss_mib"],
                "model_mem": memory["peak_rss_mib"] - memory["rss_after_imports_mib"],
            }
            base = base or r
            rows.append((title, label, r, {k: r[k] / base[k] for k in r}))
            title = ""

    print(f"\nImage {args.image.name} ({w}x{h}), CPU, torch threads {threads}. Time: {args.amg_repeats} (AMG) / "
          f"{args.repeats} (encoder) interleaved runs after 1 warm-up, implementations of a task in one process. "
          "Memory: one run per implementation in its own process; 'model' = peak RSS minus RSS after importing "
          "the implementation's modules. Ratios are against the first row of each task.\n")
    print("| task | implementation | median time (s) | median ratio | min time (s) | min ratio "
          "| peak RSS (MiB) | ratio | model memory (MiB) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for title, label, r, q in rows:
        print(f"| {title} | {label} | {r['median']:.2f} | {q['median']:.2f} | {r['min']:.2f} | {q['min']:.2f} "
              f"| {r['peak']:.0f} | {q['peak']:.2f} | {r['model_mem']:.0f} | {q['model_mem']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
