"""Choosing the depth d by short trainings (RetailKLIP §4.1.3).

For each candidate depth, a short run (``--sweep-epochs``) from the same initial weights trains on
breadth x d images per epoch; the depth whose run ends with the best held-out **average
per-class top-1** wins (ties: the smaller, cheaper depth).  The data are read and checked once
and the initial weights' zero-shot result is measured once, for all runs.

The depth is picked on held-out classes; reporting the final run's accuracy on the same classes
is then slightly optimistic.  ``--sweep-eval-data`` picks it on another set of held-out classes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from retailklip.evaluation import ZeroShotResult

from .config import TrainConfig
from .data import PreparedData, prepare_data
from .train import Trainer

logger = logging.getLogger(__name__)


def sweep_depth(cfg: TrainConfig, data: PreparedData | None = None) -> tuple[int, list[dict], ZeroShotResult]:
    """Run one short training per depth in ``cfg.sweep_depth`` and pick the best.

    Args:
        cfg: the run's settings; each sweep run uses them with ``depth = d``,
            ``epochs = sweep_epochs or epochs``, output ``OUT/sweep/depth-d``, no export, no resume.
        data: prepared data (with ``cfg.eval_data``), or None.

    Returns:
        ``(best depth, results, before)``: results has one dict per depth (``depth``,
        ``zero_shot_top1``, ``zero_shot_per_class_top1``, ``seconds``); ``before`` is the initial
        weights' result on the sweep's evaluation set.

    Raises:
        FinetuneError: as :class:`~finetune.train.Trainer`.
    """
    depths = sorted(set(cfg.sweep_depth or []))
    eval_data = cfg.sweep_eval_data or cfg.eval_data
    if data is None or cfg.sweep_eval_data:
        data = prepare_data(cfg.data, eval_data, workers=max(2, cfg.workers or 0), reference_copies=cfg.reference_copies)
    results, before = [], None
    for d in depths:
        t0 = time.perf_counter()
        sub = dataclasses.replace(cfg, depth=d, epochs=cfg.sweep_epochs or cfg.epochs, eval_data=eval_data,
                                  out=str(Path(cfg.out) / "sweep" / f"depth-{d}"), export=[], resume=None,
                                  sweep_depth=None, eval_every=cfg.sweep_epochs or cfg.epochs)
        logger.info("depth sweep: d = %d (%d epoch(s))", d, sub.epochs)
        trainer = Trainer(sub, data)
        if before is None:
            before = trainer.evaluate()
        m = trainer.fit(before, export=False)
        results.append({"depth": d, "zero_shot_top1": m["zero_shot_top1_after"],
                        "zero_shot_per_class_top1": m["zero_shot_per_class_top1_after"],
                        "seconds": round(time.perf_counter() - t0, 1)})
    best = max(results, key=lambda r: (r["zero_shot_per_class_top1"], -r["depth"]))
    table = "\n".join(f"  d={r['depth']:<5d} per-class top-1 {r['zero_shot_per_class_top1']:.4f}  top-1 {r['zero_shot_top1']:.4f}  "
                      f"[{r['seconds']:.0f}s]" for r in results)
    logger.info("depth sweep results (held-out %s):\n%s\n  -> depth %d", eval_data, table, best["depth"])
    return best["depth"], results, before
