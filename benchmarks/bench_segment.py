#!/usr/bin/env python3
"""CPU benchmark of the segmentation stage; prints a table of ratios against in-run baselines.

Rows (same real photo for all):

* **automatic mask generation** with the same point grid and SAM's default thresholds:
  ``sam-vit-b`` (baseline) vs ``efficientvit-sam-l0``. Random weights cost the same as trained
  ones for the encoder and decoder; they make the filtered tail (RLE encoding, NMS) almost
  empty for both models, so the ratio is the model cost.
* **EfficientViT-SAM-L0 image encoder** incl. preprocessing: the official
  ``mit-han-lab/efficientvit`` implementation (baseline, needs ``--official-repo``; the row is
  skipped without it) vs ``retailklip.segment`` (goal: ratio <= 1.0).

Time: the implementations of a task are built in one subprocess and timed interleaved (median
of ``--repeats`` rounds after a warm-up; odd rounds in reverse order), so that load changes on a
shared machine affect them alike. Memory: each implementation runs once in a fresh subprocess,
whose peak resident memory (``ru_maxrss``) is reported.

Usage::

    python benchmarks/bench_segment.py [--official-repo /tmp/efficientvit_official] \
        [--image PATH] [--points-per-side 16] [--repeats 3] [--threads 2]
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


def _load_tool():
    path = REPO_ROOT / "tools" / "check_efficientvit_equivalence.py"
    spec = importlib.util.spec_from_file_location("check_efficientvit_equivalence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(task: str, model: str, args: argparse.Namespace, rgb):
    """Return a zero-argument callable running ``task`` with implementation ``model`` on ``rgb``."""
    if task == "amg":
        from retailklip.segment import MaskGeneratorOptions, build_mask_generator, create_model

        generator = build_mask_generator(
            create_model(model, random_init=True), MaskGeneratorOptions(points_per_side=args.points_per_side)
        )
        return lambda: generator.generate(rgb)
    if model == "official":
        zoo, official_sam = _load_tool().import_official(args.official_repo)
        predictor = official_sam.EfficientViTSamPredictor(
            zoo.create_efficientvit_sam_model("efficientvit-sam-l0", pretrained=False).eval()
        )
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
    torch.manual_seed(0)
    rgb = np.asarray(Image.open(args.image).convert("RGB"))
    with torch.no_grad():
        if args.worker == "memory":
            rss_imports = _peak_rss_mib()
            _build(args.task, args.model, args, rgb)()
            print(json.dumps({"peak_rss_mib": _peak_rss_mib(), "rss_after_imports_mib": rss_imports}))
            return
        models = args.model.split(",")
        runs = [_build(args.task, m, args, rgb) for m in models]
        for run in runs:
            run()  # warm-up
        times: dict[str, list[float]] = {m: [] for m in models}
        for i in range(args.repeats):
            order = list(zip(models, runs))
            for m, run in order if i % 2 == 0 else reversed(order):
                start = time.perf_counter()
                run()
                times[m].append(time.perf_counter() - start)
    print(json.dumps({"median_s": {m: statistics.median(t) for m, t in times.items()}, "times_s": times,
                      "threads": torch.get_num_threads()}))


def _run_worker(mode: str, task: str, model: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", mode, "--task", task, "--model", model, "--image", str(args.image),
        "--points-per-side", str(args.points_per_side), "--repeats", str(args.repeats), "--threads", str(args.threads),
    ]
    if args.official_repo:
        cmd += ["--official-repo", str(args.official_repo)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {mode}/{task}/{model} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {mode:6s} {task:8s} {model:32s} {result}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segmentation-stage CPU benchmark (ratios vs in-run baselines).")
    parser.add_argument("--official-repo", type=Path, help="extracted mit-han-lab/efficientvit; enables the encoder row")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--points-per-side", type=int, default=16, help="AMG point grid side (SAM default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
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
    if args.official_repo and not (args.official_repo / "efficientvit" / "sam_model_zoo.py").is_file():
        raise SystemExit(f"--official-repo {args.official_repo}: not an extracted mit-han-lab/efficientvit")

    from PIL import Image

    w, h = Image.open(args.image).size
    groups = [(
        f"automatic mask generation, {args.points_per_side}x{args.points_per_side} grid",
        [("amg", "sam-vit-b", "sam-vit-b (baseline)"), ("amg", "efficientvit-sam-l0", "efficientvit-sam-l0")],
    )]
    if args.official_repo:
        groups.append((
            "EfficientViT-SAM-L0 image encoder (incl. preprocessing)",
            [("encoder", "official", "official mit-han-lab code (baseline)"), ("encoder", "ours", "retailklip.segment")],
        ))
    else:
        print("note: no --official-repo, the official-encoder row is skipped", file=sys.stderr)

    rows = []
    threads = None
    for title, runs in groups:
        task = runs[0][0]
        timing = _run_worker("time", task, ",".join(model for _, model, _ in runs), args)
        threads = timing["threads"]
        base_t = base_m = None
        for _, model, label in runs:
            t = timing["median_s"][model]
            m = _run_worker("memory", task, model, args)["peak_rss_mib"]
            base_t, base_m = base_t or t, base_m or m
            rows.append((title, label, t, t / base_t, m, m / base_m))
            title = ""

    print(f"\nImage {args.image.name} ({w}x{h}), CPU, torch threads {threads}; time: median of {args.repeats} "
          "interleaved runs after 1 warm-up (implementations of a task in one process); "
          "peak RSS: one run per implementation in its own process.\n")
    print("| task | implementation | median time (s) | time ratio | peak RSS (MiB) | peak RSS ratio |")
    print("|---|---|---|---|---|---|")
    for title, label, t, t_ratio, m, m_ratio in rows:
        print(f"| {title} | {label} | {t:.3f} | {t_ratio:.2f} | {m:.0f} | {m_ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
