"""Schema versioning (catalog/schema.py, catalog/migrations): the migrated schema equals the
models on SQLite and PostgreSQL; catalogs made before schema versioning upgrade and keep their
rows; old and too-new schemas are refused with the remedy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
    text,
)
from sqlalchemy import (
    inspect as sa_inspect,
)
from sqlalchemy.exc import IntegrityError

from catalog import schema
from catalog.database import create_catalog_engine
from catalog.errors import CatalogError
from catalog.models import Base
from catalog.store import Catalog

REPO = Path(__file__).resolve().parents[1]

# The schema of catalogs made before schema versioning (catalog/models.py as of the first
# release, which created its tables with metadata.create_all), frozen here.
LEGACY = MetaData()
Table(
    "skus", LEGACY,
    Column("id", String(128), primary_key=True),
    Column("name", String(512)),
    Column("created", DateTime(timezone=True), nullable=False),
)
Table(
    "reference_images", LEGACY,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sku_id", ForeignKey("skus.id", ondelete="CASCADE"), index=True, nullable=False),
    Column("sha256", String(64), index=True, nullable=False),
    Column("filename", String(100), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
)
Table(
    "encoders", LEGACY,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(200), unique=True, nullable=False),
    Column("backend", String(20), nullable=False),
    Column("model", String(200), nullable=False),
    Column("weights", String(200), nullable=False),
    Column("dim", Integer, nullable=False),
    Column("preprocess", Text, nullable=False),
    Column("spec", String(300), nullable=False),
    Column("weights_path", Text),
    Column("options", Text, nullable=False),
    Column("center", LargeBinary),
    Column("created", DateTime(timezone=True), nullable=False),
)
Table(
    "embeddings", LEGACY,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("reference_id", ForeignKey("reference_images.id", ondelete="CASCADE"), index=True, nullable=False),
    Column("encoder_id", ForeignKey("encoders.id"), index=True, nullable=False),
    Column("view", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    UniqueConstraint("reference_id", "encoder_id", "view"),
)
Table(
    "catalog_state", LEGACY,
    Column("id", Integer, primary_key=True),
    Column("encoder_id", ForeignKey("encoders.id"), nullable=False),
    Column("augmentations", Integer, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("segmenter", String(100)),
    Column("segmenter_checkpoint", Text),
)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """An engine on an empty database, made the way the catalog makes it (SQLite pragmas)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_db_url")
    eng = create_catalog_engine(tmp_path, url)
    yield eng
    eng.dispose()


def differences(engine, metadata) -> list:
    with engine.connect() as c:
        return compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), metadata)


def test_revisions_are_one_linear_history():
    script = schema.script_directory()
    assert script.get_heads() == [schema.head_revision()] == ["0005"]
    assert [s.revision for s in script.walk_revisions()] == ["0005", "0004", "0003", "0002", "0001"]


def test_migrated_schema_equals_models(engine):
    assert schema.current_revision(engine) is None
    assert schema.ensure_current(engine) is None  # empty database: the caller reports "not initialised"
    assert schema.upgrade(engine) == (None, schema.head_revision())
    assert differences(engine, Base.metadata) == []
    assert schema.current_revision(engine) == schema.ensure_current(engine) == schema.head_revision()
    assert schema.upgrade(engine) == (schema.head_revision(), schema.head_revision())  # idempotent
    assert schema.is_initialised(engine)


def test_first_revision_is_the_legacy_schema(engine):
    schema.upgrade(engine, schema.LEGACY_REVISION)
    assert differences(engine, LEGACY) == []


def _fill_legacy(conn) -> dict[str, list[tuple]]:
    t = LEGACY.tables
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    conn.execute(insert(t["encoders"]), [dict(
        id=1, key="timm:m:abc", backend="timm", model="m", weights="sha256:abc", dim=4, preprocess="{}",
        spec="timm:m", weights_path="/w.safetensors", options="{}", center=np.arange(4, dtype=np.float32).tobytes(),
        created=now,
    )])
    conn.execute(insert(t["catalog_state"]), [dict(
        id=1, encoder_id=1, augmentations=2, seed=3, threshold=0.4, generation=7, segmenter=None,
        segmenter_checkpoint=None,
    )])
    conn.execute(insert(t["skus"]), [dict(id="4011", name="Bananas", created=now), dict(id="é/x", name=None, created=now)])
    conn.execute(insert(t["reference_images"]), [
        dict(id=1, sku_id="4011", sha256="a" * 64, filename="images/aa/a.jpg", size_bytes=10, width=5, height=6, created=now),
        dict(id=2, sku_id="é/x", sha256="b" * 64, filename="images/bb/b.png", size_bytes=11, width=7, height=8, created=now),
    ])
    conn.execute(insert(t["embeddings"]), [
        dict(id=10 + 2 * r + v, reference_id=r, encoder_id=1, view=v, vector=np.full(4, r + v / 10, np.float32).tobytes())
        for r in (1, 2) for v in (0, 1)
    ])
    return _rows(conn)


def _rows(conn) -> dict[str, list[tuple]]:
    return {
        name: [tuple(r) for r in conn.execute(select(*(c for c in tbl.c)).order_by(*tbl.primary_key.columns))]
        for name, tbl in LEGACY.tables.items()
    }


def test_legacy_catalog_is_stamped_and_upgraded_keeping_its_rows(engine):
    LEGACY.create_all(engine)
    with engine.begin() as c:
        before = _fill_legacy(c)
    assert schema.current_revision(engine) == schema.LEGACY_REVISION
    with pytest.raises(CatalogError, match=r"schema is at 0001, this retailklip needs 0005; run `catalog upgrade`"):
        schema.ensure_current(engine)
    assert schema.upgrade(engine) == ("0001", schema.head_revision())
    assert differences(engine, Base.metadata) == []
    with engine.connect() as c:
        assert _rows(c) == before
        assert c.execute(text("SELECT active_version_id FROM catalog_state")).all() == [(None,)]
        # thresholds stored before migration 0003 keep their meaning: a cosine distance
        assert c.execute(text("SELECT open_set_score FROM catalog_state")).all() == [("distance",)]
        assert c.execute(text("SELECT count(*) FROM index_versions")).scalar_one() == 0
        assert c.execute(text("SELECT count(*) FROM outlier_references")).scalar_one() == 0  # migration 0004
        # migration 0005: no unlabeled photos, hubness reduction off (plain 1-NN, as before)
        assert c.execute(text("SELECT hubness_k FROM catalog_state")).all() == [(0,)]
        assert c.execute(text("SELECT count(*) FROM encoders WHERE unlabeled IS NOT NULL")).scalar_one() == 0
    # Foreign keys survive SQLite's table copy: catalog_state.encoder_id must name an encoder.
    with pytest.raises(IntegrityError), engine.begin() as c:
        c.execute(text("UPDATE catalog_state SET encoder_id = 999"))
    with pytest.raises(IntegrityError), engine.begin() as c:
        c.execute(text("UPDATE catalog_state SET active_version_id = 999"))
    assert schema.ensure_current(engine) == schema.head_revision()


def test_unversioned_catalog_with_index_versions_is_stamped_head(engine):
    """A development catalog made with create_all from the current models."""
    Base.metadata.create_all(engine)
    assert schema.current_revision(engine) == "0005"
    assert schema.upgrade(engine) == ("0005", "0005")
    assert differences(engine, Base.metadata) == []


def test_behind_and_too_new_schemas_are_refused(engine):
    schema.upgrade(engine, "0001")
    with pytest.raises(CatalogError, match="run `catalog upgrade`"):
        schema.ensure_current(engine)
    schema.upgrade(engine)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    for call in (schema.ensure_current, schema.upgrade):
        with pytest.raises(CatalogError, match="schema is at 9999, which this retailklip does not know.*upgrade retailklip"):
            call(engine)


def test_unreadable_database_is_a_catalog_error(tmp_path):
    (tmp_path / "catalog.db").write_bytes(b"this is not a database" * 100)
    eng = create_catalog_engine(tmp_path, None)
    try:
        for call in (schema.current_revision, schema.ensure_current, schema.upgrade):
            with pytest.raises(CatalogError, match="catalog database|catalog schema"):
                call(eng)
    finally:
        eng.dispose()


@pytest.mark.slow
def test_wheel_ships_the_migrations(tmp_path):
    """A non-editable install has the migrations: build a wheel from a copy of the sources."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("catalog", "retailklip", "finetune"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("retailklip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = sorted(p.name for p in (REPO / "catalog" / "migrations" / "versions").glob("*.py"))
    expected = {"catalog/schema.py", "catalog/migrations/env.py", "catalog/migrations/script.py.mako"}
    expected |= {f"catalog/migrations/versions/{v}" for v in versions}
    assert expected <= names, sorted(expected - names)
    assert versions == ["0001_initial.py", "0002_index_versions.py", "0003_open_set_score.py",
                        "0004_outlier_references.py", "0005_hubness_reduction.py", "__init__.py"]


def test_failed_upgrade_changes_nothing(engine):
    """One transaction: a migration step that fails midway (here: 0002's second index, whose
    name is taken, after its table and first index were made) leaves the schema and the revision
    as they were."""
    schema.upgrade(engine, "0001")
    with engine.begin() as c:
        c.execute(text("CREATE INDEX ix_index_versions_status ON skus (name)"))
    with pytest.raises(CatalogError, match="cannot upgrade the catalog schema"):
        schema.upgrade(engine)
    assert schema.current_revision(engine) == "0001"
    with engine.connect() as c:
        assert "index_versions" not in sa_inspect(c).get_table_names()
    with engine.begin() as c:
        c.execute(text("DROP INDEX ix_index_versions_status"))
    assert schema.upgrade(engine) == ("0001", schema.head_revision())
    assert differences(engine, Base.metadata) == []
