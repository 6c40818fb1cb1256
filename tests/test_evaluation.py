"""Dataset layout loaders and the RetailKLIP zero-shot protocol (``catalog eval``)."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_CLIP_OPTIONS
from PIL import Image

from catalog.cli import main
from retailklip.datasets import (
    DatasetError,
    load_dataset,
    read_photos_csv,
    split_known_unknown,
)
from retailklip.evaluation import evaluate_zero_shot, top1_scores


def _noise(path, seed, size=(40, 48)):
    """A distinct random-noise picture per seed (so a random encoder tells them apart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def _grozi_tree(root, n_classes=3):
    """inVitro/<n>/web/JPEG/web{1,2,10}.jpg and inSitu/<n>/video/video{1,2}.png"""
    for c in range(1, n_classes + 1):
        web = root / "inVitro" / str(c) / "web" / "JPEG"
        for i in (10, 2, 1):
            _noise(web / f"web{i}.jpg", 100 * c + i)
        (root / "inVitro" / str(c) / "web" / "PNG").mkdir(parents=True)
        for i in (1, 2):
            _noise(root / "inSitu" / str(c) / "video" / f"video{i}.png", 1000 * c + i)
    return root


def _class_folder_tree(root, classes=("cola", "milk", "tea"), per_class=2):
    for k, c in enumerate(classes):
        for i in range(per_class):
            _noise(root / "train" / c / f"{c}_{i}.jpg", 10 * k + i)
            _noise(root / "test" / c / f"{c}_q{i}.jpg", 500 + 10 * k + i)
    return root


# ---------------------------------------------------------------------------- loaders
def test_grocery_store_loader_on_real_data(grocery):
    ds = load_dataset("grocery-store", grocery)
    assert ds.split == "val" and len(ds.references) == 81 and len(ds.queries) == 296
    assert all(p.is_file() for p in ds.references.values())
    assert {q.label for q in ds.queries} <= set(ds.references)
    assert ds.groups["Granny-Smith"] == "Apple"
    # The repository root holding dataset/ is accepted too; a missing split names what exists.
    assert len(load_dataset("grocery-store", grocery.parent, "train").queries) == 2640
    with pytest.raises(DatasetError, match="have: train, val"):
        load_dataset("grocery-store", grocery, "test")


def test_grozi_loader_takes_lowest_numbered_web_image(tmp_path):
    ds = load_dataset("grozi-120", _grozi_tree(tmp_path / "grozi"))
    assert ds.classes == ["1", "2", "3"]
    assert [p.name for p in ds.references.values()] == ["web1.jpg"] * 3
    assert len(ds.queries) == 6 and {q.label for q in ds.queries} == {"1", "2", "3"}
    assert all(q.path.parent.name == "video" for q in ds.queries)
    with pytest.raises(DatasetError, match="one query split"):
        load_dataset("grozi-120", tmp_path / "grozi", "val")
    shutil.rmtree(tmp_path / "grozi" / "inSitu")
    with pytest.raises(DatasetError, match="inSitu"):
        load_dataset("grozi-120", tmp_path / "grozi")


@pytest.mark.parametrize("layout", ["capg-gp", "rp2k"])
def test_class_folder_loaders(tmp_path, layout):
    root = tmp_path / "ds"
    _class_folder_tree(root / "all" if layout == "rp2k" else root)
    ds = load_dataset(layout, root)
    assert ds.classes == ["cola", "milk", "tea"]
    assert [p.name for p in ds.references.values()] == ["cola_0.jpg", "milk_0.jpg", "tea_0.jpg"]
    assert len(ds.queries) == 6
    # A test class with no reference image is an error, not a silent zero.
    _noise((root / "all" if layout == "rp2k" else root) / "test" / "juice" / "j.jpg", 9)
    with pytest.raises(DatasetError, match="juice"):
        load_dataset(layout, root)


def test_loader_errors(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(DatasetError, match="no such dataset directory"):
        load_dataset("rp2k", tmp_path / "missing")
    with pytest.raises(DatasetError, match="train"):
        load_dataset("capg-gp", tmp_path)


def test_split_known_unknown_and_photos_csv(tmp_path):
    assert split_known_unknown(["a", "b", "c", "d", "e"]) == (["a", "c", "e"], ["b", "d"])
    groups = {"a": "g1", "b": "g1", "c": "g2", "d": "g3", "e": "g2"}
    assert split_known_unknown(list("abcde"), "coarse", groups) == (["a", "b", "d"], ["c", "e"])
    with pytest.raises(DatasetError):
        split_known_unknown(["a"])
    with pytest.raises(DatasetError, match="coarse group"):
        split_known_unknown(list("abc"), "coarse", {"a": "g"})
    p = tmp_path / "sub" / "photos.csv"
    p.parent.mkdir()
    p.write_text("image,sku,extra\nx.jpg,a,1\n")
    assert read_photos_csv(p)[0].path == p.parent / "x.jpg"
    p.write_text("image,sku\nx.jpg,\n")
    with pytest.raises(DatasetError, match=":2: empty"):
        read_photos_csv(p)


# ---------------------------------------------------------------------------- protocol
def test_top1_scores_by_hand():
    top1, avg, per = top1_scores(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert top1 == 0.75 and per == {"a": (1, 1), "b": (2, 3)}
    assert avg == pytest.approx((1 + 2 / 3) / 2)


def test_zero_shot_protocol_counts_exact_matches(tmp_path, tiny_clip_encoder):
    """Queries that are copies of their own class's reference are right (distance 0); copies of
    another class's reference are wrong: top-1 and the per-class average follow exactly."""
    root = _class_folder_tree(tmp_path / "ds", per_class=1)
    refs = {c: root / "train" / c / f"{c}_0.jpg" for c in ("cola", "milk", "tea")}
    # cola: both queries right; milk: 1 of 2 right; tea: 0 of 1 right.
    plan = {"cola": ["cola", "cola"], "milk": ["milk", "tea"], "tea": ["cola"]}
    shutil.rmtree(root / "test")
    for c, sources in plan.items():
        for i, s in enumerate(sources):
            (root / "test" / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(refs[s], root / "test" / c / f"q{i}.jpg")
    ds = load_dataset("capg-gp", root)
    res = evaluate_zero_shot(ds, tiny_clip_encoder, k=2, seed=0)
    assert res.top1 == pytest.approx(3 / 5)
    assert res.per_class_average == pytest.approx((1 + 0.5 + 0) / 3)
    assert res.per_class == {"cola": (2, 2), "milk": (1, 2), "tea": (0, 1)}
    assert res.to_dict()["classes"] == 3 and res.augmentations == 2


def test_zero_shot_grocery_store_real_encoder_reduced(grocery, mobilenet_encoder):
    """Real data, reduced: 8 GroceryStore classes with val photos (every 6th), 2 photos each, K = 2."""
    ds = load_dataset("grocery-store", grocery)
    with_photos = list(dict.fromkeys(q.label for q in ds.queries))[::6][:8]
    small = ds.limited(max_per_class=2)
    small = type(ds)(ds.name, ds.root, ds.split, {c: ds.references[c] for c in with_photos},
                     [q for q in small.queries if q.label in with_photos])
    res = evaluate_zero_shot(small, mobilenet_encoder, k=2)
    assert res.classes == 8 and res.queries == 16
    assert res.top1 > 0.25  # chance is 0.125
    assert 0 <= res.per_class_average <= 1


def test_cli_eval_json_with_catalog_encoder(tmp_path, capsys):
    d = tmp_path / "cat"
    opts = json.dumps(TINY_CLIP_OPTIONS["model_overrides"])
    assert main(["--catalog", str(d), "init", "--encoder", "open_clip:ViT-B-32", "--random-init",
                 "--augmentations", "2", "--encoder-option", f"model_overrides={opts}"]) == 0
    root = _grozi_tree(tmp_path / "grozi")
    capsys.readouterr()
    assert main(["--catalog", str(d), "eval", str(root), "--layout", "grozi-120", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "grozi-120" and out["classes"] == 3 and out["queries"] == 6
    assert out["augmentations"] == 2 and 0 <= out["top1"] <= 1
    assert sum(v["total"] for v in out["per_class"].values()) == 6
    assert main(["--catalog", str(d), "eval", str(root), "--layout", "grozi-120", "--max-classes", "2"]) == 0
    assert "2 classes, 4 images" in capsys.readouterr().out
    assert main(["--catalog", str(d), "eval", str(root), "--layout", "grozi-120", "--max-per-class", "0"]) == 1
    assert ">= 1" in capsys.readouterr().err
    assert main(["--catalog", str(d), "eval", str(tmp_path / "nope"), "--layout", "rp2k"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("catalog: error: ") and "\n" not in err
