"""Prompt strategies (retailklip.segment.prompts): budgets, coverage, and recall through the
bounded generator on a simulated tray (retailklip.segment.oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retailklip.segment.automatic import MaskGeneratorOptions
from retailklip.segment.bounded import BoundedMaskGenerator, BoundedOptions, _coverage
from retailklip.segment.errors import SegmenterOptionError
from retailklip.segment.oracle import OracleDecoder, OracleRates
from retailklip.segment.prompts import (
    CoarseToFinePrompts,
    FarthestPointPrompts,
    GridPrompts,
    RetryPrompts,
    grid_points,
    point_components,
)
from retailklip.segment.synthetic import TrayMaker


def _run(strategy, coverages) -> list[np.ndarray]:
    session = strategy.start(640, 480)
    rounds, coverage = [], None
    while (pts := session.next_points(coverage)) is not None:
        rounds.append(pts)
        coverage = coverages(len(rounds))
    return rounds


def test_farthest_first_round_is_the_coarse_grid_and_the_budget_holds():
    s = FarthestPointPrompts(first=6, batch=16, max_prompts=100)
    rounds = _run(s, lambda i: np.zeros((120, 160), bool))
    assert np.array_equal(rounds[0], grid_points(6, 640, 480))
    assert [len(r) for r in rounds] == [36, 16, 16, 16, 16]
    pts = np.concatenate(rounds)
    assert len(np.unique(np.round(pts, 3), axis=0)) == 100  # never the same point twice
    assert pts.dtype == np.float64 and (pts[:, 0] < 640).all() and (pts[:, 1] < 480).all()


@pytest.mark.parametrize("strategy", [FarthestPointPrompts(first=6, batch=16, max_prompts=100),
                                      RetryPrompts(first=6, batch=16, max_prompts=100)])
def test_without_a_coverage_map_the_rounds_are_fresh_points(strategy):
    """A generator that never passes a coverage map (exact mode): the first grid once, then
    farthest points, never a point twice (it used to resend the first grid every round)."""
    rounds = _run(strategy, lambda i: None)
    assert [len(r) for r in rounds] == [36, 16, 16, 16, 16]
    assert len(np.unique(np.round(np.concatenate(rounds), 3), axis=0)) == 100


def test_farthest_goes_to_uncovered_pixels_first():
    left = np.zeros((120, 160), bool)
    left[:, :80] = True  # the left half is covered
    s = FarthestPointPrompts(first=4, batch=16, max_prompts=200, covered_weight=0.25)
    rounds = _run(s, lambda i: left)
    assert (rounds[1][:, 0] >= 320).all()
    later = np.concatenate(rounds[1:])
    assert (later[:, 0] >= 320).mean() > 0.7 and (later[:, 0] < 320).any()  # covered places get some too
    never = _run(FarthestPointPrompts(first=4, max_prompts=64, covered_weight=0.0), lambda i: left)
    assert (np.concatenate(never[1:])[:, 0] >= 320).all()


def test_farthest_stops_when_everything_is_covered():
    full = lambda i: np.ones((120, 160), bool)
    assert [len(r) for r in _run(FarthestPointPrompts(first=6, stop_covered=True), full)] == [36]
    assert [len(r) for r in _run(FarthestPointPrompts(first=6, covered_weight=0.0), full)] == [36]
    assert sum(len(r) for r in _run(FarthestPointPrompts(first=6, covered_weight=0.5), full)) == 128


@pytest.mark.parametrize("bad", [{"first": 0}, {"batch": 0}, {"max_prompts": 0}, {"candidates": 0},
                                 {"covered_weight": 1.5}, {"covered_weight": -0.1}])
def test_bad_farthest_options_are_refused(bad):
    with pytest.raises(SegmenterOptionError):
        FarthestPointPrompts(**bad)


def _recall(tray, records) -> float:
    n = len(tray.skus)
    area = np.bincount(tray.labels.ravel(), minlength=n + 1)[1:]
    best = np.zeros(n)
    for r in records:
        inter = np.bincount(tray.labels[r["segmentation"]], minlength=n + 1)[1:]
        best = np.maximum(best, inter / (area + r["area"] - inter))
    return float((best >= 0.5).mean())


def test_strategies_find_the_objects_of_a_simulated_tray(grocery_store):
    """Through the bounded generator (SAM's thresholds): with a perfect oracle every strategy
    finds (nearly) every object; with SAM's failure modes more prompts find more."""
    maker = TrayMaker(grocery_store)
    tray = maker.make(11, (768, 576))
    perfect = OracleRates(object_interior=1.0, object_edge=1.0, tray_on_object=0.0, tray_on_background=0.0,
                          object_iou=(0.97, 0.005), score_noise=0.005)
    sims = {}
    for rates_name, rates in (("perfect", perfect), ("default", OracleRates())):
        decoder = OracleDecoder(tray, rates, seed=11)
        for s in (GridPrompts(4), GridPrompts(32), CoarseToFinePrompts(), FarthestPointPrompts()):
            gen = BoundedMaskGenerator(BoundedOptions(), s)
            sims[rates_name, s.name] = (_recall(tray, gen.generate(decoder)), gen.prompts_used)
    assert sims["perfect", "grid32"][0] >= 0.9
    assert sims["perfect", FarthestPointPrompts().name][0] >= 0.9
    assert sims["default", "grid32"][0] > sims["default", "grid4"][0]
    assert sims["default", FarthestPointPrompts().name][1] == 128
    assert sims["default", CoarseToFinePrompts().name][1] <= 128


def _retry_rounds(strategy, answer, coverage, width=640, height=480, h=120, w=160):
    """Rounds of a RetryPrompts session fed by ``answer(points) -> (logits (n, 3, h, w), passed (n, 3))``."""
    session = strategy.start(width, height)
    rounds, cov = [], None
    while (pts := session.next_points(cov)) is not None:
        rounds.append(pts)
        session.feedback(pts, *answer(pts))
        cov = coverage
    return rounds


def _small_object_answer(h=120, w=160, width=640, height=480):
    """Every answer rejected; a prompt inside the 14 x 14-cell square at cells (30..44, 62..76)
    gets that square (a small object's rejected mask) as output 1, others a huge mask."""
    square = np.zeros((h, w), bool)
    square[30:44, 62:76] = True

    def answer(pts):
        n = len(pts)
        logits = np.full((n, 3, h, w), 20.0, np.float32)  # everything: too large to retry
        cx, cy = (pts[:, 0] * w / width).astype(int), (pts[:, 1] * h / height).astype(int)
        inside = square[np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)]
        logits[inside, 1] = np.where(square, 20.0, -20.0)
        return logits, np.zeros((n, 3), bool)
    return answer, square


def test_retry_reprompts_inside_a_rejected_small_mask_first():
    answer, square = _small_object_answer()
    s = RetryPrompts(first=8, batch=16, max_prompts=128, retries=2)
    rounds = _retry_rounds(s, answer, np.zeros((120, 160), bool))
    first_hits = [p for p in rounds[0] if square[int(p[1] * 120 / 480), int(p[0] * 160 / 640)]]
    assert len(first_hits) == 1  # the 8 x 8 grid hits the small object once
    cells = lambda r: [square[int(y * 120 / 480), int(x * 160 / 640)] for x, y in r]
    assert cells(rounds[1])[0] and cells(rounds[2])[0]  # a retry inside it opens the next 2 rounds
    assert sum(cells(np.concatenate(rounds[1:]))) >= 2  # ... at 2 generations, then no more
    pts = np.concatenate(rounds)
    assert len(pts) == 128 and len(np.unique(np.round(pts, 3), axis=0)) == 128
    again = _retry_rounds(s, answer, np.zeros((120, 160), bool))
    assert all(np.array_equal(a, b) for a, b in zip(rounds, again))  # deterministic


def test_retry_skips_covered_retries_and_holds_the_budget_when_nothing_is_accepted():
    answer, square = _small_object_answer()
    covered = np.zeros((120, 160), bool)
    covered[square] = True  # an accepted mask covers the small object by the next round
    rounds = _retry_rounds(RetryPrompts(first=8, retries=2), answer, covered)
    later = np.concatenate(rounds[1:])
    assert not any(square[int(y * 120 / 480), int(x * 160 / 640)] for x, y in later)
    # nothing accepted, nothing compact (random weights, an empty tray): plain farthest points to the cap
    def nothing(pts):
        return np.full((len(pts), 3, 120, 160), 20.0, np.float32), np.zeros((len(pts), 3), bool)
    rounds = _retry_rounds(RetryPrompts(), nothing, np.zeros((120, 160), bool))
    plain = _run(FarthestPointPrompts(8, 16, 128, candidates=64, covered_weight=0.25), lambda i: np.zeros((120, 160), bool))
    assert sum(map(len, rounds)) == 128 and all(np.array_equal(a, b) for a, b in zip(rounds, plain))
    with pytest.raises(SegmenterOptionError):
        RetryPrompts(retries=-1)


def _cell_of(pts, grid, width=640, height=480):
    h, w = grid.shape
    return grid[np.clip((pts[:, 1] * h / height).astype(int), 0, h - 1), np.clip((pts[:, 0] * w / width).astype(int), 0, w - 1)]


def test_retry_partial_reprompts_when_only_a_part_passed():
    """A prompt inside the small object gets a 4 x 4-cell part that passes and the object's
    14 x 14-cell mask that is rejected: with ``retry_partial`` the next round opens with a
    re-prompt inside the object, without it the object is not prompted again."""
    inner, square = _small_object_answer()
    part = np.zeros((120, 160), bool)
    part[36:40, 67:71] = True

    def answer(pts):
        logits, passed = inner(pts)
        inside = _cell_of(pts, square)
        logits[inside, 0] = np.where(part, 20.0, -20.0)
        passed[inside, 0] = True
        return logits, passed

    none = np.zeros((120, 160), bool)
    on = _retry_rounds(RetryPrompts(retry_partial=True), answer, none)
    off = _retry_rounds(RetryPrompts(retry_partial=False), answer, none)
    assert _cell_of(on[0], square).sum() == 1 and _cell_of(off[0], square).sum() == 1
    assert _cell_of(on[1], square)[0] and _cell_of(on[1][:1], part).sum() == 0  # inside the object, off the part
    assert not _cell_of(off[1], square).any()


def test_explored_places_are_prompted_after_unexplored_ones():
    """Prompts in the left half are answered with the left half (rejected, 50 % of the photo);
    prompts in the right half with the whole photo (too large to count as explored).  At a small
    ``explored_weight`` the next round goes to the right half only; at 1 (off) it does not."""
    left = np.zeros((120, 160), bool)
    left[:, :80] = True

    def answer(pts):
        n = len(pts)
        logits = np.full((n, 3, 120, 160), 20.0, np.float32)
        logits[_cell_of(pts, left)] = np.where(left, 20.0, -20.0)
        return logits, np.zeros((n, 3), bool)

    none = np.zeros((120, 160), bool)
    low = _retry_rounds(RetryPrompts(explored_weight=0.01, explore_max_area=0.6, retries=0), answer, none)
    off = _retry_rounds(RetryPrompts(explored_weight=1.0, explore_max_area=0.6, retries=0), answer, none)
    assert np.array_equal(low[0], off[0])  # the same first grid
    assert len(low[1]) == 16 and not _cell_of(low[1], left).any()
    assert _cell_of(off[1], left).sum() >= 4
    assert sum(map(len, low)) == 128  # the budget still holds


@pytest.mark.parametrize("bad", [{"explored_weight": -0.1}, {"explored_weight": 1.5}, {"explore_max_area": 0.0},
                                 {"explore_max_area": 2.0}])
def test_bad_retry_options_are_refused(bad):
    with pytest.raises(SegmenterOptionError, match="explore"):
        RetryPrompts(**bad)


def test_point_components_keep_what_the_prompt_is_about():
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True  # the product under the prompt
    mask[25:35, 25:35] = True  # another product of the same (whole-tray) answer
    own = point_components(mask, 10, 10)
    assert own[5:15, 5:15].all() and not own[25:35, 25:35].any()
    assert point_components(mask, 15, 15)[10, 10]  # one cell off the mask still reaches it
    assert not point_components(mask, 20, 20).any()  # a prompt away from every component: nothing
    mask[15:25, 15:25] = True  # now connected: all of it
    assert point_components(mask, 10, 10)[30, 30]


def test_coverage_is_the_part_of_each_kept_mask_at_its_prompt():
    """A whole-tray answer holding fewer than 2 kept masks (a 3-product tray, 2 products not yet
    found) used to mark every product covered, so the strategy never asked about them again
    (docs/segmentation.md, "Third round"); it now covers the product under its prompt only."""
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, 5:15, 5:15] = True  # the whole tray: products A and B, prompted on A
    masks[0, 25:35, 25:35] = True
    masks[1, 5:15, 5:15] = True  # product A's own mask
    points = np.array([[40.0, 40.0], [41.0, 39.0]])  # photo pixels, 4 per cell
    cover = _coverage(masks, points, (160, 160))
    assert cover[10, 10] and not cover[30, 30]
    assert _coverage(masks)[30, 30]  # the old map (no prompts given): B counted as covered
    outside = _coverage(masks[:1], np.array([[80.0, 80.0]]), (160, 160))
    assert not outside.any()  # an answer that does not contain its prompt covers nothing


def test_a_whole_tray_answer_no_longer_hides_the_products_never_found(grocery_store):
    """Simulated 3-product trays (seeds 1021, 1129: their whole-tray answer is accepted in the
    first round and holds < 2 kept masks, so it is not composite): with the whole mask as
    coverage every product looks found and the default strategy misses 2-3 of them; with
    coverage at the prompt it finds them, at the same 128 prompts (docs/segmentation.md,
    "Third round")."""
    maker = TrayMaker(grocery_store)
    for seed in (1021, 1129):
        tray = maker.make(seed, (1024, 768))
        decoder = OracleDecoder(tray, OracleRates(), seed=seed)
        found = {}
        for at_prompt in (False, True):
            gen = BoundedMaskGenerator(BoundedOptions(max_masks=48, cover_at_prompt=at_prompt), RetryPrompts())
            found[at_prompt] = _recall(tray, gen.generate(decoder)) * len(tray.skus)
            assert gen.prompts_used == 128
        assert found[True] >= found[False] + 1 and found[True] >= 2, (seed, found)


def test_retry_default_retries_a_small_object_four_generations():
    """Every answer about the small object is rejected: the default (4 generations) opens the
    next 4 rounds with a re-prompt inside it; the second round's 2 generations stop after 2."""
    answer, square = _small_object_answer()
    inside = lambda r: bool(square[int(r[0, 1] * 120 / 480), int(r[0, 0] * 160 / 640)])  # noqa: E731
    rounds = _retry_rounds(RetryPrompts(), answer, np.zeros((120, 160), bool))
    assert [inside(r) for r in rounds[1:5]] == [True] * 4
    two = _retry_rounds(RetryPrompts(retries=2, suspect_weight=None), answer, np.zeros((120, 160), bool))
    assert [inside(r) for r in two[1:5]] == [True, True, False, False]
    assert sum(map(len, rounds)) == sum(map(len, two)) == 128
    shipped = MaskGeneratorOptions().strategy()  # what the segmenter runs
    assert shipped == RetryPrompts() and (shipped.retries, shipped.suspect_weight, shipped.max_prompts) == (4, 1.0, 128)


def test_suspect_places_rank_as_unexplored():
    """The left half is answered (its mask, rejected, 50 % of the photo: explored, not compact);
    a prompt inside the 18 x 18-cell square there gets the square, rejected and compact: the
    decoder saw something small.  Explored places count 0.01 of their distance, so without
    ``suspect_weight`` no later prompt goes back to the square; with 1 (the default) some do."""
    left = np.zeros((120, 160), bool)
    left[:, :80] = True
    square = np.zeros((120, 160), bool)
    square[30:48, 62:80] = True

    def answer(pts):
        n = len(pts)
        logits = np.full((n, 3, 120, 160), 20.0, np.float32)  # the whole photo: neither explored nor compact
        logits[_cell_of(pts, left), 1] = np.where(left, 20.0, -20.0)
        on = _cell_of(pts, square)
        logits[on, 0] = np.where(left, 20.0, -20.0)
        logits[on, 1] = np.where(square, 20.0, -20.0)
        return logits, np.zeros((n, 3), bool)

    none = np.zeros((120, 160), bool)
    kw = {"explored_weight": 0.01, "explore_max_area": 0.6, "retries": 0}
    on = _retry_rounds(RetryPrompts(suspect_weight=1.0, **kw), answer, none)
    off = _retry_rounds(RetryPrompts(suspect_weight=None, **kw), answer, none)
    assert _cell_of(on[0], square).sum() == _cell_of(off[0], square).sum() == 1  # the same first grid
    assert _cell_of(np.concatenate(on[1:]), square).sum() >= 1
    assert _cell_of(np.concatenate(off[1:]), square).sum() == 0
    assert sum(map(len, on)) == 128
    with pytest.raises(SegmenterOptionError, match="suspect"):
        RetryPrompts(suspect_weight=2.5)
