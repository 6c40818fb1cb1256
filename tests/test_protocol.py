"""The evaluation protocol (retailklip.protocol, issue 14): folds over GroceryStore's train
split (class-disjoint by coarse class where training is involved), bootstrap intervals and the
exact McNemar test."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GROCERY
from scipy.stats import binomtest

from retailklip.datasets import read_grocery_store
from retailklip.protocol import bootstrap_ci, class_disjoint_folds, mcnemar, photo_folds


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
