"""The baseline that 1-NN + distance threshold replaces: a softmax classification head with a
confidence cutoff.

The old system put a softmax head on a ResNet-50 and called a photo "unknown" when the highest
class probability was below 0.78.  To compare like with like, :class:`SoftmaxHead` is a linear
layer on the *same* frozen, L2-normalised embeddings the 1-NN index holds (the catalog's K
augmented reference views per SKU), trained with cross-entropy: multinomial logistic regression
with an L2 penalty, solved to convergence with L-BFGS (the linear-probe recipe of CLIP, Radford
et al. 2021, §3.2; the objective is convex, so the result does not depend on the optimiser).

Unlike the 1-NN index, the head has one output per SKU: every added SKU means retraining it
(see docs/threshold.md, "adding a SKU").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RetailKlipError

logger = logging.getLogger(__name__)

#: Confidence cutoff of the softmax head this project replaces (max softmax probability below
#: it = "unknown").
DEFAULT_SOFTMAX_CUTOFF = 0.78
#: Default L2 penalty (on the per-sample mean cross-entropy) of :meth:`SoftmaxHead.fit`: weak
#: enough that the head is as confident on its own training views as a classifier trained to fit
#: them (mean top probability 0.997 on GroceryStore with MobileNetV2; an Adam-trained head with
#: train confidence 0.99 behaves alike).  Stronger penalties flatten the softmax, so that fewer
#: photos pass any fixed cutoff: see the sensitivity table in docs/threshold.md.
DEFAULT_L2 = 1e-6


@dataclass(frozen=True)
class HeadPredictions:
    """Softmax-head predictions for M embeddings.

    Attributes:
        labels: argmax class of each row (always set).
        confidence: float32 (M,) highest softmax probability, in [0, 1].
        known: bool (M,) ``confidence >= cutoff``; False means "unknown".
        cutoff: the confidence cutoff applied.
    """

    labels: list[str]
    confidence: np.ndarray
    known: np.ndarray
    cutoff: float


class SoftmaxHead:
    """A linear softmax classifier over frozen embeddings (see module docstring).

    Build with :meth:`fit`.  Attributes: ``classes`` (class ids, output order), ``linear``
    (``torch.nn.Linear(D, C)``), ``fit_seconds`` (training time), ``train_accuracy`` (on the
    training vectors), ``iterations`` (L-BFGS iterations run).
    """

    def __init__(self, classes: Sequence[str], linear: torch.nn.Linear) -> None:
        self.classes = list(classes)
        self.linear = linear
        self.fit_seconds = 0.0
        self.train_accuracy = float("nan")
        self.iterations = 0

    @classmethod
    def fit(
        cls,
        vectors: np.ndarray,
        labels: Sequence[str],
        *,
        l2: float = DEFAULT_L2,
        max_iter: int = 500,
    ) -> SoftmaxHead:
        """Train the head: minimise mean cross-entropy + ``l2 / 2 * ||W||^2`` (bias not
        penalised) from zero weights with full-batch L-BFGS (strong-Wolfe line search).

        Args:
            vectors: float32 (N, D) training embeddings (e.g. the K views of every SKU).
            labels: N class ids; classes are ordered by first appearance.
            l2: L2 penalty, >= 0 (equivalent to sklearn's ``LogisticRegression(C=1/(l2 * N))``).
            max_iter: L-BFGS iteration limit.

        Returns:
            The trained head.  Deterministic: the same inputs give the same weights.

        Raises:
            RetailKlipError: fewer than 2 classes (a softmax over one class is always 1.0),
                mismatched shapes, or a negative ``l2``.
        """
        if not l2 >= 0.0:
            raise RetailKlipError(f"the L2 penalty must be >= 0, got {l2}")
        x = torch.as_tensor(np.ascontiguousarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[0] != len(labels):
            raise RetailKlipError(f"need vectors (N, D) and N labels; got {tuple(x.shape)} and {len(labels)} labels")
        classes = list(dict.fromkeys(labels))
        if len(classes) < 2:
            raise RetailKlipError("a softmax head needs at least 2 SKUs")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[label] for label in labels], dtype=torch.long)
        linear = torch.nn.Linear(x.shape[1], len(classes))
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
        opt = torch.optim.LBFGS(
            linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(linear(x), y) + 0.5 * l2 * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        start = time.perf_counter()
        with torch.enable_grad():
            opt.step(closure)
        head = cls(classes, linear)
        head.fit_seconds = time.perf_counter() - start
        head.iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
        with torch.no_grad():
            head.train_accuracy = float((linear(x).argmax(1) == y).float().mean())
        logger.info(
            "softmax head: %d classes, %d vectors, %d L-BFGS iterations, %.2f s, train accuracy %.3f",
            len(classes), len(labels), head.iterations, head.fit_seconds, head.train_accuracy,
        )
        return head

    @torch.no_grad()
    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """Softmax probabilities, float32 (M, C), columns in :attr:`classes` order."""
        x = torch.as_tensor(np.ascontiguousarray(vectors, dtype=np.float32))
        return torch.softmax(self.linear(x), dim=1).numpy()

    def predict(self, vectors: np.ndarray, cutoff: float = DEFAULT_SOFTMAX_CUTOFF) -> HeadPredictions:
        """Classify embeddings (M, D); rows whose top probability is below ``cutoff`` are unknown.

        Raises:
            ValueError: ``cutoff`` outside [0, 1].
        """
        if not 0.0 <= cutoff <= 1.0:
            raise ValueError(f"a softmax confidence cutoff is in [0, 1], got {cutoff}")
        p = self.probabilities(vectors)
        top = p.argmax(1)
        conf = p[np.arange(len(p)), top].astype(np.float32)
        return HeadPredictions([self.classes[i] for i in top], conf, conf >= cutoff, float(cutoff))
