"""The catalog on a real PostgreSQL server (started by scripts/test.sh; see the ``pg_url`` fixture):
the same SQLAlchemy code as on SQLite, schema made by the Alembic migrations.  Each test gets a
fresh database (``pg_db_url``).  The store's own behaviour (add / append / remove / import,
all-or-nothing writes, concurrent writers) is one suite in tests/test_catalog.py that runs on
both backends (the ``backend_url`` fixture); this file holds what only PostgreSQL has (the URL in
``catalog.json``, migrations on a server, the CLI with ``--db-url``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC
from sqlalchemy import create_engine, text

from catalog import Catalog, schema
from catalog.cli import main
from retailklip import Recognizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def pg_catalog(tmp_path, pg_db_url, mobilenet_weights) -> Catalog:
    """An empty catalog on PostgreSQL with the real MobileNetV2 encoder and K = 2 views."""
    cat = Catalog.init(
        tmp_path / "cat", encoder=MOBILENET_SPEC, weights=mobilenet_weights, augmentations=2,
        encoder_options=MOBILENET_OPTIONS, db_url=pg_db_url,
    )
    yield cat
    cat.close()




def test_catalog_on_postgres_add_list_recognize_remove(pg_catalog, pg_db_url, iconic):
    cat = pg_catalog
    assert cat.engine.dialect.name == "postgresql"
    # The directory holds the images and the database URL; the rows are in PostgreSQL.
    assert json.loads((cat.root / "catalog.json").read_text()) == {"db_url": pg_db_url}
    assert not (cat.root / "catalog.db").exists()
    with cat.engine.connect() as c:  # init ran the migrations (and recorded the revision)
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [schema.head_revision()]
    picks = [iconic[0], iconic[20], iconic[40]]
    for cls, name, path in picks:
        info = cat.add(path, sku=f"sku-{cls}", name=name)
        assert (info.references, info.vectors) == (1, 2)
    assert [s.sku for s in cat.list_skus()] == sorted(f"sku-{c}" for c, _, _ in picks)
    engine = create_engine(pg_db_url)
    with engine.connect() as c:  # the rows really are on the server
        assert c.execute(text("SELECT count(*) FROM embeddings")).scalar_one() == 6
    engine.dispose()

    rec = Recognizer.open(cat.root)  # the URL comes from catalog.json
    try:
        assert rec.catalog.engine.dialect.name == "postgresql"
        for cls, name, path in picks:
            (r,) = rec.recognize(path)
            assert (r.sku, r.name) == (f"sku-{cls}", name) and r.distance < 1e-4
        cat.remove(f"sku-{picks[0][0]}")
        (r,) = rec.recognize(picks[0][2])  # the recognizer sees the removal at once
        assert r.nearest_sku != f"sku-{picks[0][0]}"
    finally:
        rec.catalog.close()
    again = Catalog.open(cat.root)
    assert [s.sku for s in again.list_skus()] == sorted(f"sku-{c}" for c, _, _ in picks[1:])
    again.close()


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "catalog", *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if check:
        assert p.returncode == 0, p.stderr
    return p


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (cheaper than a subprocess on 2 CPU cores)."""
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_with_db_url_end_to_end(tmp_path, pg_db_url, mobilenet_weights, iconic, capsys):
    d = str(tmp_path / "cat")
    # Separate processes (as in production): init, add, recognize.
    _cli("--catalog", d, "--db-url", pg_db_url, "init", "--encoder", MOBILENET_SPEC, "--weights", str(mobilenet_weights),
         "--encoder-option", "interpolation=bilinear", "--augmentations", "2")
    assert json.loads(Path(d, "catalog.json").read_text()) == {"db_url": pg_db_url}
    assert not Path(d, "catalog.db").exists()
    _cli("--catalog", d, "--db-url", pg_db_url, "add", str(iconic[0][2]), "--sku", "golden", "--name", "Golden Delicious")
    assert _main(capsys, "--catalog", d, "add", str(iconic[30][2]), "--sku", "other")[0] == 0  # URL from catalog.json
    out = json.loads(_cli("--catalog", d, "recognize", str(iconic[0][2]), "--json").stdout)
    r = out[0]["recognitions"][0]
    assert (r["sku"], r["name"], r["runner_up"]["sku"]) == ("golden", "Golden Delicious", "other") and r["distance"] < 1e-4
    rc, out, _ = _main(capsys, "--catalog", d, "--db-url", pg_db_url, "list", "--json")
    assert rc == 0 and [(s["sku"], s["vectors"]) for s in json.loads(out)] == [("golden", 2), ("other", 2)]
    rc, _, err = _main(capsys, "--catalog", d, "add", str(iconic[1][2]), "--sku", "golden")
    assert rc == 1 and err.startswith("catalog: error: ") and "golden" in err and "\n" not in err.strip()
    assert _main(capsys, "--catalog", d, "remove", "golden")[0] == 0
    rc, out, _ = _main(capsys, "--catalog", d, "list", "--json")
    assert [s["sku"] for s in json.loads(out)] == ["other"]
    engine = create_engine(pg_db_url)
    with engine.connect() as c:
        assert c.execute(text("SELECT id FROM skus")).scalars().all() == ["other"]
    engine.dispose()


def test_cli_upgrade_migrates_an_old_catalog(tmp_path, pg_db_url, mobilenet_weights, iconic, capsys):
    """A catalog whose database is at revision 0001 is refused until `catalog upgrade`, which
    keeps its SKUs."""
    from alembic import command

    cat = Catalog.init(tmp_path / "cat", encoder=MOBILENET_SPEC, weights=mobilenet_weights, augmentations=2,
                       encoder_options=MOBILENET_OPTIONS, db_url=pg_db_url)
    cat.add(iconic[0][2], sku="golden")
    cat.close()
    engine = create_engine(pg_db_url)
    with engine.begin() as c:
        command.downgrade(schema.alembic_config(c), "0001")
    assert schema.current_revision(engine) == "0001"
    d = str(tmp_path / "cat")
    rc, _, err = _main(capsys, "--catalog", d, "list")
    assert rc == 1 and "run `catalog upgrade`" in err, err
    assert _main(capsys, "--catalog", d, "upgrade")[0] == 0
    assert schema.current_revision(engine) == schema.head_revision()
    engine.dispose()
    rc, out, _ = _main(capsys, "--catalog", d, "list", "--json")
    assert rc == 0 and [s["sku"] for s in json.loads(out)] == ["golden"]
    assert _main(capsys, "--catalog", d, "upgrade")[0] == 0  # nothing to do: still fine
