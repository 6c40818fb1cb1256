"""Helpers of the reliability tests (test_hostile, test_concurrency, test_crash): a snapshot of
everything a catalog directory holds, and a consistency check.  Both read the SQLite database
with :mod:`sqlite3` directly, independent of ``catalog.store``'s own code, so a bug there cannot
hide itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
#: The database's own files; their bytes change on reads too (WAL checkpoints), so snapshots
#: compare the database's *content* instead.
DB_FILES = {"catalog.db", "catalog.db-wal", "catalog.db-shm", "catalog.db-journal"}
_STORED_NAME = re.compile(r"^images/([0-9a-f]{2})/([0-9a-f]{64})\.[a-z]{2,4}$")


def connect(root: Path) -> sqlite3.Connection:
    con = sqlite3.connect(Path(root) / "catalog.db", timeout=60)
    con.execute("PRAGMA busy_timeout=60000")
    return con


def tables(con: sqlite3.Connection) -> list[str]:
    return [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def db_snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """table -> (row count, SHA-256 of all its rows): every table, including ones added later."""
    con = connect(root)
    try:
        out = {}
        for t in tables(con):
            rows = sorted(repr(r) for r in con.execute(f'SELECT * FROM "{t}"'))
            out[t] = (len(rows), hashlib.sha256("\n".join(rows).encode("utf-8", "backslashreplace")).hexdigest())
        return out
    finally:
        con.close()


def tree_snapshot(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under the catalog directory (images/, indexes/,
    catalog.json, ...) except the database files; directories as ``"<dir>"``."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "<dir>"
        for f in filenames:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if rel in DB_FILES:
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def generation(root: Path) -> int:
    con = connect(root)
    try:
        return int(con.execute("SELECT generation FROM catalog_state WHERE id = 1").fetchone()[0])
    finally:
        con.close()


def snapshot(root: Path) -> dict:
    """Everything a refused command must leave unchanged: every table's rows, every file under
    the directory (images/, indexes/, ...), and the generation counter."""
    root = Path(root)
    if not (root / "catalog.db").exists():
        return {"exists": root.exists(), "tree": tree_snapshot(root) if root.exists() else {}}
    return {"db": db_snapshot(root), "tree": tree_snapshot(root), "generation": generation(root)}


def diff(before: dict, after: dict) -> str:
    """A short description of what changed between two snapshots ('' when nothing did)."""
    parts = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            parts.append(f"{key}: {', '.join(changed[:6])}")
        else:
            parts.append(f"{key}: {a!r} -> {b!r}")
    return "; ".join(parts)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_consistent(root: Path) -> dict:
    """Check the invariants a catalog must keep whatever happened to the process writing it.

    * ``PRAGMA integrity_check`` is ``ok`` and no foreign key dangles;
    * every SKU has at least one reference image (no half-added SKU);
    * every reference row's stored file exists, is a regular file (not a link), holds exactly the
      bytes whose SHA-256 the row records, and is named ``images/ab/<sha256>.<ext>``;
    * every reference has exactly K vectors (views 0..K-1) of the active encoder, each ``dim``
      float32s;
    * every ``ready`` index version's directory holds its index file with the recorded SHA-256,
      and the active version is ``ready``.

    Files under images/ that no row names (left by a crash between storing the file and the
    commit) are allowed: nothing reads them.  They are returned as ``orphans``.

    Returns:
        ``{"skus": [...], "references": n, "orphans": [...], "tmp_files": [...]}``

    Raises:
        AssertionError: listing every broken invariant.
    """
    root = Path(root)
    con = connect(root)
    problems = []
    try:
        ic = con.execute("PRAGMA integrity_check").fetchall()
        if ic != [("ok",)]:
            problems.append(f"integrity_check: {ic[:3]}")
        fk = con.execute("PRAGMA foreign_key_check").fetchall()
        if fk:
            problems.append(f"foreign_key_check: {fk[:3]}")
        enc_id, k = con.execute("SELECT encoder_id, augmentations FROM catalog_state WHERE id = 1").fetchone()
        dim = con.execute("SELECT dim FROM encoders WHERE id = ?", (enc_id,)).fetchone()[0]
        skus = [r[0] for r in con.execute("SELECT id FROM skus ORDER BY id")]
        refs = con.execute("SELECT id, sku_id, sha256, filename, size_bytes FROM reference_images").fetchall()
        with_refs = {r[1] for r in refs}
        for s in skus:
            if s not in with_refs:
                problems.append(f"SKU {s!r} has no reference image (half-added)")
        referenced = set()
        for rid, sku, sha, filename, size in refs:
            referenced.add(filename)
            m = _STORED_NAME.match(filename)
            if not m or m.group(2) != sha or m.group(1) != sha[:2]:
                problems.append(f"reference {rid} of {sku!r}: stored name {filename!r} is not images/ab/<sha256>.<ext>")
            p = root / filename
            if p.is_symlink() or not p.is_file():
                problems.append(f"reference {rid} of {sku!r}: stored file {filename} missing (item lost)")
            else:
                data = p.read_bytes()
                if hashlib.sha256(data).hexdigest() != sha or len(data) != size:
                    problems.append(f"reference {rid} of {sku!r}: stored file {filename} does not hold the recorded bytes")
            views = con.execute(
                "SELECT view, length(vector) FROM embeddings WHERE reference_id = ? AND encoder_id = ? ORDER BY view",
                (rid, enc_id),
            ).fetchall()
            if [v for v, _ in views] != list(range(k)):
                problems.append(f"reference {rid} of {sku!r}: views {[v for v, _ in views]} instead of 0..{k - 1}")
            if any(n != 4 * dim for _, n in views):
                problems.append(f"reference {rid} of {sku!r}: a vector is not {dim} float32s")
        dangling = con.execute(
            "SELECT count(*) FROM embeddings e LEFT JOIN reference_images r ON e.reference_id = r.id WHERE r.id IS NULL"
        ).fetchone()[0]
        if dangling:
            problems.append(f"{dangling} embeddings without a reference image")
        if "index_versions" in tables(con):
            cols = {r[1] for r in con.execute("PRAGMA table_info(catalog_state)")}
            active = con.execute("SELECT active_version_id FROM catalog_state WHERE id = 1").fetchone()[0] if "active_version_id" in cols else None
            for vid, status, path, sha in con.execute("SELECT id, status, path, index_sha256 FROM index_versions"):
                if vid == active and status != "ready":
                    problems.append(f"active index version {vid} has status {status!r}")
                if status == "ready" and path:
                    f = root / path / "index.faiss"
                    if not f.is_file():
                        problems.append(f"ready index version {vid}: {path}/index.faiss missing")
                    elif sha and sha256_file(f) != sha:
                        problems.append(f"ready index version {vid}: {path}/index.faiss does not match its recorded SHA-256")
    finally:
        con.close()
    present = {str(p.relative_to(root)) for p in (root / "images").rglob("*") if p.is_file()}
    orphans = sorted(f for f in present - referenced if not Path(f).name.startswith(".tmp-"))
    tmp_files = sorted(f for f in present if Path(f).name.startswith(".tmp-"))
    assert not problems, f"{root}: " + "; ".join(problems)
    return {"skus": skus, "references": len(refs), "orphans": orphans, "tmp_files": tmp_files}


def recognizes_itself(root: Path) -> dict[str, str]:
    """Open a Recognizer on the catalog and recognise each SKU's stored reference image; returns
    SKU -> the SKU recognised (must be itself)."""
    from catalog import Catalog
    from retailklip import Recognizer

    cat = Catalog.open(root)
    try:
        rec = Recognizer(cat, threshold=2.0)
        out = {}
        for info in cat.list_skus():
            r = rec.recognize(cat.reference_path(info.sku)[0])[0]
            out[info.sku] = r.nearest_sku
        return out
    finally:
        cat.close()


# --------------------------------------------------------------------------- fork driver
def run_driver(steps: list[list[dict]], timeout: float = 600) -> list[list[dict]]:
    """Run CLI jobs in real, separate processes through ``tests/forkdriver.py``, which imports
    torch and the catalog once and forks one child per job (see there for the job format);
    returns one result per job, in the same nesting."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("RETAILKLIP_CRASH_AT", None)
    env.pop("RETAILKLIP_PAUSE_AT", None)
    r = subprocess.run(
        [sys.executable, str(TESTS / "forkdriver.py")], input=json.dumps({"steps": steps}), capture_output=True,
        text=True, timeout=timeout, env=env, cwd=REPO, check=False,
    )
    assert r.returncode == 0, f"fork driver failed ({r.returncode}): {r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])["steps"]
