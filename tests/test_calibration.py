"""Threshold calibration, open-set metrics, the softmax-head baseline and ``catalog calibrate``."""

import csv
import json

import numpy as np
import pytest
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC, TINY_CLIP_OPTIONS

from catalog import Catalog
from catalog.cli import main
from retailklip.baseline import SoftmaxHead
from retailklip.calibration import (
    CalibrationError,
    auroc,
    calibrate,
    calibrate_catalog,
    default_score,
    open_set_metrics,
    precision_interval,
    outlier_distances,
    threshold_for_precision,
    threshold_for_unknown_rejection,
)
from retailklip.datasets import LabelledImage
from retailklip.errors import RetailKlipError
from retailklip.open_set import check_threshold, distance_ratio, open_set_score, outlier_ratio, score_range
from retailklip.recognizer import Recognizer


# ---------------------------------------------------------------------------- AUROC
def _auroc_pairs(pos, neg):
    """Independent definition: P(pos > neg) + 0.5 P(pos == neg) over all pairs."""
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float)  # many ties
    neg = rng.integers(0, 6, size=rng.integers(1, 40)).astype(float) - 1
    assert auroc(pos, neg) == pytest.approx(_auroc_pairs(pos, neg), abs=1e-12)


def test_auroc_extremes_and_errors():
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        auroc([], [1.0])


# ---------------------------------------------------------------------------- threshold selection
def _precision_at(d, correct, t):
    acc = d <= t
    return (correct & acc).sum() / acc.sum() if acc.any() else None


@pytest.mark.parametrize("seed", range(8))
def test_threshold_for_precision_is_the_largest_that_meets_the_target(seed):
    rng = np.random.default_rng(seed)
    m = 60
    correct = rng.random(m) < 0.7
    # Correct matches tend to be closer; rounding makes ties.
    d = np.round(np.where(correct, rng.uniform(0.1, 0.6, m), rng.uniform(0.3, 0.9, m)), 2)
    target = 0.8
    t = threshold_for_precision(d, correct, target)
    assert _precision_at(d, correct, t) >= target
    # Every larger cut (accepting at least one more photo) misses the target.
    for larger in np.unique(d[d > t]):
        assert _precision_at(d, correct, larger) < target
    # Midway placement: strictly between the accepted and the next distance.
    if (d > t).any():
        assert d[d <= t].max() < t < d[d > t].min()


def test_threshold_for_precision_unreachable_and_bad_target():
    d = np.array([0.1, 0.2, 0.3])
    with pytest.raises(CalibrationError, match="best"):
        threshold_for_precision(d, np.array([False, True, True]), 0.9)
    with pytest.raises(CalibrationError):
        threshold_for_precision(d, np.array([True, True, True]), 1.5)
    # All correct: everything is accepted, the threshold is the largest distance.
    assert threshold_for_precision(d, np.array([True, True, True]), 1.0) == pytest.approx(0.3)


@pytest.mark.parametrize("seed", range(8))
def test_threshold_for_unknown_rejection_is_the_largest_that_rejects_enough(seed):
    rng = np.random.default_rng(seed)
    known = rng.random(50) < 0.5
    known[:2] = [True, False]
    d = np.round(np.where(known, rng.uniform(0.1, 0.6, 50), rng.uniform(0.3, 1.0, 50)), 2)
    target = float(rng.uniform(0.2, 0.95))
    t = threshold_for_unknown_rejection(d, known, target)
    rejected = lambda thr: (d[~known] > thr).mean()
    assert rejected(t) >= target - 1e-12
    for larger in np.unique(d[d > t]):
        assert rejected(larger) < target


def test_threshold_for_unknown_rejection_needs_unknowns():
    with pytest.raises(CalibrationError, match="outside the catalog"):
        threshold_for_unknown_rejection(np.array([0.1, 0.2]), np.array([True, True]), 0.5)


def test_open_set_metrics_by_hand():
    truth = ["a", "a", "b", "x", "y"]
    pred = ["a", "b", "b", "a", "b"]
    known = np.array([True, True, True, False, False])
    accepted = np.array([True, True, False, True, False])
    score = np.array([0.9, 0.8, 0.3, 0.5, 0.1])
    m = open_set_metrics(pred, truth, known, accepted, score)
    assert (m.known_photos, m.unknown_photos, m.accepted) == (3, 2, 3)
    assert m.known_accuracy == pytest.approx(1 / 3)  # only photo 0 is accepted and right
    assert m.closed_set_top1 == pytest.approx(2 / 3)
    assert m.known_precision == pytest.approx(1 / 3)  # accepted: right, wrong SKU, unknown photo
    assert m.unknown_rejection == pytest.approx(1 / 2)
    assert m.known_rejection == pytest.approx(1 / 3)
    assert m.auroc == pytest.approx(_auroc_pairs(score[known], score[~known]))


# ---------------------------------------------------------------------------- softmax head
def _clusters(rng, centers, n, noise):
    x = np.repeat(centers, n, axis=0) + noise * rng.standard_normal((len(centers) * n, centers.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_softmax_head_learns_separable_classes_and_applies_cutoff():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16)
    x = _clusters(rng, centers, 8, 0.05)
    labels = [c for c in "abcd" for _ in range(8)]
    head = SoftmaxHead.fit(x, labels, l2=1e-2)
    assert head.classes == list("abcd") and head.train_accuracy == 1.0
    pred = head.predict(_clusters(rng, centers, 2, 0.05), cutoff=0.5)
    assert pred.labels == [c for c in "abcd" for _ in range(2)]
    assert pred.known.all() and (pred.confidence <= 1.0).all()
    # A vector equally far from all classes has a flat softmax: unknown at the 0.78 cutoff.
    middle = np.full((1, 16), 0.0, np.float32)
    middle[0, :4] = 0.5
    assert not head.predict(middle, cutoff=0.78).known[0]
    # Deterministic (zero init, full batch).
    again = SoftmaxHead.fit(x, labels, l2=1e-2)
    assert np.array_equal(again.linear.weight.detach().numpy(), head.linear.weight.detach().numpy())
    with pytest.raises(RetailKlipError, match="at least 2"):
        SoftmaxHead.fit(x[:8], labels[:8])


# ---------------------------------------------------------------------------- calibrate (embeddings)
def _open_set_problem(seed=0):
    """4 catalog SKUs (8 views each) and photos of those SKUs (close) and of 4 others (far)."""
    rng = np.random.default_rng(seed)
    centers = np.eye(8, 32)
    gallery = _clusters(rng, centers[:4], 8, 0.1)
    gallery_skus = [f"s{i}" for i in range(4) for _ in range(8)]
    known_q = _clusters(rng, centers[:4] + 0.3 * centers[4:], 6, 0.25)
    unknown_q = _clusters(rng, centers[4:] + 0.5 * centers[:4], 6, 0.25)
    truth = [f"s{i}" for i in range(4) for _ in range(6)] + [f"u{i}" for i in range(4) for _ in range(6)]
    return gallery, gallery_skus, np.concatenate([known_q, unknown_q]), truth


def test_calibrate_target_precision_meets_target_and_reports_both_methods():
    gallery, skus, queries, truth = _open_set_problem()
    rep = calibrate(gallery, skus, queries, truth, target_precision=0.9)
    nn = rep.nearest_neighbour
    assert rep.mode == "target-precision" and 0.0 <= rep.threshold <= 2.0
    assert nn.known_precision >= 0.9
    assert (nn.known_photos, nn.unknown_photos) == (24, 24)
    assert rep.softmax_cutoff == 0.78 and rep.softmax.known_photos == 24
    assert 0.0 <= rep.softmax.auroc <= 1.0 and rep.head["train_accuracy"] == 1.0
    d = rep.to_dict()
    assert d["nearest_neighbour"]["known_precision"] >= 0.9 and d["softmax"]["cutoff"] == 0.78
    # the precision's exact interval over the accepted photos, for both methods
    right = round(nn.known_precision * nn.accepted)
    assert nn.known_precision_ci == precision_interval(right, nn.accepted)
    assert nn.known_precision_ci[0] < nn.known_precision <= nn.known_precision_ci[1]
    assert d["nearest_neighbour"]["known_precision_ci"] == [round(x, 6) for x in nn.known_precision_ci]
    assert rep.softmax.known_precision_ci is None or len(d["softmax"]["known_precision_ci"]) == 2


def test_precision_interval_is_clopper_pearson():
    """Exact binomial intervals (values from the closed forms: 0 of n -> [0, 1 - 0.025^(1/n)],
    n of n -> [0.025^(1/n), 1]; 9 of 10 from the beta quantiles)."""
    assert precision_interval(0, 5) == pytest.approx((0.0, 1 - 0.025 ** (1 / 5)))
    assert precision_interval(5, 5) == pytest.approx((0.025 ** (1 / 5), 1.0))
    assert precision_interval(9, 10) == pytest.approx((0.55498, 0.99747), abs=1e-5)
    assert precision_interval(0, 0) is None
    low, high = precision_interval(90, 100)
    assert high - low < precision_interval(9, 10)[1] - precision_interval(9, 10)[0]  # more photos, narrower
    with pytest.raises(ValueError, match="11 right of 10"):
        precision_interval(11, 10)


def test_calibrate_match_softmax_rejects_at_least_as_many_unknowns():
    gallery, skus, queries, truth = _open_set_problem(1)
    rep = calibrate(gallery, skus, queries, truth, match_softmax_cutoff=0.78)
    assert rep.mode == "match-softmax" and rep.target == rep.softmax.unknown_rejection
    assert rep.nearest_neighbour.unknown_rejection >= rep.softmax.unknown_rejection
    with pytest.raises(CalibrationError, match="exactly one"):
        calibrate(gallery, skus, queries, truth)
    with pytest.raises(CalibrationError, match="outside the catalog"):
        calibrate(gallery, skus, queries[:24], truth[:24], match_softmax_cutoff=0.78)
    with pytest.raises(CalibrationError, match="none of the photos"):
        calibrate(gallery, skus, queries[24:], truth[24:], target_precision=0.9)


def test_distance_ratio_by_hand():
    r = distance_ratio([0.2, 0.5, 0.0, 0.4, 0.6], [0.4, 0.5, 0.0, np.nan, 0.5])
    # d1/d2; equal distances -> 1; 0/0 -> 1; no runner-up -> d2 = 2; d1 > d2 (approximate index) -> 1
    assert r.tolist() == pytest.approx([0.5, 1.0, 1.0, 0.2, 1.0])
    assert open_set_score("distance", [0.3], [0.6]).tolist() == [0.3]
    assert open_set_score("ratio", [0.3], None).tolist() == [pytest.approx(0.15)]
    with pytest.raises(RetailKlipError, match="unknown open-set score 'cosine'"):
        open_set_score("cosine", [0.3], [0.6])


def test_outlier_ratio_by_hand():
    r = outlier_ratio([0.2, 0.5, 0.0, 0.3, 2.5], [0.4, 0.25, 0.0, 0.0, 1.0])
    # d1/d_out; an outlier nearer than the catalog -> > 1; 0/0 -> 1; d_out = 0 < d1 -> inf; d1 clipped to 2
    assert r.tolist() == pytest.approx([0.5, 2.0, 1.0, np.inf, 2.0])
    with pytest.raises(ValueError, match="shape"):
        outlier_ratio([0.2, 0.3], [0.4])
    with pytest.raises(ValueError, match="NaN"):
        outlier_ratio([0.2], [np.nan])


def test_calibrate_ratio_thresholds_the_ratio():
    gallery, skus, queries, truth = _open_set_problem(2)
    rep = calibrate(gallery, skus, queries, truth, target_precision=0.9, score="ratio")
    assert rep.open_set_score == "ratio" and rep.to_dict()["open_set_score"] == "ratio"
    assert 0.0 <= rep.threshold <= 1.0 and rep.nearest_neighbour.known_precision >= 0.9
    dist = calibrate(gallery, skus, queries, truth, target_precision=0.9)
    assert dist.open_set_score == "distance"
    with pytest.raises(RetailKlipError, match="unknown open-set score"):
        calibrate(gallery, skus, queries, truth, target_precision=0.9, score="lowe")


def test_calibrate_outlier_ratio_with_other_products_as_outliers():
    gallery, skus, queries, truth = _open_set_problem(3)
    rng = np.random.default_rng(3)
    outliers = _clusters(rng, np.eye(8, 32)[4:], 2, 0.1)  # packshots of the 4 products not in the catalog
    rep = calibrate(gallery, skus, queries, truth, target_precision=0.9, score="outlier-ratio", outliers=outliers)
    assert rep.open_set_score == "outlier-ratio" and rep.outlier_vectors == 8 and rep.to_dict()["outlier_vectors"] == 8
    assert rep.nearest_neighbour.known_precision >= 0.9 and np.isfinite(rep.threshold) and rep.threshold >= 0.0
    # the score is d1 / distance to the nearest outlier vector, computed here by hand
    d1 = (1.0 - queries.astype(np.float64) @ gallery.T.astype(np.float64)).min(1)
    d_out = (1.0 - queries.astype(np.float64) @ outliers.T.astype(np.float64)).min(1)
    by_hand = d1 / d_out
    assert int((by_hand <= rep.threshold).sum()) == rep.nearest_neighbour.accepted
    assert outlier_distances(outliers, queries) == pytest.approx(d_out, abs=1e-5)
    known = np.array([t.startswith("s") for t in truth])
    assert auroc(-by_hand[known], -by_hand[~known]) >= auroc(-d1[known], -d1[~known])
    # no outlier vectors: one clear error, before anything is computed
    for none in (None, np.zeros((0, 32), np.float32)):
        with pytest.raises(RetailKlipError, match="needs outlier references"):
            calibrate(gallery, skus, queries, truth, target_precision=0.9, score="outlier-ratio", outliers=none)
    assert default_score(True) == "outlier-ratio" and default_score(False) == "ratio"


def test_open_set_score_ranges_and_thresholds():
    assert score_range("distance") == (0.0, 2.0) and score_range("ratio") == (0.0, 1.0)
    assert score_range("outlier-ratio") == (0.0, np.inf)
    assert check_threshold(3.5, "outlier-ratio") == 3.5 and check_threshold(0.4, "ratio") == 0.4
    for t, score in ((2.5, "distance"), (1.5, "ratio"), (np.inf, "outlier-ratio"), (-0.1, "outlier-ratio"),
                     (np.nan, "distance")):
        with pytest.raises(RetailKlipError, match=f"threshold on {score}"):
            check_threshold(t, score)
    assert open_set_score("outlier-ratio", [0.2], None, [0.4]).tolist() == [0.5]
    with pytest.raises(RetailKlipError, match="needs outlier references"):
        open_set_score("outlier-ratio", [0.2], None)


# ---------------------------------------------------------------------------- catalog calibrate
@pytest.fixture(scope="module")
def photos_csv(tmp_path_factory, iconic, val_photos):
    """Catalog of 2 GroceryStore SKUs (tiny random encoder, K = 2) and a CSV of photos of those
    2 classes plus 2 classes outside the catalog."""
    names = {cid: name for cid, name, _ in iconic}
    counts = {}
    for _, c in val_photos:
        counts[c] = counts.get(c, 0) + 1
    chosen = [c for c in sorted(counts) if counts[c] >= 3][:4]  # first 2 in the catalog, last 2 unknown
    rows = []
    for cid in chosen:
        rows += [(p, names[cid]) for p, c in val_photos if c == cid][:3]
    path = tmp_path_factory.mktemp("photos") / "photos.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "sku"])
        w.writerows([(str(p), s) for p, s in rows])
    return path, [names[c] for c in chosen]


@pytest.fixture(scope="module")
def cli_tiny_catalog(tmp_path_factory, iconic, photos_csv):
    """Shared by the CLI tests: each reads the settings it compares against first."""
    catalog_ids = {cid for cid, name, _ in iconic if name in photos_csv[1][:2]}
    d = tmp_path_factory.mktemp("cli") / "cat"
    opts = json.dumps(TINY_CLIP_OPTIONS["model_overrides"])
    assert main(["--catalog", str(d), "init", "--encoder", "open_clip:ViT-B-32", "--random-init",
                 "--augmentations", "2", "--encoder-option", f"model_overrides={opts}"]) == 0
    cat = Catalog.open(d)
    for cid, name, path in iconic:
        if cid in catalog_ids:
            cat.add(path, sku=name)
    return d


def test_cli_calibrate_stores_threshold_json_and_dry_run(cli_tiny_catalog, photos_csv, capsys):
    d, (csv_path, _) = str(cli_tiny_catalog), photos_csv
    before = Catalog.open(d).threshold
    capsys.readouterr()
    assert main(["--catalog", d, "calibrate", str(csv_path), "--match-softmax-cutoff", "0.78", "--json", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stored"] is False and Catalog.open(d).threshold == before
    assert out["nearest_neighbour"]["known_photos"] == 6 and out["nearest_neighbour"]["unknown_photos"] == 6
    assert out["nearest_neighbour"]["unknown_rejection"] >= out["softmax"]["unknown_rejection"]
    assert main(["--catalog", d, "calibrate", str(csv_path), "--match-softmax-cutoff", "0.78", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert stored["stored"] is True and stored["previous_threshold"] == before
    assert Catalog.open(d).threshold == pytest.approx(stored["threshold"], abs=1e-6)
    assert main(["--catalog", d, "calibrate", str(csv_path), "--target-precision", "0.5", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "known precision" in text and "not stored" in text
    assert "1-NN known precision, 95 % interval over the" in text
    # the default score is the ratio, stored with the threshold; --score distance as before
    assert stored["open_set_score"] == "ratio" and Catalog.open(d).open_set_score == "ratio"
    assert main(["--catalog", d, "calibrate", str(csv_path), "--target-precision", "0.5", "--score", "distance", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["previous_open_set_score"] == "ratio" and out["open_set_score"] == "distance"
    assert Catalog.open(d).settings()["open_set_score"] == "distance"


@pytest.mark.parametrize(
    "content, args, message",
    [
        ("image,name\nx.jpg,a\n", ["--target-precision", "0.9"], "missing column"),
        ("image,sku\n", ["--target-precision", "0.9"], "no rows"),
        ("image,sku\nnope.jpg,a\n", ["--target-precision", "0.9"], "no such file"),
        (None, ["--target-precision", "1.5"], "in (0, 1]"),
        (None, ["--match-softmax-cutoff", "1.0"], "in (0, 1)"),
    ],
)
def test_cli_calibrate_bad_input_one_line_error_nothing_stored(cli_tiny_catalog, photos_csv, tmp_path, capsys, content, args, message):
    d = str(cli_tiny_catalog)
    path = photos_csv[0]
    if content is not None:
        path = tmp_path / "bad.csv"
        path.write_text(content)
    before = Catalog.open(d).settings()
    capsys.readouterr()
    assert main(["--catalog", d, "calibrate", str(path), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("catalog: error: ") and "\n" not in err and message in err
    assert Catalog.open(d).settings() == before


def test_calibrate_real_encoder_reduced(tmp_path, mobilenet_weights, iconic, val_photos):
    """Real MobileNetV2, 6 known GroceryStore classes (K = 1) and photos of 6 known + 6 unknown
    classes: the precision target holds, the report is consistent, and 1-NN separates known from
    unknown photos better than chance."""
    cat = Catalog.init(tmp_path / "cat", encoder=MOBILENET_SPEC, weights=mobilenet_weights, augmentations=1,
                       encoder_options=MOBILENET_OPTIONS)
    by_id = {cid: (name, path) for cid, name, path in iconic}
    with_photos = sorted({c for _, c in val_photos})
    known_ids, unknown_ids = with_photos[0:24:4], with_photos[2:24:4]
    cat.import_csv(_import_csv(tmp_path / "skus.csv", [by_id[c] for c in known_ids]), progress=False)
    photos = []
    for cid in known_ids + unknown_ids:
        photos += [LabelledImage(p, by_id[cid][0]) for p, c in val_photos if c == cid][:2]
    rep = calibrate_catalog(cat, photos, target_precision=0.5)
    nn, sm = rep.nearest_neighbour, rep.softmax
    assert rep.skus == 6 and nn.known_photos == 12 and nn.unknown_photos == 12
    assert nn.known_precision >= 0.5
    assert nn.closed_set_top1 > 1 / 6  # better than chance among 6 SKUs
    assert nn.auroc > 0.5
    assert sm.closed_set_top1 > 1 / 6
    # the ratio: calibrated on it, stored with it, and the recognizer applies it
    rr = calibrate_catalog(cat, photos, target_precision=0.5, score="ratio")
    assert rr.open_set_score == "ratio" and rr.nearest_neighbour.known_precision >= 0.5
    assert rr.nearest_neighbour.closed_set_top1 == nn.closed_set_top1  # the same 1-NN
    cat.set_threshold(rr.threshold, "ratio")
    rec = Recognizer(cat)
    assert (rec.threshold, rec.open_set_score) == (pytest.approx(rr.threshold), "ratio")
    results = [rec.recognize(p.path)[0] for p in photos]
    for r in results:
        assert r.runner_up is not None and r.ratio == pytest.approx(r.distance / r.runner_up.distance)
        assert r.known == (r.ratio <= rr.threshold) and r.open_set_score == "ratio"
        d = r.to_dict()
        assert d["ratio"] == pytest.approx(r.ratio, abs=1e-6) and d["open_set_score"] == "ratio"
        assert d["distance"] == pytest.approx(r.distance, abs=1e-6) and d["runner_up"]["sku"] == r.runner_up.sku
    assert sum(r.known for r in results) == rr.nearest_neighbour.accepted
    assert any(r.known for r in results) and not all(r.known for r in results)
    # an explicit threshold: a bare one is a distance; with a score, on that score
    assert all(not r.known for r in Recognizer(cat, threshold=0.0, open_set_score="ratio").recognize(photos[0].path))
    bare = Recognizer(cat, threshold=2.0).recognize(photos[0].path)[0]
    assert bare.known and bare.open_set_score == "distance"
    with pytest.raises(Exception, match="ratio in \\[0, 1\\]"):
        cat.set_threshold(1.5, "ratio")
    with pytest.raises(RetailKlipError, match="give threshold too"):
        Recognizer(cat, open_set_score="ratio")


def _import_csv(path, skus):
    """An import CSV (image,sku) of (name, path) pairs."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "sku"])
        w.writerows([(str(p), name) for name, p in skus])
    return path
