"""Object recall vs prompts used, per prompt strategy, on simulated checkout trays (issue 13, item 3).

No trained SAM weights exist here, so the mask decoder is played by
:class:`retailklip.segment.oracle.OracleDecoder` (ground truth + SAM's failure modes at the rates
of :class:`~retailklip.segment.oracle.OracleRates`, printed below the table) on trays of
:mod:`retailklip.segment.synthetic` (real GroceryStore packshots on real in-store backgrounds,
3-15 objects, overlaps).  Every strategy runs through the same
:class:`~retailklip.segment.bounded.BoundedMaskGenerator` (fast mode, SAM's thresholds: predicted
IoU > 0.88, stability >= 0.95, box NMS 0.7) and answers the same prompts the same way (the
oracle's answer is a function of the point).

A ground-truth object is *found* when an accepted mask has IoU >= 0.5 (also reported: >= 0.75)
with its visible mask; recall = found / objects over all trays.  Prompts are counted as decoded
(``BoundedMaskGenerator.prompts_used``); the ratio is against SAM's 32 x 32 grid (1024).  At most
``--max-masks`` masks are kept per photo (default: the segmenter's ``MaskGeneratorOptions``).

    python benchmarks/bench_prompts.py --n 50                 # the table in docs/segmentation.md
    python benchmarks/bench_prompts.py --n 50 --no-tray       # sensitivity: no whole-tray answers
    python benchmarks/bench_prompts.py --n 50 --whole-cover   # the coverage map before the third round

Since the third round (docs/segmentation.md) the generator's coverage map counts only each kept
mask's connected components at its own prompt (``BoundedOptions.cover_at_prompt``); the tables
of the earlier rounds were measured with whole masks (``--whole-cover``, or a row wrapped in
:class:`WholeCover`, named ``...[whole]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # this checkout's retailklip, not another installed copy

from retailklip.datasets import read_grocery_store  # noqa: E402
from retailklip.segment.automatic import MaskGeneratorOptions  # noqa: E402
from retailklip.segment.bounded import BoundedMaskGenerator, BoundedOptions  # noqa: E402
from retailklip.segment.oracle import OracleDecoder, OracleRates  # noqa: E402
from retailklip.segment.prompts import (  # noqa: E402
    CoarseToFinePrompts,
    FarthestPointPrompts,
    GridPrompts,
    RetryPrompts,
)
from retailklip.segment.synthetic import TrayMaker, default_root  # noqa: E402


@dataclasses.dataclass(frozen=True)
class WholeCover:
    """A strategy run with the coverage map before the third round: each kept mask counts whole
    (``BoundedOptions(cover_at_prompt=False)``), e.g. the previous default as it shipped."""

    strategy: Any

    @property
    def name(self) -> str:
        return f"{self.strategy.name}[whole]"

    def start(self, width: int, height: int) -> Any:
        return self.strategy.start(width, height)


def strategies() -> list:
    """The strategies compared (SAM's grids first)."""
    v1 = {"candidates": 32, "retry_partial": False, "explored_weight": 1.0, "suspect_weight": None}
    # ^ RetryPrompts as first shipped; r2: the second round's settings of what the third round changed
    r2 = {"retries": 2, "suspect_weight": None}
    v2 = RetryPrompts(**r2)  # the default of the second round
    return [
        GridPrompts(32),
        GridPrompts(16),
        GridPrompts(11),
        CoarseToFinePrompts((8, 16, 32), 128),
        CoarseToFinePrompts((4, 8, 16, 32), 128),
        CoarseToFinePrompts((4, 8, 16, 32), 64),
        CoarseToFinePrompts((4, 8, 16, 32), 48),
        CoarseToFinePrompts((4, 8, 16, 32), 32),
        CoarseToFinePrompts((4, 8, 16), 48),
        FarthestPointPrompts(6, 16, 128, covered_weight=0.0),
        FarthestPointPrompts(6, 16, 128, covered_weight=0.25),
        FarthestPointPrompts(6, 16, 128, covered_weight=0.5),
        FarthestPointPrompts(8, 16, 128, covered_weight=0.25),
        FarthestPointPrompts(6, 8, 128, covered_weight=0.25),
        FarthestPointPrompts(6, 16, 128, covered_weight=0.0, stop_covered=True),
        RetryPrompts(8, 16, 128, retries=1, **v1),
        RetryPrompts(8, 16, 128, retries=2, **v1),
        RetryPrompts(8, 16, 128, retries=3, **v1),
        RetryPrompts(8, 16, 128, retries=2, retry_max_area=0.01, **v1),
        RetryPrompts(8, 16, 128, retries=2, retry_max_area=0.04, **v1),
        RetryPrompts(8, 16, 128, retries=2, retry_share=0.5, **v1),
        RetryPrompts(6, 16, 128, retries=2, **v1),
        RetryPrompts(6, 8, 128, retries=2, **v1),
        # second round: partial retries, a finer candidate grid, unexplored places first
        RetryPrompts(candidates=32, retry_partial=True, explored_weight=1.0, **r2),
        RetryPrompts(candidates=64, retry_partial=True, explored_weight=1.0, **r2),
        RetryPrompts(candidates=32, retry_partial=True, explored_weight=0.5, **r2),
        RetryPrompts(candidates=32, retry_partial=True, explored_weight=0.75, **r2),
        RetryPrompts(candidates=64, retry_partial=True, explored_weight=0.35, **r2),
        RetryPrompts(candidates=64, retry_partial=True, explored_weight=0.5, explore_max_area=0.2, **r2),
        RetryPrompts(candidates=96, retry_partial=True, explored_weight=0.5, **r2),
        RetryPrompts(candidates=64, retry_partial=False, explored_weight=0.5, **r2),
        RetryPrompts(candidates=64, retry_partial=True, explored_weight=0.5, retry_max_area=0.04, **r2),
        # third round: coverage at the prompt (the generator's), rejected small answers first, more retries
        WholeCover(v2),  # the default of the second round, as it shipped
        v2,
        RetryPrompts(retries=3, suspect_weight=None),
        RetryPrompts(retries=4, suspect_weight=None),
        RetryPrompts(retries=2, suspect_weight=0.75),
        RetryPrompts(retries=2, suspect_weight=1.0),
        RetryPrompts(retries=2, suspect_weight=1.5),
        RetryPrompts(first=7, retries=2, suspect_weight=None),
        RetryPrompts(first=6, retries=2, suspect_weight=None),
        RetryPrompts(retries=3, suspect_weight=1.0),
        RetryPrompts(retries=4, suspect_weight=1.0, covered_weight=0.1),
        RetryPrompts(retries=2, suspect_weight=1.0, covered_weight=0.1),
        RetryPrompts(retries=4, suspect_weight=1.5),
        RetryPrompts(),  # the default (prompts="retry"): retries=4, suspect_weight=1.0
    ]



def paired(a: np.ndarray, b: np.ndarray, tray: np.ndarray, n_boot: int = 10000) -> str:
    """Per-object paired comparison of two strategies (bool found arrays): discordant counts,
    exact two-sided McNemar p (binomial on the discordant pairs) and a 95 % bootstrap interval
    of the recall difference a - b resampling whole trays (objects of a tray are not independent)."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
    rng = np.random.default_rng(0)
    trays = np.unique(tray)
    idx = [np.flatnonzero(tray == t) for t in trays]
    diffs = []
    for _ in range(n_boot):
        pick = np.concatenate([idx[i] for i in rng.integers(len(trays), size=len(trays))])
        diffs.append(a[pick].mean() - b[pick].mean())
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return (f"{a.mean() - b.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] (tray bootstrap 95 %); only first {only_a}, "
            f"only second {only_b}, McNemar exact p = {p:.3g}")


def found_iou(labels: np.ndarray, n_objects: int, records: list[dict]) -> np.ndarray:
    """Best IoU of each ground-truth object (label map: 0 = background, k + 1 = object k) with
    any accepted mask: float (n_objects,)."""
    gt_area = np.bincount(labels.ravel(), minlength=n_objects + 1)[1:].astype(np.float64)
    best = np.zeros(n_objects)
    for r in records:
        m = r["segmentation"]
        inter = np.bincount(labels[m], minlength=n_objects + 1)[1:]
        iou = inter / np.maximum(gt_area + m.sum() - inter, 1)
        best = np.maximum(best, iou)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50, help="trays (seeds seed .. seed + n - 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="1024x768", help="WxH pixels")
    p.add_argument("--root", default=None, help="GroceryStore root")
    p.add_argument("--max-masks", type=int, default=MaskGeneratorOptions().max_masks,
                   help="masks kept per photo (default: the segmenter's, MaskGeneratorOptions.max_masks)")
    p.add_argument("--no-tray", action="store_true", help="oracle never answers the whole-tray mask")
    p.add_argument("--whole-cover", action="store_true",
                   help="coverage map of whole kept masks for every strategy (before the third round)")
    p.add_argument("--only", default=None,
                   help="semicolon-separated strategy names (as printed) to run, default all")
    p.add_argument("--paired", action="append", default=[], metavar="A;B",
                   help="print a per-object paired comparison of strategies A and B (names as printed); repeatable")
    a = p.parse_args()
    W, H = (int(v) for v in a.size.lower().split("x"))
    rates = OracleRates()
    if a.no_tray:
        rates = dataclasses.replace(rates, tray_on_object=0.0, tray_on_background=0.0)
    maker = TrayMaker(read_grocery_store(a.root or default_root()))
    strats = strategies()
    if a.only:
        wanted = a.only.split(";")
        strats = [s for s in strats if s.name in wanted]
        missing = set(wanted) - {s.name for s in strats}
        if missing:
            raise SystemExit(f"unknown strategies: {sorted(missing)}; known: {[s.name for s in strategies()]}")
    hits = {s.name: [] for s in strats}
    tray_of: list[int] = []
    best = {s.name: {50: [], 75: []} for s in strats}
    prompts = {s.name: [] for s in strats}
    kept = {s.name: [] for s in strats}
    n_objects, t0 = 0, time.perf_counter()
    for i in range(a.n):
        tray = maker.make(a.seed + i, (W, H))
        decoder = OracleDecoder(tray, rates, seed=a.seed + i)
        n_objects += len(tray.skus)
        tray_of += [i] * len(tray.skus)
        for s in strats:
            whole = a.whole_cover or isinstance(s, WholeCover)
            gen = BoundedMaskGenerator(BoundedOptions(max_masks=a.max_masks, cover_at_prompt=not whole), s)
            records = gen.generate(decoder)
            iou = found_iou(tray.labels, len(tray.skus), records)
            hits[s.name].append(iou >= 0.5)
            best[s.name][50].append(int((iou >= 0.5).sum()))
            best[s.name][75].append(int((iou >= 0.75).sum()))
            prompts[s.name].append(gen.prompts_used)
            kept[s.name].append(len(records))
    print(f"{a.n} trays {W}x{H}, max_masks {a.max_masks}, {n_objects} objects, seeds {a.seed}..{a.seed + a.n - 1}, "
          f"{time.perf_counter() - t0:.0f} s")
    print("\n| strategy | recall IoU>=0.5 | recall IoU>=0.75 | mean prompts | max prompts | prompts / 32x32 | masks kept |")
    print("|---|---|---|---|---|---|---|")
    for s in strats:
        pr = np.asarray(prompts[s.name])
        print(f"| `{s.name}` | {sum(best[s.name][50]) / n_objects:.3f} | {sum(best[s.name][75]) / n_objects:.3f} | "
              f"{pr.mean():.1f} | {pr.max()} | {pr.mean() / 1024:.3f} | {np.mean(kept[s.name]):.1f} |")
    for pair in a.paired:
        x, y = pair.split(";", 1)
        print(f"\npaired recall IoU>=0.5, `{x}` - `{y}`: "
              f"{paired(np.concatenate(hits[x]), np.concatenate(hits[y]), np.asarray(tray_of))}")
    print(f"\noracle rates: {rates}")


if __name__ == "__main__":
    main()
