"""Seeded use of torch's *global* random generator, safe across threads.

Seeded random model initialisation (``random_init``) and reference augmentation
(torchvision transforms read the global generator) both fork the global RNG, seed it, draw, and
restore it.  Fork + seed + draw is not atomic: two threads doing it at once draw from each other's
seeds, so e.g. a recognizer building its encoder while a rebuild builds another would get
different "random:0" weights than the vectors were made with.  :func:`seeded` serialises every
such section on one process-wide lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


_lock = threading.RLock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded to ``seed``, restored afterwards,
    holding a process-wide lock so concurrent seeded sections never interleave."""
    import torch

    with _lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
