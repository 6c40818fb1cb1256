"""Hostile input: every kind of bad input the `catalog` CLI can be given, in one table.

Each kind runs as a real process (forked by tests/forkdriver.py, which pays the torch import once)
calling the CLI on its own copy of one small catalog.  For each: the exit code is 1 (2 for
command-line usage errors), stderr is ONE line ``catalog: error: ...`` naming the problem (no
traceback, no leaked file content), nothing hangs, and nothing is written: every table's rows,
every file under the catalog directory (images/, indexes/, ...) and the generation counter are
compared before and after.  Valid-but-odd inputs (CMYK, 16-bit, palette + transparency, EXIF
rotation, a corrupt EXIF block, a symbolic link to a real image, unicode ids and names) are
accepted and decoded right.  Hypothesis checks SKU ids and names over arbitrary unicode text.

The table is also docs/reliability.md's list of kinds tried.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from catalogcheck import check_consistent, db_snapshot, diff, run_driver, snapshot
from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from imagekinds import write_bad_files, write_odd_valid_files, write_special_files
from PIL import Image

TINY_INIT = ["init", "--encoder", TINY_CLIP_SPEC, "--augmentations", "2",
             "--encoder-option", f"model_overrides={json.dumps(TINY_CLIP_OPTIONS['model_overrides'])}"]
MARKER = "/tmp/retailklip_hostile_pwned"

# kind -> (argv template, expected exit code, regex the error line must match)
# Placeholders: {cat} the catalog copy, {new} a path where nothing exists, {bad:K} / {special:K}
# files of tests/imagekinds.py, {img} a valid image not in the catalog, {base0} the image of SKU
# base0, {csv:N} / {w:N} / {f:N} the CSV, weights and other files made by the fixture below.
CASES: dict[str, tuple[list[str], int, str]] = {
    # ---- images given to `add`
    "truncated_jpeg": (["add", "{bad:truncated_jpeg}", "--sku", "x"], 1, r"corrupt or truncated"),
    "zero_byte_file": (["add", "{bad:zero_bytes}", "--sku", "x"], 1, r"empty file"),
    "text_renamed_jpg": (["add", "{bad:text_as_jpg}", "--sku", "x"], 1, r"not a recognised image"),
    "random_bytes_png": (["add", "{bad:random_bytes}", "--sku", "x"], 1, r"not a recognised image"),
    "html_named_png": (["add", "{bad:html_as_png}", "--sku", "x"], 1, r"not a recognised image"),
    "svg_named_png": (["add", "{bad:svg_as_png}", "--sku", "x"], 1, r"not a recognised image"),
    "decompression_bomb_png_30000x30000": (["add", "{bad:bomb_png}", "--sku", "x"], 1, r"decompression bomb"),
    "jpeg_header_claims_65000x65000": (["add", "{bad:huge_header_jpeg}", "--sku", "x"], 1, r"decompression bomb"),
    "jpeg_header_only": (["add", "{bad:jpeg_header_only}", "--sku", "x"], 1, r"corrupt or truncated"),
    "png_bad_crc": (["add", "{bad:png_bad_crc}", "--sku", "x"], 1, r"not a recognised image|corrupt"),
    "truncated_png": (["add", "{bad:truncated_png}", "--sku", "x"], 1, r"corrupt or truncated"),
    "png_ztxt_zip_bomb": (["add", "{bad:png_text_bomb}", "--sku", "x"], 1, r"too large|corrupt"),
    "animated_gif": (["add", "{bad:animated_gif}", "--sku", "x"], 1, r"3 frames"),
    "animated_png": (["add", "{bad:animated_png}", "--sku", "x"], 1, r"3 frames"),
    "multipage_tiff": (["add", "{bad:multipage_tiff}", "--sku", "x"], 1, r"3 frames"),
    "directory_as_image": (["add", "{bad:directory}", "--sku", "x"], 1, r"is a directory"),
    "missing_file": (["add", "{bad:missing}", "--sku", "x"], 1, r"no such file"),
    "fifo_as_image": (["add", "{special:fifo}", "--sku", "x"], 1, r"not a regular file"),
    "dev_zero_as_image": (["add", "{special:dev_zero}", "--sku", "x"], 1, r"/dev/zero: not a regular file"),
    "dev_urandom_as_image": (["add", "{special:dev_urandom}", "--sku", "x"], 1, r"not a regular file"),
    "symlink_to_etc_passwd": (["add", "{special:symlink_to_passwd}", "--sku", "x"], 1, r"not a recognised image"),
    "symlink_to_dev_zero": (["add", "{special:symlink_to_dev_zero}", "--sku", "x"], 1, r"not a regular file"),
    "dangling_symlink": (["add", "{special:dangling_symlink}", "--sku", "x"], 1, r"no such file"),
    "symlink_loop": (["add", "{special:symlink_loop}", "--sku", "x"], 1, r"cannot read"),
    "newline_in_file_name": (["add", "{f:newline}"], 1, r"not allowed"),
    # ---- SKU ids and names
    "sku_with_slash": (["add", "{img}", "--sku", "a/b"], 1, r"not allowed"),
    "sku_dotdot": (["add", "{img}", "--sku", ".."], 1, r"not allowed"),
    "sku_dot": (["add", "{img}", "--sku", "."], 1, r"not allowed"),
    "sku_path_traversal": (["add", "{img}", "--sku", "../../etc/cron.d/x"], 1, r"not allowed"),
    "sku_backslash": (["add", "{img}", "--sku", "a\\b"], 1, r"not allowed"),
    "sku_nul": (["add", "{img}", "--sku", "a\x00b"], 1, r"not allowed"),
    "sku_ansi_escape": (["add", "{img}", "--sku", "\x1b[31mred"], 1, r"not allowed"),
    "sku_newline": (["add", "{img}", "--sku", "a\nb"], 1, r"not allowed"),
    "sku_10k_chars": (["add", "{img}", "--sku", "x" * 10_000], 1, r"10000 characters"),
    "sku_empty": (["add", "{img}", "--sku", ""], 1, r"non-empty"),
    "sku_padded": (["add", "{img}", "--sku", " x "], 1, r"not allowed"),
    "sku_undecodable_bytes": (["add", "{img}", "--sku", "\udcff\udcfe"], 1, r"SKU"),
    "sku_from_file_name_dot": (["add", "{f:dotstem}"], 1, r"not allowed"),
    "name_with_nul": (["add", "{img}", "--sku", "ok", "--name", "a\x00b"], 1, r"control characters"),
    "name_10k_chars": (["add", "{img}", "--sku", "ok", "--name", "n" * 10_000], 1, r"10000 characters"),
    "name_undecodable_bytes": (["add", "{img}", "--sku", "ok", "--name", "caf\udce9"], 1, r"name"),
    "duplicate_sku": (["add", "{img}", "--sku", "base0"], 1, r"already exists"),
    "image_already_a_reference": (["add", "{base0}", "--sku", "other"], 1, r"already a reference image of SKU 'base0'"),
    "append_to_unknown_sku": (["add", "{img}", "--sku", "nope", "--append"], 1, r"unknown SKU 'nope'"),
    # ---- CSV import
    "csv_missing_columns": (["import", "{csv:missing_columns}"], 1, r"missing column\(s\) image, sku"),
    "csv_not_utf8": (["import", "{csv:not_utf8}"], 1, r"not a UTF-8"),
    "csv_binary_garbage": (["import", "{csv:binary}"], 1, r"not a UTF-8|missing column|not a valid CSV"),
    "csv_row_outside_to_etc_passwd": (["import", "{csv:outside}"], 1, r"outside.csv:2: .*not a recognised image"),
    "csv_row_missing_file": (["import", "{csv:missing_file}"], 1, r"missing_file.csv:2: .*no such file"),
    "csv_row_is_fifo": (["import", "{csv:fifo_row}"], 1, r"fifo_row.csv:2: .*not a regular file"),
    "csv_duplicate_sku": (["import", "{csv:duplicate}"], 1, r"repeated in the CSV: dup"),
    "csv_sku_exists": (["import", "{csv:existing}"], 1, r"already exists"),
    "csv_header_only": (["import", "{csv:empty}"], 1, r"no rows"),
    "csv_zero_bytes": (["import", "{csv:zero}"], 1, r"missing column"),
    "csv_bad_row_among_good": (["import", "{csv:bad_row}"], 1, r"bad_row.csv:4: .*not a recognised image"),
    "csv_sku_with_nul": (["import", "{csv:nul}"], 1, r"nul.csv:2: .*not allowed"),
    "csv_field_over_csv_limit": (["import", "{csv:huge_field}"], 1, r"huge_field.csv"),
    "csv_is_directory": (["import", "{f:csvdir}"], 1, r"no such CSV file"),
    "csv_is_fifo": (["import", "{special:fifo}"], 1, r"no such CSV file"),
    # ---- recognize
    "recognize_negative_threshold": (["recognize", "{base0}", "--threshold", "-0.5"], 2, r"--threshold.*\[0, 2\]"),
    "recognize_nan_threshold": (["recognize", "{base0}", "--threshold", "nan"], 2, r"--threshold.*\[0, 2\]"),
    "recognize_inf_threshold": (["recognize", "{base0}", "--threshold", "inf"], 2, r"--threshold.*\[0, 2\]"),
    "recognize_text_threshold": (["recognize", "{base0}", "--threshold", "abc"], 2, r"--threshold"),
    "recognize_bad_image_among_good": (["recognize", "{base0}", "{bad:text_as_jpg}", "--json"], 1, r"not a recognised image"),
    "recognize_fifo": (["recognize", "{special:fifo}"], 1, r"not a regular file"),
    "recognize_dev_urandom": (["recognize", "{special:dev_urandom}"], 1, r"not a regular file"),
    # ---- weights and catalog creation
    "weights_pickle_carrying_code": ([*TINY_INIT, "--weights", "{w:evil}"], 1, r"pickle that carries code"),
    "weights_raw_pickle_carrying_code": ([*TINY_INIT, "--weights", "{w:evil_raw}"], 1, r"pickle|not a readable"),
    "weights_wrong_architecture": ([*TINY_INIT, "--weights", "{w:wrong_arch}"], 1, r"does not fit open_clip"),
    "weights_empty_file": ([*TINY_INIT, "--weights", "{w:empty}"], 1, r"is empty"),
    "weights_garbage_safetensors": ([*TINY_INIT, "--weights", "{w:garbage}"], 1, r"not a readable"),
    "weights_directory": ([*TINY_INIT, "--weights", "{f:csvdir}"], 1, r"not a regular file"),
    "weights_fifo": ([*TINY_INIT, "--weights", "{special:fifo}"], 1, r"not a regular file"),
    "init_over_existing_catalog": (["--catalog", "{cat}", *TINY_INIT, "--random-init"], 1, r"already holds a catalog"),
    "init_catalog_path_is_a_file": (["--catalog", "{bad:text_as_jpg}", *TINY_INIT, "--random-init"], 1, r"exists|not a directory"),
    "init_zero_augmentations": ([*TINY_INIT, "--random-init", "--augmentations", "0"], 1, r"augmentations"),
    "init_threshold_out_of_range": ([*TINY_INIT, "--random-init", "--threshold", "3"], 2, r"--threshold"),
    "init_threshold_nan": ([*TINY_INIT, "--random-init", "--threshold", "nan"], 2, r"--threshold"),
    # ---- other commands
    "remove_unknown_sku": (["remove", "nope"], 1, r"unknown SKU 'nope'"),
    "remove_sql_injection": (["remove", "base0' OR '1'='1"], 1, r"unknown SKU"),
    "remove_like_wildcard": (["remove", "%"], 1, r"unknown SKU"),
    "remove_path_like_id": (["remove", "../catalog.db"], 1, r"unknown SKU"),
    "catalog_dir_not_a_catalog": (["--catalog", "{f:csvdir}", "list"], 1, r"no catalog at"),
    "corrupt_database_file": (["--catalog", "{f:garbage_catalog}", "list"], 1, r"not a readable catalog database"),
}
#: Kinds whose command is `init`: the catalog given is {new} unless the argv names one.
INIT_KINDS = {k for k, (argv, _, _) in CASES.items() if "init" in argv}


@pytest.fixture(scope="module")
def files(tmp_path_factory, iconic, mobilenet_weights):
    """The base catalog (SKUs base0, base1; tiny random encoder, K=2) and every hostile file."""
    from catalog import Catalog

    work = tmp_path_factory.mktemp("hostile")
    base = work / "base"
    cat = Catalog.init(base, encoder=TINY_CLIP_SPEC, augmentations=2, random_init=True, encoder_options=TINY_CLIP_OPTIONS)
    cat.add(iconic[0][2], sku="base0")
    cat.add(iconic[1][2], sku="base1")
    cat.close()
    f = {"base": base, "work": work, "img": iconic[2][2], "base0": iconic[0][2]}
    f["bad"] = write_bad_files(iconic[0][2], work / "bad")
    f["special"] = write_special_files(iconic[5][2], work / "special")
    other = work / "other"
    other.mkdir()
    (other / "bad\nname.jpg").write_bytes(b"text, not an image")
    shutil.copy(iconic[2][2], other / "..jpg")
    (other / "dir.csv").mkdir()
    (other / "garbage_catalog").mkdir()
    (other / "garbage_catalog" / "catalog.db").write_bytes(b"this is not SQLite" * 100)
    f["f"] = {"newline": other / "bad\nname.jpg", "dotstem": other / "..jpg", "csvdir": other / "dir.csv",
              "garbage_catalog": other / "garbage_catalog"}
    f["csv"] = _write_csvs(work / "csv", iconic, f)
    f["w"] = _write_weights(work / "weights", mobilenet_weights)
    return f


def _write_csvs(d, iconic, f):
    d.mkdir()
    img = [os.path.relpath(iconic[i][2], d) for i in (2, 3, 4)]
    rows = {
        "missing_columns": "picture,name\na.jpg,n\n",
        "outside": "image,sku,name\n" + "../" * 12 + "etc/passwd,ok1,n\n",
        "missing_file": "image,sku\nnope.jpg,ok1\n",
        "fifo_row": f"image,sku\n{os.path.relpath(f['special']['fifo'], d)},ok1\n",
        "duplicate": f"image,sku\n{img[0]},dup\n{img[1]},dup\n",
        "existing": f"image,sku\n{img[0]},base0\n",
        "empty": "image,sku,name\n",
        "zero": "",
        "bad_row": f"image,sku\n{img[0]},ok1\n{img[1]},ok2\n{os.path.relpath(f['bad']['text_as_jpg'], d)},ok3\n",
        "nul": f"image,sku\n{img[0]},a\x00b\n",
        "huge_field": f"image,sku,name\n{img[0]},ok1,{'n' * 200_000}\n",
    }
    out = {}
    for name, text in rows.items():
        (d / f"{name}.csv").write_text(text, encoding="utf-8")
        out[name] = d / f"{name}.csv"
    (d / "not_utf8.csv").write_bytes(f"image,sku,name\n{img[0]},caf\xe9,n\n".encode("latin-1"))
    out["not_utf8"] = d / "not_utf8.csv"
    (d / "binary.csv").write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    out["binary"] = d / "binary.csv"
    return out


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _write_weights(d, mobilenet_weights):
    import torch

    d.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload()}, d / "evil.pt")
    (d / "evil_raw.pkl").write_bytes(pickle.dumps({"w": _Payload()}))
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.safetensors").write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {"evil": d / "evil.pt", "evil_raw": d / "evil_raw.pkl", "empty": d / "empty.pt",
            "garbage": d / "garbage.safetensors", "wrong_arch": mobilenet_weights}


def _expand(arg: str, f: dict, cat, new) -> str:
    def sub(m):
        key, _, sub_key = m.group(1).partition(":")
        if key == "cat":
            return str(cat)
        if key == "new":
            return str(new)
        v = f[key][sub_key] if sub_key else f[key]
        return str(v)

    return re.sub(r"\{([a-z0-9_]+(?::[a-z0-9_]+)?)\}", sub, arg)


@pytest.fixture(scope="module")
def hostile(files):
    """Run every kind in its own process on its own copy of the base catalog; returns kind ->
    (result, catalog copy, {new} path, snapshot before, snapshot after, file-target hash)."""
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    work = files["work"] / "runs"
    work.mkdir()
    before = snapshot(files["base"])
    jobs, meta = [], {}
    for n, (kind, (argv, _, _)) in enumerate(CASES.items()):
        cat = work / f"c{n:03d}"
        shutil.copytree(files["base"], cat)
        new = work / f"new{n:03d}"
        args = [_expand(a, files, cat, new) for a in argv]
        if args[0] != "--catalog":
            args = ["--catalog", str(new if kind in INIT_KINDS else cat), *args]
        jobs.append({"argvs": [args], "timeout": 60})
        meta[kind] = (cat, new)
    # Valid inputs through the CLI on one more copy: a symbolic link to a real image, unicode
    # ids and names, then `list --json`.
    ok = work / "accepted"
    shutil.copytree(files["base"], ok)
    img = files["special"]["symlink_to_image"]
    jobs.append({"argvs": [
        ["--catalog", str(ok), "add", str(img), "--sku", "linked"],
        ["--catalog", str(ok), "add", str(files["img"]), "--sku", UNICODE_ID, "--name", UNICODE_NAME],
        ["--catalog", str(ok), "list", "--json"],
    ], "timeout": 120})
    batch = 12
    steps = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
    results = [r for step in run_driver(steps) for r in step]
    out = {}
    for (kind, (cat, new)), r in zip(meta.items(), results):
        out[kind] = (r, cat, new, before, snapshot(cat))
    out["_accepted"] = (results[-1], ok)
    return out


UNICODE_ID = "äpple-🍎-金-שלום-\u200d-ß"
UNICODE_NAME = "Äpple Golden 金 \u202eRTL\u202c 👩‍👩‍👧 tab\there"


@pytest.mark.parametrize("kind", list(CASES))
def test_hostile_input_refused_with_one_line_and_nothing_written(hostile, files, kind):
    argv, rc, pattern = CASES[kind]
    r, _cat, new, before, after = hostile[kind]
    assert not r["hung"], f"{kind}: the command hung (killed after 60 s)"
    err = r["stderr"][0]
    assert r["rcs"] == [rc], f"{kind}: exit {r['rcs']} (signal {r['signal']}), stderr: {err[-2000:]}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if rc == 1:
        assert len(lines) == 1, f"{kind}: stderr is not one line: {err[-2000:]}"
    # (exit 2: argparse prints the usage, then one line "catalog COMMAND: error: ...")
    assert re.match(r"catalog( [a-z]+)?: error: ", lines[-1]), err
    assert re.search(pattern, lines[-1]), f"{kind}: {lines[-1]!r} does not match {pattern!r}"
    assert "root:x:0:0" not in err + r["stdout"][0], "file content leaked into the output"
    # Nothing written: every table, every file under the catalog, the generation.
    assert after == before, f"{kind} changed the catalog: {diff(before, after)}"
    if kind in INIT_KINDS and "{cat}" not in argv and "{bad:text_as_jpg}" not in argv:
        assert not new.exists(), f"{kind}: created {new}"
    if kind.startswith("weights_"):
        assert not os.path.exists(MARKER), "the pickled payload ran"


def test_bad_image_among_good_ones_still_answers_the_good_ones(hostile, files):
    r = hostile["recognize_bad_image_among_good"][0]
    out = json.loads(r["stdout"][0])
    assert [o["image"] for o in out] == [str(files["base0"])]
    assert out[0]["recognitions"][0]["sku"] == "base0"


def test_init_over_a_file_leaves_it_alone(hostile, files):
    p = files["bad"]["text_as_jpg"]
    assert p.is_file() and p.read_bytes().startswith(b"this is a text file")


def test_valid_inputs_through_the_cli(hostile, files):
    """A symbolic link to a real image is followed: its *bytes* are copied into the content-
    addressed store (the stored copy is a regular file, so the link may go away).  Unicode ids
    and names round-trip exactly through `list --json`."""
    r, ok = hostile["_accepted"]
    assert r["rcs"] == [0, 0, 0], r["stderr"]
    listed = {s["sku"]: s for s in json.loads(r["stdout"][2])}
    assert set(listed) == {"base0", "base1", "linked", UNICODE_ID}
    assert listed[UNICODE_ID]["name"] == UNICODE_NAME
    state = check_consistent(ok)
    assert not state["orphans"]
    from catalog import Catalog

    cat = Catalog.open(ok)
    stored = cat.reference_path("linked")[0]
    target = os.path.realpath(files["special"]["symlink_to_image"])
    assert not stored.is_symlink() and stored.read_bytes() == Path(target).read_bytes()
    assert stored.name.startswith(hashlib.sha256(stored.read_bytes()).hexdigest())
    assert cat.reference_path(UNICODE_ID)[0].name.startswith(hashlib.sha256(files["img"].read_bytes()).hexdigest())
    cat.close()


# --------------------------------------------------------------------------- library level
def test_catalog_directory_permissions(tmp_path, iconic):
    """The catalog directory is 0750 (no access for other users, even if it existed as 0777)
    and stored reference images are 0640; nothing in it is writable by group or others."""
    import stat

    from catalog import Catalog

    root = tmp_path / "perm"
    root.mkdir()
    os.chmod(root, 0o777)
    old = os.umask(0o022)
    try:
        cat = Catalog.init(root, encoder=TINY_CLIP_SPEC, augmentations=1, random_init=True, encoder_options=TINY_CLIP_OPTIONS)
        cat.add(iconic[3][2], sku="p")
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o750
    assert stat.S_IMODE(cat.reference_path("p")[0].stat().st_mode) == 0o640
    for p in root.rglob("*"):
        assert not stat.S_IMODE(p.stat().st_mode) & 0o022, f"{p} is writable by group or others"
    cat.close()


@pytest.fixture(scope="module")
def lib_catalog(tmp_path_factory):
    from catalog import Catalog

    cat = Catalog.init(tmp_path_factory.mktemp("lib") / "cat", encoder=TINY_CLIP_SPEC, augmentations=2,
                       random_init=True, encoder_options=TINY_CLIP_OPTIONS)
    yield cat
    cat.close()


ODD_KINDS = ["cmyk_jpeg", "grey16_png", "palette_transparency_png", "rgba_png", "la_png", "bilevel_png",
             "grey_jpeg", "exif_rotated_jpeg", "webp", "corrupt_exif_jpeg"]


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory, grocery):
    return write_odd_valid_files(grocery / "val/Fruit/Banana/Banana_001.jpg", tmp_path_factory.mktemp("odd"))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("kind", ODD_KINDS)
def test_odd_valid_images_are_accepted_and_recognised(lib_catalog, odd_files, kind):
    """Valid but unusual files are stored byte for byte under their content hash and recognised
    as themselves (pixel-level decoding of each kind: tests/test_images.py and below)."""
    from retailklip import Recognizer

    path, _mode = odd_files[kind]
    info = lib_catalog.add(path, sku=f"odd-{kind}")
    assert info.references == 1 and info.vectors == 2
    stored = lib_catalog.reference_path(f"odd-{kind}")[0]
    assert stored.read_bytes() == path.read_bytes()
    assert stored.stem == hashlib.sha256(path.read_bytes()).hexdigest()
    r = Recognizer(lib_catalog).recognize(path)[0]
    assert r.nearest_sku == f"odd-{kind}" and r.distance < 1e-4


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_odd_images_pixels(odd_files, grocery):
    """Pixel checks the generic decoding test leaves out: transparency kept where it is, a
    corrupt EXIF block ignored (pixels intact), EXIF rotation applied in the right direction."""
    from retailklip.images import load_image

    src = np.asarray(Image.open(grocery / "val/Fruit/Banana/Banana_001.jpg").convert("RGB").resize((96, 64)), np.float32)
    pal_path, _ = odd_files["palette_transparency_png"]
    raw = np.asarray(Image.open(pal_path))  # palette indices
    rgba = np.asarray(load_image(pal_path))
    assert ((rgba[..., 3] == 0) == (raw == 0)).all() and (rgba[..., 3][raw != 0] == 255).all()
    la = np.asarray(load_image(odd_files["la_png"][0]))
    assert (la[..., 3] == 255).all() and (la[..., 0] == la[..., 1]).all() and (la[..., 1] == la[..., 2]).all()
    ex = np.asarray(load_image(odd_files["corrupt_exif_jpeg"][0]), np.float32)
    assert ex.shape == (64, 96, 3) and np.abs(ex - src).mean() < 4.0
    rot = np.asarray(load_image(odd_files["exif_rotated_jpeg"][0]), np.float32)
    # Orientation 6 = the camera was turned 90 degrees clockwise: display = stored rotated clockwise.
    assert rot.shape == (96, 64, 3)
    assert np.abs(rot - np.rot90(src, k=-1)).mean() < 4.0
    assert np.abs(rot - np.rot90(src, k=1)).mean() > 4 * np.abs(rot - np.rot90(src, k=-1)).mean()


@pytest.fixture(scope="module")
def prop_image(tmp_path_factory):
    p = tmp_path_factory.mktemp("prop") / "p.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
    return p


TEXT = st.text(st.characters(exclude_categories=()), max_size=140)  # surrogates and controls included


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sku=TEXT | st.sampled_from(["..", ".", "a/b", "a\\b", " x", "x" * 129, "x" * 128, "ok"]),
       name=st.none() | TEXT | st.text(max_size=600))
@example(sku="\udcff", name=None)
@example(sku="ok", name="caf\udce9")
@example(sku="ǅ-𝔘-\u0301-\ufeff", name="\t\n")
def test_property_sku_ids_and_names(lib_catalog, prop_image, sku, name):
    """Any text as SKU id or name: either InvalidSKUError with nothing written, or the SKU is
    added, listed back with the exact id and name (library and `list --json`), stored under its
    content hash (never a name derived from the id), and removable."""
    from catalog.cli import main
    from catalog.skus import validate_name, validate_sku_id
    from catalog.errors import InvalidSKUError

    cat = lib_catalog
    for s in cat.list_skus():  # leftovers of the odd-image test
        cat.remove(s.sku)
    before = db_snapshot(cat.root)
    files_before = sorted(p.name for p in (cat.root / "images").rglob("*") if p.is_file())
    try:
        validate_sku_id(sku)
        validate_name(name)
        valid = True
    except InvalidSKUError:
        valid = False
    if not valid:
        with pytest.raises(InvalidSKUError):
            cat.add(prop_image, sku=sku, name=name)
        assert db_snapshot(cat.root) == before
        assert sorted(p.name for p in (cat.root / "images").rglob("*") if p.is_file()) == files_before
        return
    info = cat.add(prop_image, sku=sku, name=name)
    assert (info.sku, info.name) == (sku, name)
    assert [(s.sku, s.name) for s in cat.list_skus()] == [(sku, name)]
    stored = cat.reference_path(sku)
    assert len(stored) == 1
    rel = stored[0].relative_to(cat.root).as_posix()
    h = hashlib.sha256(prop_image.read_bytes()).hexdigest()
    assert rel == f"images/{h[:2]}/{h}.png"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--catalog", str(cat.root), "list", "--json"]) == 0
    assert [(s["sku"], s["name"]) for s in json.loads(buf.getvalue())] == [(sku, name)]
    cat.remove(sku)
    assert not stored[0].exists() and len(cat) == 0
