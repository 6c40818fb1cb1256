import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_CLIP_OPTIONS
from imagekinds import write_bad_files

from catalog.cli import main


@pytest.fixture()
def cli_catalog(tmp_path, monkeypatch):
    d = tmp_path / "cat"
    opts = TINY_CLIP_OPTIONS["model_overrides"]
    rc = main(["--catalog", str(d), "init", "--encoder", "open_clip:ViT-B-32", "--random-init", "--augmentations", "2",
               "--threshold", "0.3", "--encoder-option", f"model_overrides={json.dumps(opts)}"])
    assert rc == 0
    return d


def test_cli_contract(cli_catalog, iconic, val_photos, capsys, tmp_path):
    d = str(cli_catalog)
    capsys.readouterr()
    assert main(["--catalog", d, "add", str(iconic[0][2]), "--sku", "golden", "--name", "Golden Delicious"]) == 0
    assert main(["--catalog", d, "add", str(iconic[10][2])]) == 0
    capsys.readouterr()
    assert main(["--catalog", d, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["sku"] for s in listed] == sorted(["golden", iconic[10][2].stem])
    photo = str(val_photos[0][0])
    assert main(["--catalog", d, "recognize", photo, str(iconic[0][2]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [photo, str(iconic[0][2])]
    r = out[1]["recognitions"][0]
    assert set(r) >= {"sku", "nearest_sku", "name", "distance", "runner_up", "bbox"}
    # The reference image itself is its own nearest neighbour, at distance ~0.
    assert r["sku"] == "golden" and r["nearest_sku"] == "golden" and r["distance"] < 1e-4
    assert r["name"] == "Golden Delicious" and r["runner_up"]["sku"] == iconic[10][2].stem
    assert main(["--catalog", d, "recognize", photo, "--threshold", "0", "--json"]) == 0
    r0 = json.loads(capsys.readouterr().out)[0]["recognitions"][0]
    assert r0["sku"] is None and r0["nearest_sku"] in ("golden", iconic[10][2].stem)
    assert main(["--catalog", d, "remove", "golden"]) == 0
    assert main(["--catalog", d, "info", "--json"]) == 0
    assert "skus" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["truncated_jpeg", "zero_bytes", "text_as_jpg", "bomb_png", "directory", "missing", "animated_gif"])
def test_cli_bad_images_one_line_error_nothing_written(cli_catalog, iconic, tmp_path, capsys, kind):
    bad = write_bad_files(iconic[0][2], tmp_path / "bad")[kind]
    d = str(cli_catalog)
    before = sorted(os.listdir(cli_catalog / "images")), (cli_catalog / "catalog.db").stat().st_size
    capsys.readouterr()
    assert main(["--catalog", d, "add", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("catalog: error: ") and "\n" not in err
    assert main(["--catalog", d, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert sorted(os.listdir(cli_catalog / "images")) == before[0]


def test_cli_errors(cli_catalog, tmp_path, capsys, iconic):
    d = str(cli_catalog)
    assert main(["--catalog", d, "remove", "nope"]) == 1
    assert "unknown SKU 'nope'" in capsys.readouterr().err
    assert main(["--catalog", d, "recognize", str(iconic[0][2])]) == 1
    assert "holds no SKU" in capsys.readouterr().err
    assert main(["--catalog", str(tmp_path / "none"), "list"]) == 1
    assert "no catalog at" in capsys.readouterr().err
    assert main(["--catalog", str(tmp_path / "w"), "init", "--encoder", "timm:mobilenetv2_100",
                 "--weights", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "--weights" in err
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit) as e:
        main(["--catalog", d, "init", "--threshold", "3"])
    assert e.value.code == 2


def test_console_script_and_env_catalog(cli_catalog, iconic, tmp_path):
    """The installed `catalog` entry point, with the catalog taken from $RETAILKLIP_CATALOG."""
    env = dict(os.environ, RETAILKLIP_CATALOG=str(cli_catalog))
    exe = [sys.executable, "-m", "catalog"]
    r = subprocess.run(exe + ["add", str(iconic[3][2]), "--sku", "pink"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(exe + ["recognize", str(iconic[3][2]), "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["recognitions"][0]["sku"] == "pink"
    r = subprocess.run(exe + ["add", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "is a directory" in r.stderr


def test_cli_recognize_with_segmenter_saves_segments(cli_catalog, iconic, tmp_path, capsys):
    d = str(cli_catalog)
    assert main(["--catalog", d, "add", str(iconic[0][2]), "--sku", "golden"]) == 0
    out_dir = tmp_path / "crops"
    capsys.readouterr()
    assert main(["--catalog", d, "recognize", str(iconic[0][2]), "--segment", "whole-image",
                 "--save-segments", str(out_dir), "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)[0]["recognitions"]
    assert len(recs) == 1 and recs[0]["sku"] == "golden"
    saved = sorted(p.name for p in out_dir.iterdir())
    assert saved == [f"{iconic[0][2].stem}_segment_0.png"]
    assert main(["--catalog", d, "recognize", str(iconic[0][2]), "--segment", "no-such-segmenter"]) == 1
    assert "no-such-segmenter" in capsys.readouterr().err


def test_malformed_key_value_option_is_a_usage_error(tmp_path, capsys):
    import pytest

    from retailklip.weights import KeyValueError, parse_key_value

    with pytest.raises(SystemExit) as e:
        main(["--catalog", str(tmp_path / "c"), "init", "--encoder-option", "no-equals-sign"])
    assert e.value.code == 2
    assert "argument --encoder-option: expected KEY=VALUE, got 'no-equals-sign'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError):
        parse_key_value("=1")
    assert issubclass(KeyValueError, ValueError)
    assert parse_key_value("crop_pct=1.0") == ("crop_pct", 1.0) and parse_key_value("m=bilinear") == ("m", "bilinear")


def test_cli_recognize_a_directory(cli_catalog, iconic, tmp_path, capsys):
    """A directory stands for the images under it (recursive, sorted; other files skipped), as
    for ``outliers add``; an empty one is one error line."""
    import shutil

    d = str(cli_catalog)
    assert main(["--catalog", d, "add", str(iconic[0][2]), "--sku", "golden"]) == 0
    assert main(["--catalog", d, "add", str(iconic[10][2]), "--sku", "other"]) == 0
    photos = tmp_path / "photos"
    (photos / "shelf 2").mkdir(parents=True)
    shutil.copy(iconic[10][2], photos / "b.jpg")
    shutil.copy(iconic[0][2], photos / "shelf 2" / "a.jpg")
    (photos / "notes.txt").write_text("not a photo")
    capsys.readouterr()
    assert main(["--catalog", d, "recognize", str(photos), str(iconic[0][2]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [str(photos / "b.jpg"), str(photos / "shelf 2" / "a.jpg"), str(iconic[0][2])]
    assert [o["recognitions"][0]["sku"] for o in out] == ["other", "golden", "golden"]
    (tmp_path / "empty").mkdir()
    assert main(["--catalog", d, "recognize", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"catalog: error: {tmp_path / 'empty'}: no images found"
