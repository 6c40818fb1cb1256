"""examples/retailklip_loop.py end to end on real GroceryStore train photos and the real
MobileNetV2, in its small fast variant (1 epoch, depth 2, 2 photos per class): it writes the
finetuned encoder, rebuilds the catalogs onto it, keeps the protocol's splits apart, and what it
prints is what it writes to loop.json."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from safetensors.torch import load_file

from catalog import Catalog
from retailklip.encoders import create_encoder
from retailklip.protocol import SESSION_COSINE

pytestmark = pytest.mark.slow


def rows(path: Path, column: str) -> list[str]:
    with open(path, newline="") as f:
        return [r[column] for r in csv.DictReader(f)]


def load_loop_module():
    """examples/retailklip_loop.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("retailklip_loop", REPO / "examples" / "retailklip_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def loop(tmp_path_factory, grocery, mobilenet_weights):
    out = tmp_path_factory.mktemp("loop") / "out"
    cmd = [sys.executable, str(REPO / "examples" / "retailklip_loop.py"), "--data", str(grocery.parent),
           "--weights", str(mobilenet_weights), "--out", str(out), "--epochs", "1", "--depth", "2",
           "--max-train-photos", "2", "--max-held-out-photos", "2", "--center-stride", "6", "--threads", "1"]
    # One training thread (the rest of the loop and its `catalog` processes get one thread from
    # the conftest's OMP_NUM_THREADS under xdist): the other pytest worker has the other core.
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout, json.loads((out / "loop.json").read_text())


def test_writes_finetuned_encoder_and_rebuilds_onto_it(loop):
    out, _, res = loop
    weights = load_file(out / "encoder.safetensors")
    assert any(k.startswith("conv_stem") for k in weights) and not any(k.startswith("classifier") for k in weights)
    # trained on the catalogs' embedding (pooled + last stage), exported as the plain timm model's weights
    argv = res["finetune"]["argv"]
    assert argv[argv.index("feature_stage=" + json.dumps(res["split"]["feature_stage"])) - 1] == "--encoder-option"
    for name in ("all", "known"):
        cat = Catalog.open(out / f"catalog-{name}")
        assert cat.encoder_identity().key == res["after"]["encoder"]
        assert Path(cat.encoder_kwargs()["weights"]).resolve() == (out / "encoder.safetensors").resolve()
        assert len(cat.versions()) == 2  # init + rebuild
        # both encoders' features are centred, each on its own mean of the same photos (--center-after)
        before, after = res["before"]["encoder"], res["after"]["encoder"]
        assert "/c=" in before and "/c=" in after and before.split("/c=")[1] != after.split("/c=")[1]
        assert cat.encoder_identity().center != "none" and res["split"]["center_after"]
    assert res["encoder_changed"] and res["before"]["encoder"] != res["after"]["encoder"]
    assert res["vectors_max_abs_change"] > 1e-4
    # the stored threshold is the one `catalog calibrate` chose for the new encoder, on outlier-ratio
    cal = res["after"]["open_set"]["calibration"]
    known = Catalog.open(out / "catalog-known")
    assert known.threshold == pytest.approx(cal["threshold"], abs=1e-6) and known.open_set_score == "outlier-ratio"
    # the training classes' packshots are its outlier references, re-embedded by the rebuild
    outliers = known.list_outliers()
    assert len(outliers) == res["split"]["outlier_references"] == 46 and all(o.vectors == 1 for o in outliers)
    assert cal["outlier_vectors"] == 46
    assert res["after"]["open_set"]["threshold"] == pytest.approx(cal["threshold"], abs=1e-6)


def test_splits_follow_the_protocol(loop, grocery_store, mobilenet_weights):
    out, _, res = loop
    coarse = {c.name: c.coarse_name for c in grocery_store.classes}
    train_split = {str(p.path.resolve()) for p in grocery_store.photos("train")}
    trained = set(rows(out / "train.csv", "label"))
    evaluation, calibration = rows(out / "evaluation.csv", "image"), rows(out / "calibration.csv", "image")
    packshots = {str(c.iconic.resolve()) for c in grocery_store.classes if c.name in trained}
    assert set(rows(out / "train.csv", "image")) <= train_split | packshots  # val is never read
    assert packshots <= set(rows(out / "train.csv", "image"))  # --train-iconic, the default
    # the packshots are the 'reference' rows (oversampled by --reference-copies), the photos 'query' rows
    roles = dict(zip(rows(out / "train.csv", "image"), rows(out / "train.csv", "role")))
    assert {i for i, r in roles.items() if r == "reference"} == packshots
    assert {r for i, r in roles.items() if i not in packshots} == {"query"}
    assert res["split"]["reference_copies"] == load_loop_module().loop_parser().get_default("reference_copies") > 1
    for f in (out / "evaluation.csv", out / "calibration.csv"):
        assert set(rows(f, "image")) <= train_split
    held = set(rows(out / "evaluation.csv", "sku")) | set(rows(out / "calibration.csv", "sku"))
    assert len(trained) == res["split"]["training_classes"] == 46 and len(held) == 35
    assert not {coarse[c] for c in trained} & {coarse[c] for c in held}
    assert not set(evaluation) & set(calibration)
    sp = res["split"]
    # capture-session folds (the default): no photo has a near-copy of its class on the other side
    assert sp["folds"] == "session" and 0 < sp["capture_groups"] <= 2 * len(held)  # --max-held-out-photos 2
    enc = create_encoder("timm:mobilenetv2_100", weights=mobilenet_weights, interpolation="bilinear")
    e, c = enc.embed([Path(i) for i in evaluation]), enc.embed([Path(i) for i in calibration])
    same = np.array(rows(out / "evaluation.csv", "sku"))[:, None] == np.array(rows(out / "calibration.csv", "sku"))[None, :]
    assert same.any() and (e @ c.T)[same].max() < SESSION_COSINE
    assert not set(sp["unknown_evaluation_classes"]) & set(rows(out / "calibration.csv", "sku"))
    assert not set(sp["known_classes"]) & set(sp["unknown_evaluation_classes"] + sp["unknown_calibration_classes"])
    assert set(rows(out / "catalog-known.csv", "sku")) == set(sp["known_classes"])


def test_printed_table_matches_json(loop):
    out, stdout, res = loop
    printed = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\| ([a-zA-Z][^|]*?) \| ([^|]+) \| ([^|]+) \|$",
                                                                         stdout, re.MULTILINE)}

    def text(v):
        if v is None:
            return "-"
        if isinstance(v, dict):
            return f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
        return f"{v:.3f}"

    for label, part, key in [("closed-set top-1", "closed_set", "top1"), ("AUROC known vs unknown", "open_set", "auroc"),
                             ("known photos accepted", "open_set", "known_accepted"),
                             ("calibrated threshold", "open_set", "threshold"),
                             ("accepted fraction", "open_set", "accepted_fraction"),
                             ("known precision", "open_set", "known_precision"),
                             ("unknown rejection", "open_set", "unknown_rejection")]:
        assert printed[label] == (text(res["before"][part][key]), text(res["after"][part][key])), label
    loop_module = load_loop_module()
    # the per-score table: every score calibrated; the stored threshold is --score's (outlier-ratio)
    for score in ("distance", "ratio", "outlier-ratio"):
        assert res["after"]["open_set"]["scores"][score]["calibrated"] is not None
    for score in ("distance", "ratio", "outlier-ratio"):
        for label, path in loop_module.score_rows(score, 0.9):
            assert printed[label] == tuple(text(loop_module.get(res[w], path)) for w in ("before", "after")), label
        a = res["after"]["open_set"]["scores"][score]["auroc"]
        assert a["low"] <= a["mean"] <= a["high"]
    os = res["after"]["open_set"]
    assert os["score"] == "outlier-ratio" and os["auroc"] == os["scores"]["outlier-ratio"]["auroc"]
    assert os["threshold"] == pytest.approx(os["scores"]["outlier-ratio"]["calibrated"]["threshold"], abs=1e-6)
    n = res["split"]["closed_set_photos"]  # closed set: every held-out train photo, evaluation and calibration side
    assert n == 2 * res["split"]["held_out_classes"] > res["split"]["evaluation_photos"]  # --max-held-out-photos 2
    top1 = {w: res[w]["closed_set"]["top1"]["mean"] for w in ("before", "after")}
    mc = res["mcnemar_after_vs_before"]
    assert mc["only_after"] - mc["only_before"] == round((top1["after"] - top1["before"]) * n)
    assert re.search(rf"{mc['only_after']} right only after, {mc['only_before']} only before", stdout)
    # per-photo results (for paired comparisons of two runs) agree with the totals
    pp = res["per_photo"]
    assert len(pp["image"]) == len(set(pp["image"])) == len(pp["before_correct"]) == len(pp["after_correct"]) == n
    assert set(rows(out / "evaluation.csv", "image")) | set(rows(out / "calibration.csv", "image")) <= set(pp["image"])
    for w in ("before", "after"):
        assert sum(pp[f"{w}_correct"]) == round(top1[w] * n)
    assert sum(a and not b for a, b in zip(pp["after_correct"], pp["before_correct"])) == mc["only_after"]
    per_class = res["after"]["closed_set"]["per_class"]
    assert sum(r["photos"] for r in per_class.values()) == n
    assert sum(r["top1"] * r["photos"] for r in per_class.values()) == pytest.approx(top1["after"] * n, abs=n * 1e-6)  # loop.json rounds to 6 decimals
    avg = res["after"]["closed_set"]["per_class_average"]  # a bootstrap interval over classes
    assert avg["mean"] == pytest.approx(np.mean([r["top1"] for r in per_class.values()]), abs=1e-6)
    assert avg["low"] <= avg["mean"] <= avg["high"] and avg["low"] < avg["high"]


def test_oracle_operating_point_on_a_hand_made_example():
    mod = load_loop_module()
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    right = np.array([1, 1, 0, 1, 1, 0], bool)  # photo 2: known, wrong SKU; photo 5: unknown
    known = np.array([1, 1, 1, 1, 1, 0], bool)
    # precision of the prefixes: 1, 1, 2/3, 3/4, 4/5, 4/6
    p9 = mod.oracle_operating_point(score, right, known, 0.9)
    assert p9 == {"threshold": pytest.approx(0.25), "accepted": 2, "accepted_fraction": pytest.approx(2 / 6),
                  "known_accepted": pytest.approx(2 / 5), "known_precision": 1.0, "unknown_rejection": 1.0,
                  "known_accuracy": pytest.approx(2 / 5)}
    p75 = mod.oracle_operating_point(score, right, known, 0.75)  # the largest acceptance, not the first
    assert p75["accepted"] == 5 and p75["known_precision"] == pytest.approx(0.8) and p75["known_accepted"] == 1.0
    assert p75["threshold"] == pytest.approx(0.55) and p75["unknown_rejection"] == 1.0
    assert mod.oracle_operating_point(score, ~right, known, 0.9) is None  # the best photo is wrong


@pytest.mark.parametrize("copies", ["0", "-3"])
def test_bad_reference_copies_is_a_one_line_error_before_any_work(tmp_path, grocery, copies):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(REPO / "examples" / "retailklip_loop.py"), "--data", str(grocery.parent),
                          "--out", str(out), "--reference-copies", copies], capture_output=True, text=True, check=False, cwd=REPO)
    assert res.returncode == 2 and f"--reference-copies must be >= 1, got {copies}" in res.stderr
    assert not out.exists()


def test_json_keeps_small_p_values():
    """loop.json rounds floats to 6 significant digits, not 6 decimals: McNemar's p-value of a
    full loop (about 6e-10) must not be written as 0.0."""
    mod = load_loop_module()
    assert mod.jsonable(6.22e-10) == 6.22e-10
    assert mod.jsonable({"p": 1.23456789e-12, "top1": 0.63606010016}) == {"p": 1.23457e-12, "top1": 0.63606}
