"""Prompt strategies of automatic mask generation: which points the mask decoder is asked about.

SAM's automatic mask generator (Kirillov et al. 2023, §7.1 / appendix B) prompts a regular
32 x 32 grid (1024 points); the decoder, not the image encoder, then dominates the time on a CPU
(~110 ms per prompt for EfficientViT-SAM-L0 on 2 cores).  A strategy here proposes points in
*rounds*: after each round the generator tells it which pixels the masks accepted so far cover,
so later rounds can skip covered places (MobileSAMv2, Zhang et al. 2023, makes the same point:
most grid prompts land on objects already found).  Every strategy has a hard ``max_prompts``, so
the worst case (nothing found: an empty tray, random weights) is bounded too.

Interface: ``strategy.start(width, height)`` returns a session;
``session.next_points(coverage)`` returns float64 (n, 2) ``(x, y)`` photo pixels (float64 as
SAM's own grid, so the exact mode prompts the very same coordinates) to decode
next, or ``None`` when done.  ``coverage`` is a bool (h, w) map at any resolution (the
generator's low working resolution) of the pixels covered by accepted masks (the generator
counts each where it meets its own prompt), None before the first round.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from typing import Any

import numpy as np

from .errors import SegmenterOptionError


def grid_points(points_per_side: int, width: int, height: int) -> np.ndarray:
    """SAM's point grid (``segment_anything.utils.amg.build_point_grid``): cell centres of an
    n x n grid over the photo.

    Returns:
        float64 (n*n, 2) ``(x, y)`` pixel coordinates, row by row (x fastest), as SAM orders them
        (the same numbers as ``build_point_grid(n) * [width, height]``).
    """
    offset = 1.0 / (2 * points_per_side)
    side = np.linspace(offset, 1 - offset, points_per_side)
    xs = np.tile(side[None, :], (points_per_side, 1))
    ys = np.tile(side[:, None], (1, points_per_side))
    unit = np.stack([xs, ys], axis=-1).reshape(-1, 2)
    return unit * np.array([width, height])[None, :]


def _uncovered(points: np.ndarray, coverage: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """The points whose pixel is not covered (``coverage`` scaled to the photo)."""
    if coverage is None or not len(points):
        return points
    h, w = coverage.shape
    cx = np.clip((points[:, 0] * w / width).astype(int), 0, w - 1)
    cy = np.clip((points[:, 1] * h / height).astype(int), 0, h - 1)
    return points[~coverage[cy, cx]]


def point_components(mask: np.ndarray, cx: int, cy: int) -> np.ndarray:
    """The part of an answer that is about its prompt: the connected components (8-connected)
    of ``mask`` that reach within one cell of the prompt's cell (``cx``, ``cy``).

    A point prompt asks about the thing under the point; other components of the same answer
    (e.g. the other products of SAM's whole-tray mask, or a disconnected same-texture region)
    say nothing about what is there.  The generator's coverage map counts only these
    (:class:`~retailklip.segment.bounded.BoundedOptions` ``cover_at_prompt``; docs/segmentation.md,
    "Third round").

    Args:
        mask: bool (h, w) low-resolution mask.
        cx, cy: the prompt's cell, clipped to the mask.
    Returns:
        bool (h, w); all False when no component reaches the prompt.
    """
    from scipy import ndimage as ndi

    h, w = mask.shape
    cx, cy = min(max(int(cx), 0), w - 1), min(max(int(cy), 0), h - 1)
    window = mask[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2]
    if not window.any():
        return np.zeros_like(mask)
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 1:
        return mask.copy()
    ids = np.unique(labels[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2])
    return np.isin(labels, ids[ids > 0])


@dataclass(frozen=True)
class GridPrompts:
    """SAM's strategy: one round, the whole ``points_per_side`` x ``points_per_side`` grid."""

    points_per_side: int = 32

    def __post_init__(self) -> None:
        if self.points_per_side < 1:
            raise SegmenterOptionError(f"points_per_side must be >= 1, got {self.points_per_side}")

    @property
    def name(self) -> str:
        return f"grid{self.points_per_side}"

    @property
    def max_prompts(self) -> int:
        return self.points_per_side**2

    def start(self, width: int, height: int) -> _GridSession:
        return _GridSession(grid_points(self.points_per_side, width, height))


class _GridSession:
    def __init__(self, points: np.ndarray) -> None:
        self._points: np.ndarray | None = points

    def next_points(self, coverage: np.ndarray | None) -> np.ndarray | None:
        points, self._points = self._points, None
        return points


@dataclass(frozen=True)
class CoarseToFinePrompts:
    """Grids of growing density, each round only at points no accepted mask covers yet, until
    ``max_prompts`` points were used (the finest level's points in a stable pseudo-random order
    when the budget cannot take them all, so a budget cut spreads over the photo).

    Attributes:
        levels: grid sides, coarse to fine (default 8, 16, 32).
        max_prompts: most points decoded per photo (default 128 = 1/8 of SAM's 1024).
    """

    levels: tuple[int, ...] = (8, 16, 32)
    max_prompts: int = 128

    def __post_init__(self) -> None:
        if not self.levels or any(n < 1 for n in self.levels) or self.max_prompts < 1:
            raise SegmenterOptionError(f"levels must be grid sides >= 1 and max_prompts >= 1, got {self.levels}, "
                                       f"{self.max_prompts}")

    @property
    def name(self) -> str:
        return f"coarse-to-fine{'-'.join(map(str, self.levels))}:{self.max_prompts}"

    def start(self, width: int, height: int) -> _CoarseToFineSession:
        return _CoarseToFineSession(self, width, height)


class _CoarseToFineSession:
    def __init__(self, strategy: CoarseToFinePrompts, width: int, height: int) -> None:
        self.s, self.width, self.height = strategy, width, height
        self.level = 0
        self.used = 0
        self.seen: set[tuple[int, int]] = set()

    def next_points(self, coverage: np.ndarray | None) -> np.ndarray | None:
        while self.level < len(self.s.levels) and self.used < self.s.max_prompts:
            pts = grid_points(self.s.levels[self.level], self.width, self.height)
            self.level += 1
            key = np.round(pts).astype(int)
            fresh = np.array([tuple(k) not in self.seen for k in key.tolist()], bool)
            pts = _uncovered(pts[fresh], coverage, self.width, self.height)
            if not len(pts):
                continue
            room = self.s.max_prompts - self.used
            if len(pts) > room:
                order = np.random.default_rng(len(pts)).permutation(len(pts))[:room]
                pts = pts[np.sort(order)]
            self.seen.update(map(tuple, np.round(pts).astype(int).tolist()))
            self.used += len(pts)
            return pts
        return None


@dataclass(frozen=True)
class FarthestPointPrompts:
    """A coarse grid, then rounds of farthest-point sampling (Eldar et al. 1997) over the
    uncovered area: each new point is the candidate farthest from every point decoded so far,
    candidates on covered pixels counting only ``covered_weight`` of their distance, so the
    budget goes where no accepted mask is yet and, once the uncovered area is prompted densely
    enough, spreads over covered places too (an accepted mask can be wrong: a merge of several
    objects covers objects that were never found).

    Candidates are the cell centres of a ``candidates`` x ``candidates`` grid (SAM's 32 x 32 by
    default); distances are in pixels of the photo normalised by its longer side.

    Attributes:
        first: side of the first round's grid (default 6: 36 points).
        batch: points per later round (default 16; coverage is updated between rounds).
        max_prompts: most points decoded per photo (default 128 = 1/8 of SAM's 1024).
        candidates: side of the candidate grid (default 32).
        covered_weight: distance factor of covered candidates, in [0, 1] (default 0.5; 0 never
            prompts covered pixels again).
        stop_covered: stop once every candidate is covered (default False: spend the budget).
    """

    first: int = 6
    batch: int = 16
    max_prompts: int = 128
    candidates: int = 32
    covered_weight: float = 0.5
    stop_covered: bool = False

    def __post_init__(self) -> None:
        if min(self.first, self.batch, self.max_prompts, self.candidates) < 1 or not 0 <= self.covered_weight <= 1:
            raise SegmenterOptionError(
                f"first, batch, max_prompts and candidates must be >= 1 and covered_weight in [0, 1], got "
                f"{self.first}, {self.batch}, {self.max_prompts}, {self.candidates}, {self.covered_weight}")

    @property
    def name(self) -> str:
        stop = ",stop" if self.stop_covered else ""
        return f"farthest{self.first}+{self.batch}:{self.max_prompts}(w={self.covered_weight:g}{stop})"

    def start(self, width: int, height: int) -> _FarthestSession:
        return _FarthestSession(self, width, height)


class _FarthestSession:
    def __init__(self, strategy: FarthestPointPrompts, width: int, height: int) -> None:
        self.s, self.width, self.height = strategy, width, height
        self.cand = grid_points(strategy.candidates, width, height).astype(np.float64)
        self.scale = 1.0 / max(width, height)
        self.dist = np.full(len(self.cand), np.inf)  # normalised distance to the nearest decoded point
        self.used = 0

    def _mark(self, points: np.ndarray) -> None:
        d = np.sqrt(((self.cand[:, None, :] - points[None, :, :]) ** 2).sum(-1)).min(1) * self.scale
        self.dist = np.minimum(self.dist, d)
        self.used += len(points)

    def _weights(self, covered: np.ndarray) -> np.ndarray:
        """Distance factor of each candidate (``covered``: bool per candidate)."""
        return np.where(covered, self.s.covered_weight, 1.0)

    def next_points(self, coverage: np.ndarray | None) -> np.ndarray | None:
        if self.used >= self.s.max_prompts:
            return None
        if self.used == 0:
            pts = grid_points(self.s.first, self.width, self.height)[: self.s.max_prompts].astype(np.float64)
            self._mark(pts)
            return pts
        if coverage is None:  # a generator without a coverage map (exact mode): nothing covered
            coverage = np.zeros((1, 1), bool)
        h, w = coverage.shape
        cx = np.clip((self.cand[:, 0] * w / self.width).astype(int), 0, w - 1)
        cy = np.clip((self.cand[:, 1] * h / self.height).astype(int), 0, h - 1)
        covered = coverage[cy, cx]
        if self.s.stop_covered and covered.all():
            return None
        weight = self._weights(covered)
        picked = []
        for _ in range(min(self.s.batch, self.s.max_prompts - self.used)):
            priority = self.dist * weight
            i = int(np.argmax(priority))
            if priority[i] <= 0:
                break
            picked.append(self.cand[i])
            self._mark(self.cand[i][None])
        return np.array(picked, np.float64) if picked else None


@dataclass(frozen=True)
class RetryPrompts:
    """:class:`FarthestPointPrompts` that re-prompts where the decoder saw something small but
    every answer was rejected.

    Diagnosis (docs/segmentation.md, 50 simulated trays): most objects the 32 x 32 grid finds and
    ``farthest8+16:128`` misses are small objects that *were* prompted 1-3 times, but each
    prompt was answered with a part (or the object with a predicted IoU just under the
    threshold), so nothing was accepted, their pixels stay uncovered and farthest-point sampling,
    which has a decoded point right there, does not come back.  The grid hits such an object
    4-6 times.  This strategy reads each decoded batch (the generator's ``feedback``: points,
    low-resolution logits, which of the 3 outputs passed the filters); for a prompt none of
    whose outputs passed, it takes the largest rejected output mask that is *compact*
    (``retry_min_cells`` .. ``retry_max_area`` of the photo: a part of a small object, not a
    background region) and queues one new prompt at that mask's interior point farthest from
    its edge and from every decoded point (a distance-transform maximum, as RITM, Sofiiuk et
    al. 2022, places its corrective clicks in the error region; SAM's interactive training
    samples them from the error region too).  A retry that fails again may retry again, up to
    ``retries`` generations.
    Queued retries whose pixel is covered by then are dropped; they go first in each round, the
    rest of the round is farthest-point samples as in :class:`FarthestPointPrompts`.  The hard
    bound ``max_prompts`` covers retries too.  Farthest-point samples also prefer places no
    decoded output mask has explained yet (``explored_weight``), and a prompt whose only
    accepted output is a part of a larger rejected compact mask is retried too
    (``retry_partial``); both chosen on simulated trays (docs/segmentation.md).  Third round
    (docs/segmentation.md): uncovered places inside a rejected compact answer rank as unexplored
    (``suspect_weight``) and a retry may be retried up to 4 generations: small objects whose
    answers were parts get more draws, as the grid's 4-10 prompts on them give it.  Uses only
    what the product has: the decoder's outputs and the generator's filters (no ground truth).

    Attributes:
        first, batch, max_prompts, candidates, covered_weight: as :class:`FarthestPointPrompts`
            (defaults 8, 16, 128, 64, 0.25; a 64 x 64 candidate grid places points more finely).
        retries: generations of retries per original prompt (default 4; 0 = FarthestPointPrompts).
        retry_max_area: largest rejected mask retried, as a fraction of the photo's area (0.02).
        retry_min_cells: smallest rejected mask retried, low-resolution cells (default 16).
        retry_share: most of a round's ``batch`` given to retries, in [0, 1] (default 1).
        retry_partial: also retry a prompt some output of which passed, when a rejected compact
            output is larger than 1.5 x every passed one (only a part of the object, a label or a
            stem, was accepted; the object itself scored just under the threshold).
        explored_weight: distance factor, in [0, 1], of uncovered candidates that some decoded
            output mask (accepted or not, at most ``explore_max_area`` of the photo) already
            contains: the decoder has answered about that place (a background blob, a rejected
            part), while pixels outside every answer (e.g. a small object between two background
            blobs) were never explained by any mask.  1 = off (covered candidates keep
            ``covered_weight``).
        explore_max_area: largest output mask counted as explored, fraction of the photo (0.1;
            larger masks such as the whole tray would mark everything explored).
        suspect_weight: distance factor, in [0, 2], of uncovered candidates inside some rejected
            compact output (a retry-sized mask, ``retry_min_cells`` .. ``retry_max_area``): the
            decoder saw something small there that no accepted mask explains yet, so such a place
            ranks as never explored (default 1.0) rather than as explored; ``None`` = off (the
            second round's behaviour).
    """

    first: int = 8
    batch: int = 16
    max_prompts: int = 128
    candidates: int = 64
    covered_weight: float = 0.25
    retries: int = 4
    retry_max_area: float = 0.02
    retry_min_cells: int = 16
    retry_share: float = 1.0
    retry_partial: bool = True
    explored_weight: float = 0.5
    explore_max_area: float = 0.1
    suspect_weight: float | None = 1.0

    def __post_init__(self) -> None:
        FarthestPointPrompts(self.first, self.batch, self.max_prompts, self.candidates, self.covered_weight)
        if self.retries < 0 or not 0 < self.retry_max_area <= 1 or self.retry_min_cells < 1 \
                or not 0 <= self.retry_share <= 1 or not 0 <= self.explored_weight <= 1 \
                or not 0 < self.explore_max_area <= 1 \
                or (self.suspect_weight is not None and not 0 <= self.suspect_weight <= 2):
            raise SegmenterOptionError(
                f"retries must be >= 0, retry_max_area and explore_max_area in (0, 1], retry_min_cells >= 1, "
                f"retry_share and explored_weight in [0, 1], suspect_weight None or in [0, 2], got {self.retries}, "
                f"{self.retry_max_area}, {self.explore_max_area}, {self.retry_min_cells}, {self.retry_share}, "
                f"{self.explored_weight}, {self.suspect_weight}")

    @property
    def name(self) -> str:
        extra = "" if self.retry_share == 1 else f",share={self.retry_share:g}"
        extra += ",partial" if self.retry_partial else ""
        extra += f",c={self.candidates}" if self.candidates != 32 else ""
        extra += f",x={self.explored_weight:g}/{self.explore_max_area:g}" if self.explored_weight != 1 else ""
        extra += f",s={self.suspect_weight:g}" if self.suspect_weight is not None else ""
        return (f"retry{self.first}+{self.batch}:{self.max_prompts}(w={self.covered_weight:g},r={self.retries},"
                f"a={self.retry_max_area:g}{extra})")

    def start(self, width: int, height: int) -> _RetrySession:
        return _RetrySession(self, width, height)


class _RetrySession(_FarthestSession):
    def __init__(self, strategy: RetryPrompts, width: int, height: int) -> None:
        farthest = FarthestPointPrompts(strategy.first, strategy.batch, strategy.max_prompts, strategy.candidates,
                                        strategy.covered_weight)
        super().__init__(farthest, width, height)
        self.r = strategy
        self.queue: list[tuple[float, float, int]] = []  # (x, y, generation)
        self.decoded: list[np.ndarray] = []
        self.generation: dict[tuple[int, int], int] = {}
        self.explored: np.ndarray | None = None  # low-res cells inside some decoded (non-huge) output mask
        self.suspect: np.ndarray | None = None  # low-res cells inside some rejected compact output

    def _weights(self, covered: np.ndarray) -> np.ndarray:
        weight = super()._weights(covered)
        for cells, factor in ((self.explored, self.r.explored_weight), (self.suspect, self.r.suspect_weight)):
            if cells is None or factor is None:
                continue
            h, w = cells.shape
            inside = cells[np.clip((self.cand[:, 1] * h / self.height).astype(int), 0, h - 1),
                           np.clip((self.cand[:, 0] * w / self.width).astype(int), 0, w - 1)]
            weight = np.where(~covered & inside, factor, weight)  # a suspect place outranks an explored one
        return weight

    def _key(self, x: float, y: float) -> tuple[int, int]:
        return int(np.floor(x)), int(np.floor(y))

    def feedback(self, points: np.ndarray, logits: Any, passed: Any) -> None:
        """One decoded batch: ``points`` float64 (n, 2) photo pixels, ``logits`` (n, 3, h, w)
        low-resolution logits (> 0 = mask), ``passed`` bool (n, 3) outputs that passed the
        predicted-IoU and stability filters."""
        from scipy import ndimage as ndi

        points = np.asarray(points, np.float64)
        self.decoded.append(points)
        masks = np.asarray(logits) > 0.0
        accepted = np.asarray(passed, bool)
        ok = accepted.any(1)
        n, _, h, w = masks.shape
        sx, sy = w / self.width, h / self.height
        if self.r.explored_weight != 1.0 and n:
            small = masks.reshape(n, 3, -1).sum(-1) <= self.r.explore_max_area * h * w
            seen = (masks & small[:, :, None, None]).any((0, 1))
            self.explored = seen if self.explored is None else self.explored | seen
        if self.r.suspect_weight is not None and n:
            area = masks.reshape(n, 3, -1).sum(-1)
            compact = (area >= self.r.retry_min_cells) & (area <= self.r.retry_max_area * h * w) & ~accepted
            seen = (masks & compact[:, :, None, None]).any((0, 1))
            self.suspect = seen if self.suspect is None else self.suspect | seen
        for i in range(n):
            gen = self.generation.get(self._key(*points[i]), 0)
            if gen >= self.r.retries or (ok[i] and not self.r.retry_partial):
                continue
            area = masks[i].reshape(3, -1).sum(1)
            fits = (area >= self.r.retry_min_cells) & (area <= self.r.retry_max_area * h * w) & ~accepted[i]
            if ok[i]:  # a part passed: retry only a rejected compact mask larger than every passed one
                fits &= area > 1.5 * area[accepted[i]].max()
            if not fits.any():
                continue
            j = int(np.argmax(np.where(fits, area, -1)))
            decoded = np.concatenate(self.decoded + [np.array([[x, y] for x, y, _ in self.queue]).reshape(-1, 2)])
            free = np.ones((h, w), bool)
            free[np.clip((decoded[:, 1] * sy).astype(int), 0, h - 1), np.clip((decoded[:, 0] * sx).astype(int), 0, w - 1)] = False
            depth = np.minimum(ndi.distance_transform_edt(masks[i, j]), ndi.distance_transform_edt(free))
            cy, cx = np.unravel_index(int(np.argmax(depth)), depth.shape)
            if depth[cy, cx] < 1.5:  # no room inside the mask away from decoded points
                continue
            x, y = (cx + 0.5) / sx, (cy + 0.5) / sy
            self.queue.append((x, y, gen + 1))

    def next_points(self, coverage: np.ndarray | None) -> np.ndarray | None:
        if self.used >= self.s.max_prompts or self.used == 0 or coverage is None:
            return super().next_points(coverage)
        h, w = coverage.shape
        room = min(self.s.batch, self.s.max_prompts - self.used)
        retry = []
        keep = []
        for x, y, gen in self.queue:
            if coverage[min(int(y * h / self.height), h - 1), min(int(x * w / self.width), w - 1)]:
                continue
            (retry if len(retry) < int(self.r.retry_share * room) else keep).append((x, y, gen))
        self.queue = keep
        picked = np.array([[x, y] for x, y, _ in retry], np.float64).reshape(-1, 2)
        for x, y, gen in retry:
            self.generation[self._key(x, y)] = gen
        if len(picked):
            self._mark(picked)
        rest = room - len(picked)
        if rest <= 0:
            return picked
        batch, self.s = self.s, dataclass_replace(self.s, batch=rest)
        try:
            more = super().next_points(coverage)
        finally:
            self.s = batch
        if more is None:
            return picked if len(picked) else None
        return np.concatenate([picked, more]) if len(picked) else more
