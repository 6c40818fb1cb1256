"""An oracle mask decoder: SAM's mask decoder played from a synthetic tray's ground truth.

Prompt strategies cannot be compared with random SAM weights (their masks are noise), and no
trained weights can be obtained here.  :class:`OracleDecoder` implements the
:class:`~retailklip.segment.bounded.PromptDecoder` protocol for a
:class:`~retailklip.segment.synthetic.Tray`: each point prompt is answered with SAM's three
multimask outputs (Kirillov et al. 2023, §3: whole / part / subpart) as low-resolution logits,
built from the ground truth plus SAM's known failure modes at stated rates
(:class:`OracleRates`).

The tray's masks are fixed once (seeded): each object's visible mask; its **parts** (the
cells of a fine and a coarse Voronoi partition of the object, 4 and 2 cells: a label, a stem,
one half); the background's **blobs** (cells of a 16- and a 4-cell partition of the
background) and **regions** (its connected components); the **whole tray** (union of all
objects).  A point always gets masks of the thing under it, so points in the same place get the
same masks (NMS removes the duplicates, as with SAM):

* point on object o (topmost visible): output 0 = o's fine part under the point; output 1 = o's
  mask with probability ``object_interior`` (the point at least ``edge_depth`` x o's equivalent
  radius inside o) or ``object_edge`` (nearer its edge), else o's coarse part; output 2 = the
  whole tray with probability ``tray_on_object``, else the same as output 1;
* point on background: output 0 = the fine blob under it; output 1 = its background region
  with probability ``background_region``, else the coarse blob; output 2 = the whole tray with
  probability ``tray_on_background``, else the coarse blob.

Predicted IoU: each fixed mask has a base score drawn once from a normal (mean, sd) per kind
(object 0.93 / 0.03, part 0.80 / 0.06, background 0.84 / 0.06, tray 0.86 / 0.05), each
answer adds N(0, ``score_noise`` = 0.04), clipped to [0, 1]: correct masks tend to score higher,
parts, blobs and the tray pass SAM's 0.88 threshold at stated rates, and a correct mask that
scores low from one point may pass from another (so more prompts on an object help).

Logits: ``amplitude * (2 g - 1)`` where ``g`` is the mask's area fraction per low-resolution
cell blurred by a Gaussian of ``edge_sigma`` cells: +-20 inside / outside, a soft ramp at the
edge, so SAM's stability score (logit thresholds +-1) is about 1 - 0.125 x perimeter / area (cells)
and small or ragged masks fail the 0.95 stability threshold as SAM's do.

Deterministic: the answer to a point depends only on (seed, the point's pixel), not on the
batch or the order of prompts, so strategies are compared on the same answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi

from .errors import SegmenterOptionError
from .synthetic import Tray

#: Side of SAM's low-resolution mask frame and of its prompt frame, pixels.
LOW_RES, FRAME = 256, 1024


@dataclass(frozen=True)
class OracleRates:
    """Failure rates and score distributions of :class:`OracleDecoder` (module docstring).

    Probabilities are per prompt.  ``*_iou`` are (mean, sd) of the normal distribution of the
    predicted IoU of that kind of output (clipped to [0, 1]).
    """

    object_interior: float = 0.85
    object_edge: float = 0.5
    edge_depth: float = 0.2
    tray_on_object: float = 0.1
    background_region: float = 0.6
    tray_on_background: float = 0.1
    object_iou: tuple[float, float] = (0.93, 0.03)
    part_iou: tuple[float, float] = (0.80, 0.06)
    background_iou: tuple[float, float] = (0.84, 0.06)
    tray_iou: tuple[float, float] = (0.86, 0.05)
    object_parts: tuple[int, int] = (4, 2)
    background_cells: tuple[int, int] = (16, 4)
    score_noise: float = 0.04
    amplitude: float = 20.0
    edge_sigma: float = 1.0

    def __post_init__(self) -> None:
        probs = (self.object_interior, self.object_edge, self.edge_depth, self.tray_on_object,
                 self.background_region, self.tray_on_background)
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise SegmenterOptionError(f"oracle probabilities must be in [0, 1], got {probs}")
        if self.amplitude <= 1.0 or self.edge_sigma <= 0:
            raise SegmenterOptionError("amplitude must be > 1 (SAM's stability offset) and edge_sigma > 0")


def low_res_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of the valid low-resolution logits of a (height, width) photo: SAM resizes the long
    side to 1024 (``ResizeLongestSide``), its decoder answers at 1/4 of that frame."""
    scale = FRAME / max(height, width)
    input_h, input_w = int(height * scale + 0.5), int(width * scale + 0.5)
    return math.ceil(input_h * LOW_RES / FRAME), math.ceil(input_w * LOW_RES / FRAME)


class OracleDecoder:
    """:class:`~retailklip.segment.bounded.PromptDecoder` of a synthetic tray (module docstring).

    Args:
        tray: the tray (its ``labels`` are the ground truth).
        rates: :class:`OracleRates`.
        seed: answers are a function of (seed, point pixel).
    Attributes:
        image_size: (H, W) photo pixels; low_res_size: (h, w) low-resolution cells.
        object_ids: index (as :meth:`answer_ids` returns them) of object k's visible mask.
    """

    def __init__(self, tray: Tray, rates: OracleRates | None = None, seed: int = 0) -> None:
        r = self.rates = rates or OracleRates()
        self.seed = seed
        self.labels = tray.labels
        H, W = tray.labels.shape
        self.image_size = (H, W)
        self.low_res_size = h, w = low_res_size(H, W)
        k = len(tray.skus)
        rng = np.random.default_rng([seed, 1])
        # area fraction of each object per low-resolution cell, index 0 = background: (k + 1, h, w)
        self._frac = np.stack([_cell_fraction(tray.labels == i, (w, h)) for i in range(k + 1)])
        cell_label = self._frac.argmax(0)
        self._depth = ndi.distance_transform_edt(cell_label > 0)
        self._radius = np.sqrt(np.maximum(self._frac.reshape(k + 1, -1).sum(1), 1.0) / math.pi)
        # fixed masks: (logits, base predicted IoU); per prompt only the choice and a little noise vary
        self._masks: list[tuple[np.ndarray, float]] = []
        self._tray = self._add(1.0 - self._frac[0], r.tray_iou, rng)
        self.object_ids = [self._add(self._frac[i], r.object_iou, rng) for i in range(1, k + 1)]
        # parts: Voronoi cells of random seeds inside the object (a fine and a coarse partition)
        self._parts: dict[tuple[int, int], np.ndarray] = {}
        self._part_id: dict[tuple[int, int, int], int] = {}
        for i in range(k + 1):
            for level, n in enumerate(r.background_cells if i == 0 else r.object_parts):
                cells = _voronoi(cell_label == i, n, rng)
                self._parts[i, level] = cells
                for c in np.unique(cells[cells >= 0]):
                    kind = r.background_iou if i == 0 else r.part_iou
                    self._part_id[i, level, int(c)] = self._add(self._frac[i] * (cells == c), kind, rng)
        comps, n_comp = ndi.label(cell_label == 0)
        self._bg_comp = comps
        self._region = [-1] + [self._add(self._frac[0] * (comps == c), r.background_iou, rng)
                               for c in range(1, n_comp + 1)]
        self.mask_threshold = 0.0

    def _add(self, fraction: np.ndarray, kind: tuple[float, float], rng: np.random.Generator) -> int:
        self._masks.append((_soft(fraction, self.rates), float(rng.normal(*kind))))
        return len(self._masks) - 1

    def _cell(self, x: float, y: float) -> tuple[int, int]:
        H, W = self.image_size
        h, w = self.low_res_size
        return min(max(int(y * h / H), 0), h - 1), min(max(int(x * w / W), 0), w - 1)

    def _part(self, obj: int, level: int, cy: int, cx: int) -> int:
        """The part (fine: level 0, coarse: level 1) of ``obj`` under cell (cy, cx)."""
        cells = self._parts[obj, level]
        c = int(cells[cy, cx])
        if c < 0:  # the cell is mostly another object's: the nearest part of obj
            ys, xs = np.nonzero(cells >= 0)
            if not len(ys):
                return self.object_ids[obj - 1] if obj else self._tray
            j = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
            c = int(cells[ys[j], xs[j]])
        return self._part_id[obj, level, c]

    def answer_ids(self, x: float, y: float) -> list[int]:
        """The three fixed masks (indices) answered for point (x, y) photo pixels."""
        r = self.rates
        px, py = math.floor(x), math.floor(y)
        rng = np.random.default_rng([self.seed, px, py])
        H, W = self.image_size
        obj = int(self.labels[min(max(py, 0), H - 1), min(max(px, 0), W - 1)])
        cy, cx = self._cell(x, y)
        if obj > 0:
            deep = self._depth[cy, cx] >= r.edge_depth * self._radius[obj]
            found = rng.random() < (r.object_interior if deep else r.object_edge)
            tray = rng.random() < r.tray_on_object
            middle = self.object_ids[obj - 1] if found else self._part(obj, 1, cy, cx)
            last = self._tray if tray else (self.object_ids[obj - 1] if found else self._part(obj, 1, cy, cx))
            return [self._part(obj, 0, cy, cx), middle, last]
        region = rng.random() < r.background_region
        tray = rng.random() < r.tray_on_background
        comp = int(self._bg_comp[cy, cx])
        middle = self._region[comp] if region and comp > 0 else self._part(0, 1, cy, cx)
        return [self._part(0, 0, cy, cx), middle, self._tray if tray else self._part(0, 1, cy, cx)]

    def answer(self, x: float, y: float) -> tuple[np.ndarray, np.ndarray]:
        """One point (photo pixels) -> (logits float32 (3, h, w), predicted IoU float32 (3,)):
        the fixed masks of :meth:`answer_ids`, each mask's base score + N(0, ``score_noise``)."""
        ids = self.answer_ids(x, y)
        rng = np.random.default_rng([self.seed, 2, math.floor(x), math.floor(y)])
        scores = [self._masks[i][1] + rng.normal(0.0, self.rates.score_noise) for i in ids]
        return (np.stack([self._masks[i][0] for i in ids]),
                np.clip(np.array(scores, np.float32), 0.0, 1.0))

    def decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 2) ``(x, y)`` photo pixels -> (logits float32 (n, 3, h, w), predicted IoU float32 (n, 3))."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        answers = [self.answer(float(x), float(y)) for x, y in pts]
        h, w = self.low_res_size
        if not answers:
            return torch.zeros(0, 3, h, w), torch.zeros(0, 3)
        return (torch.from_numpy(np.stack([a[0] for a in answers])),
                torch.from_numpy(np.stack([a[1] for a in answers])))

    def upsample(self, logits: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        """(h, w) logits -> bool (y1 - y0, x1 - x0) photo mask inside ``box`` = (x0, y0, x1, y1):
        bilinear (pixel centres, ``align_corners=False``) and > 0."""
        H, W = self.image_size
        x0, y0, x1, y1 = box
        gx = (torch.arange(x0, x1, dtype=torch.float32) + 0.5) / W * 2 - 1
        gy = (torch.arange(y0, y1, dtype=torch.float32) + 0.5) / H * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
        up = torch.nn.functional.grid_sample(logits[None, None].float(), grid, mode="bilinear",
                                             padding_mode="border", align_corners=False)
        return up[0, 0] > self.mask_threshold


def _cell_fraction(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 (h, w) area fraction of ``mask`` per cell, ``size`` = (w, h) (box filter)."""
    img = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(img.resize(size, Image.BOX), np.float32)


def _voronoi(region: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """int (h, w): the Voronoi cell (0 .. n - 1) of each cell of ``region``, -1 outside; the
    ``n`` seeds are a random cell of the region and then, one by one, the region's cell farthest
    from the seeds so far (so the parts have comparable sizes)."""
    ys, xs = np.nonzero(region)
    out = np.full(region.shape, -1, np.int64)
    if not len(ys):
        return out
    seeds = [int(rng.integers(len(ys)))]
    d = (ys - ys[seeds[0]]) ** 2 + (xs - xs[seeds[0]]) ** 2
    for _ in range(min(n, len(ys)) - 1):
        seeds.append(int(d.argmax()))
        d = np.minimum(d, (ys - ys[seeds[-1]]) ** 2 + (xs - xs[seeds[-1]]) ** 2)
    dist = (ys[:, None] - ys[seeds][None]) ** 2 + (xs[:, None] - xs[seeds][None]) ** 2
    out[ys, xs] = dist.argmin(1)
    return out


def _soft(fraction: np.ndarray, rates: OracleRates) -> np.ndarray:
    """Logits of a soft mask: ``amplitude * (2 g - 1)``, g = fraction blurred by ``edge_sigma``."""
    g = ndi.gaussian_filter(np.asarray(fraction, np.float32), rates.edge_sigma, mode="nearest")
    return (rates.amplitude * (2.0 * g - 1.0)).astype(np.float32)
