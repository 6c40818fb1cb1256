"""Commands that need no model do not import torch (issue 12: imports at the depth they are
needed; `catalog list` took ~6 s, 5 of them importing torch, torchvision and timm)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from catalog.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "torchvision", "timm", "open_clip") if m in sys.modules)
print("HEAVY", ",".join(heavy), file=sys.stderr)
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory, iconic):
    from catalog import Catalog

    root = tmp_path_factory.mktemp("imports") / "cat"
    cat = Catalog.init(root, encoder=TINY_CLIP_SPEC, random_init=True, encoder_options=TINY_CLIP_OPTIONS)
    cat.add(iconic[0][2], sku="a")
    cat.close()
    return root


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["info"], ["versions"], ["check", "--quick"]])
def test_commands_without_a_model_do_not_import_torch(catalog_dir, argv):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", PROBE, "--catalog", str(catalog_dir), *argv], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    heavy = [ln for ln in r.stderr.splitlines() if ln.startswith("HEAVY")][-1]
    assert heavy == "HEAVY ", heavy


def test_library_imports_stay_light_until_used():
    code = ("import sys, retailklip, retailklip.errors, retailklip.encoders, retailklip.augment, retailklip.weights; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from retailklip import Recognizer, create_encoder; "
            "import retailklip.encoders as e; e.Encoder; assert 'torch' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]


def test_open_gallery_names_a_missing_opener():
    from retailklip.errors import RetailKlipError
    from retailklip.gallery import open_gallery

    with pytest.raises(RetailKlipError, match="no gallery opener 'nope' is installed"):
        open_gallery("/nonexistent", kind="nope")


def test_layering_contract_fails_on_a_back_import(tmp_path):
    """The import-linter contract CI checks (scripts/test.sh) passes on the tree and breaks on
    a deliberate import of the catalog from the library core."""
    import shutil

    for name in ("retailklip", "catalog", "finetune"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    lint = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
            "--no-cache"]
    ok = subprocess.run(lint, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert ok.returncode == 0 and "0 broken" in ok.stdout, ok.stdout[-2000:] + ok.stderr[-2000:]
    with open(tmp_path / "retailklip" / "matching.py", "a") as f:
        f.write("\nfrom catalog.store import Catalog  # deliberate back-import\n")
    broken = subprocess.run(lint, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert broken.returncode != 0, broken.stdout[-2000:]
    assert "retailklip.matching -> catalog.store" in broken.stdout
    # ... and on an upward import inside the catalog (a cycle in the making): the layers contract
    (tmp_path / "retailklip" / "matching.py").write_text((REPO / "retailklip" / "matching.py").read_text())
    with open(tmp_path / "catalog" / "reads.py", "a") as f:
        f.write("\nfrom catalog.check import check  # deliberate upward import\n")
    upward = subprocess.run(lint, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert upward.returncode != 0 and "catalog modules are layered BROKEN" in upward.stdout, upward.stdout[-2000:]
    assert "catalog.reads -> catalog.check" in upward.stdout
