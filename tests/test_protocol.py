"""The evaluation protocol (retailklip.protocol, issue 14): folds over GroceryStore's train
split (class-disjoint by coarse class where training is involved), bootstrap intervals and the
exact McNemar test."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GROCERY
from scipy.stats import binomtest

from retailklip.datasets import read_grocery_store
from retailklip.protocol import (
    bootstrap_ci,
    bootstrap_statistic,
    capture_groups,
    class_disjoint_folds,
    fold_roles,
    mcnemar,
    photo_folds,
    session_folds,
)


@pytest.fixture(scope="module")
def store():
    return read_grocery_store(GROCERY)


def test_class_disjoint_folds_keep_coarse_classes_on_one_side(store):
    classes = [c.name for c in store.classes]
    coarse = [c.coarse_id for c in store.classes]
    folds = class_disjoint_folds(classes, k=5, seed=3, groups=coarse)
    assert len(folds) == 5
    held = np.concatenate([f.test for f in folds])
    assert sorted(held.tolist()) == list(range(len(classes)))  # the test sets partition the classes
    for f in folds:
        assert not set(f.train) & set(f.test)
        train_groups = {coarse[i] for i in f.train}
        test_groups = {coarse[i] for i in f.test}
        assert not train_groups & test_groups  # no sibling of a held-out class is trained on
        assert 0.1 <= len(f.test) / len(classes) <= 0.3
    # another seed deals differently; the same seed, the same
    assert [f.test.tolist() for f in class_disjoint_folds(classes, 5, 3, coarse)] == [f.test.tolist() for f in folds]
    assert [f.test.tolist() for f in class_disjoint_folds(classes, 5, 4, coarse)] != [f.test.tolist() for f in folds]
    with pytest.raises(ValueError, match="at least"):
        class_disjoint_folds(classes[:3], k=5)
    with pytest.raises(ValueError, match="distinct"):
        class_disjoint_folds(classes[:2] * 3, k=2)


def test_photo_folds_are_stratified_over_the_train_split(store):
    labels = [p.label for p in store.photos("train")]
    folds = photo_folds(labels, k=5, seed=0)
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(len(labels)))
    sizes = [len(f.test) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    counts = {c: labels.count(c) for c in set(labels)}
    for f in folds:
        in_fold = [labels[i] for i in f.test]
        for c, n in counts.items():
            assert abs(in_fold.count(c) - n / 5) <= 1  # every class spread evenly


def test_bootstrap_interval_and_mcnemar():
    rng = np.random.default_rng(0)
    right = rng.random(400) < 0.6
    ci = bootstrap_ci(right, seed=1)
    assert ci.low < ci.mean < ci.high and ci.mean == right.mean()
    # the normal approximation's half width sqrt(p(1-p)/n) * 1.96 ~ 0.048 for n = 400
    assert 0.035 < (ci.high - ci.low) / 2 < 0.06
    small = bootstrap_ci(right[:50], seed=1)
    assert small.high - small.low > ci.high - ci.low
    with pytest.raises(ValueError):
        bootstrap_ci([])
    b = right.copy()
    b[:30] = ~b[:30]  # B differs from A on 30 photos
    r = mcnemar(right, b)
    assert r.only_a + r.only_b == 30
    assert r.p_value == pytest.approx(binomtest(r.only_a, 30, 0.5).pvalue)
    assert mcnemar(right, right).p_value == 1.0
    with pytest.raises(ValueError):
        mcnemar(right, right[:10])


def test_fold_roles_never_use_a_query_photo_for_the_centre_or_a_reference(store):
    """The construction of benchmarks/bench_defaults_cv.py on GroceryStore's 2640 train photos:
    a query photo is never in its fold's centring sample nor among its extra references."""
    labels = [p.label for p in store.photos("train")]
    folds = photo_folds(labels, k=5, seed=0)
    roles = fold_roles(labels, folds, center_size=352, extra_references=2, seed=0)
    assert [r.index for r in roles] == [f.index for f in folds]
    for f, r in zip(folds, roles):
        q, c = set(r.queries.tolist()), set(r.center.tolist())
        refs = {i for idx in r.references.values() for i in idx.tolist()}
        assert q == set(f.test.tolist()) and len(c) == 352
        assert not q & c and not q & refs and not c & refs
        assert c | refs <= set(f.train.tolist())
        assert set(r.references) == set(labels)
        for cls, idx in r.references.items():
            assert len(idx) == 2 and all(labels[i] == cls for i in idx)
    # the centre does not depend on how many references are drawn; another seed draws another one
    again = fold_roles(labels, folds, center_size=352, extra_references=0, seed=0)
    assert all(np.array_equal(a.center, b.center) for a, b in zip(again, roles))
    assert all(len(idx) == 0 for idx in again[0].references.values())
    assert not np.array_equal(fold_roles(labels, folds, center_size=352, seed=1)[0].center, roles[0].center)
    # all train photos when no size is given; a class with fewer photos gets fewer references
    (whole,) = fold_roles(labels, folds[:1], extra_references=10_000)
    assert np.array_equal(whole.center, folds[0].train) and all(len(v) == 0 for v in whole.references.values())
    with pytest.raises(ValueError, match="center_size"):
        fold_roles(labels, folds, center_size=0)
    with pytest.raises(ValueError, match="exceeds"):
        fold_roles(labels, folds, center_size=len(labels))
    with pytest.raises(ValueError, match="extra_references"):
        fold_roles(labels, folds, extra_references=-1)


def test_bootstrap_statistic_mean_is_bootstrap_ci_and_auroc_interval():
    from retailklip.calibration import auroc

    rng = np.random.default_rng(0)
    right = rng.random(400) < 0.6
    assert bootstrap_statistic(np.mean, right, seed=1) == bootstrap_ci(right, seed=1)  # same resamples
    # AUROC of two unit-variance normals 1 sd apart: 0.760; Hanley & McNeil's (1982) standard error
    pos, neg = rng.normal(1.0, 1.0, 300), rng.normal(0.0, 1.0, 150)
    score, known = np.concatenate([pos, neg]), np.r_[np.ones(300, bool), np.zeros(150, bool)]
    ci = bootstrap_statistic(lambda s, k: auroc(s[k], s[~k]), score, known)
    a = auroc(pos, neg)
    assert ci.mean == a and ci.low < a < ci.high and ci.n == 450
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + 299 * (q1 - a * a) + 149 * (q2 - a * a)) / (300 * 150))
    assert 0.7 < (ci.high - ci.low) / (2 * 1.96 * se) < 1.3
    # perfectly separated: every resample that has both sides is 1
    sep = bootstrap_statistic(lambda s, k: auroc(s[k], s[~k]), np.r_[np.ones(5), np.zeros(5)], np.r_[[True] * 5, [False] * 5])
    assert (sep.mean, sep.low, sep.high) == (1.0, 1.0, 1.0)


def test_bootstrap_statistic_drops_undefined_resamples_and_checks_inputs():
    def needs_both(k):
        if k.all() or not k.any():
            raise ValueError("one side")
        return float(k.mean())

    k = np.array([True, True, False, False])  # 1 resample in 8 has one side only: dropped
    ci = bootstrap_statistic(needs_both, k, n_boot=400)
    assert ci.mean == 0.5 and ci.low == 0.25 and ci.high == 0.75  # never 0 or 1
    def all_items(i):  # defined on the full array only (almost never on a resample)
        return 1.0 if len(set(i.tolist())) == len(i) else float("nan")

    with pytest.raises(ValueError, match="undefined on"):
        bootstrap_statistic(all_items, np.arange(20), n_boot=200)
    with pytest.raises(ValueError):
        bootstrap_statistic(np.mean, [1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        bootstrap_statistic(np.mean)
    with pytest.raises(ValueError):
        bootstrap_statistic(needs_both, np.ones(3, bool))  # undefined on the full arrays


def test_capture_groups_and_session_folds_on_a_hand_made_example():
    # class a: photos 0, 1 near-copies, 2 alone; class b: 3, 4 near-copies of each other and of a's 0
    x = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [1, 0.05, 0], [1, 0.02, 0.01]], np.float32)
    labels = ["a", "a", "a", "b", "b"]
    g = capture_groups(x, labels, min_cosine=0.95)
    assert g[0] == g[1] != g[2] and g[3] == g[4] and g[3] not in (g[0], g[2])  # never across classes
    assert sorted(set(g.tolist())) == [0, 1, 2]
    folds = session_folds(labels, g, k=2, seed=0)
    for f in folds:
        assert not set(g[f.test].tolist()) & set(g[f.train].tolist())
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(5))
    with pytest.raises(ValueError, match="2 classes"):
        session_folds(["a", "b"], [0, 0], k=2)
    with pytest.raises(ValueError, match="min_cosine"):
        capture_groups(x, labels, min_cosine=1.5)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        capture_groups(x[:3], labels)


def test_session_folds_keep_near_copies_out_of_the_other_folds(store, mobilenet_encoder):
    """GroceryStore train photos of 6 classes, ImageNet MobileNetV2: with stratified photo folds a
    query's nearest same-class photo in the other folds is a near-copy (median cosine ~0.9); with
    session folds it is as far as a val photo's nearest train photo (~0.8)."""
    keep = {c.name for c in store.classes[:6]}
    photos = [p for p in store.photos("train") if p.label in keep]
    labels = [p.label for p in photos]
    x = mobilenet_encoder.embed([p.path for p in photos])
    lab = np.array(labels)

    def nearest_median(folds):
        near = []
        for f in folds:
            for q in f.test:
                other = np.setdiff1d(f.train, [q])
                same = other[lab[other] == lab[q]]
                if len(same):
                    near.append((x[same] @ x[q]).max())
        return float(np.median(near))

    groups = capture_groups(x, labels)  # the default, SESSION_COSINE = 0.87
    sess = session_folds(labels, groups, k=5, seed=0)
    for f in sess:
        assert not set(groups[f.test].tolist()) & set(groups[f.train].tolist())
        assert 0.1 < len(f.test) / len(labels) < 0.3  # balanced
    photo = nearest_median(photo_folds(labels, 5, seed=0))
    session = nearest_median(sess)
    assert photo > 0.87 and session < photo - 0.05, (photo, session)
