"""kill -9 at every stage of `catalog rebuild` (issue 5): recognition keeps working on the
previous version, the database stays consistent, and a rerun completes.

Each case runs the real CLI in a subprocess with ``RETAILKLIP_CRASH_AT`` naming a crash point
(:mod:`catalog.faults`), so the process dies by SIGKILL exactly there: no ``finally`` block,
no rollback, no cleanup.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from conftest import MOBILENET_SPEC, TINY_CLIP_OPTIONS, TINY_CLIP_SPEC

from catalog import Catalog
from retailklip import Recognizer

#: (crash point, whether the new version is active after the kill)
POINTS = [
    ("rebuild.started", False),          # version row 'building', nothing embedded
    ("rebuild.embedded_batch@2", False),  # some new vectors committed, not all
    ("rebuild.built", False),            # index built in memory, nothing on disk
    ("rebuild.written", False),          # version directory in place, database not switched
    ("rebuild.before_swap", False),      # caught up, about to switch
    ("rebuild.after_swap", True),        # switched, old versions not yet retired
]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, iconic):
    """A catalog of 7 real packshots on the tiny encoder, already rebuilt once (version 2)."""
    root = tmp_path_factory.mktemp("crash") / "cat"
    cat = Catalog.init(root, encoder=TINY_CLIP_SPEC, augmentations=2, random_init=True, encoder_options=TINY_CLIP_OPTIONS)
    for _c, name, path in iconic[:7]:
        cat.add(path, sku=name)
    cat.rebuild()
    cat.close()
    return root


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _consistent(cat: Catalog) -> None:
    con = sqlite3.connect(cat.root / "catalog.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA foreign_key_check").fetchall() == []
    con.close()
    k = cat.settings()["augmentations"]
    for info in cat.list_skus():
        assert info.references == 1 and info.vectors == k, info  # active encoder: every SKU complete
        assert all(p.is_file() for p in cat.reference_path(info.sku))
    active = [v for v in cat.versions() if v.active]
    assert len(active) == 1 and active[0].status == "ready"
    cat.load_index(active[0].id, verify=True)


@pytest.mark.parametrize("point,switched", POINTS, ids=[p for p, _ in POINTS])
def test_kill_during_rebuild(point, switched, seeded, tmp_path, iconic):
    root = _copy(seeded, tmp_path / "cat")
    before = Catalog.open(root)
    old_active = next(v for v in before.versions() if v.active)
    env = dict(os.environ, RETAILKLIP_CRASH_AT=point)
    cmd = [sys.executable, "-m", "catalog", "--catalog", str(root), "rebuild",
           "--encoder", MOBILENET_SPEC, "--random-init", "--keep", "2", "--batch", "2"]
    proc = subprocess.run(cmd + ["--index-type", "Flat"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    cat = Catalog.open(root)
    _consistent(cat)
    active = next(v for v in cat.versions() if v.active)
    assert (active.id != old_active.id) == switched
    # recognition keeps working, on whichever version is active, for every SKU
    rec = Recognizer(cat, threshold=2.0)
    assert rec.version == active.id
    for _c, name, path in iconic[:7]:
        r = rec.recognize(path)[0]
        assert r.sku == name and r.distance < 1e-4, (point, name, r)

    # a rerun completes (in-process: the same code path as the command), with no leftovers
    new = Catalog.open(root).rebuild(encoder=MOBILENET_SPEC, random_init=True, keep=2)
    cat = Catalog.open(root)
    assert next(v for v in cat.versions() if v.active).id == new.id
    _consistent(cat)
    statuses = {v.status for v in cat.versions()}
    assert "building" not in statuses
    assert not list((root / "indexes").glob(".v*.tmp-*"))
    on_disk = {p.name for p in (root / "indexes").iterdir()}
    assert on_disk == {v.path.split("/")[-1] for v in cat.versions() if v.status == "ready"}
