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
