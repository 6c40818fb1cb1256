"""Shared fixtures.  Real data and weights are read from ``../shared`` beside the repository;
their absence is an error (not a skip), so a run without them cannot pass silently."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# No hub is reachable here: make download attempts fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Exported decoder graphs (retailklip.segment.onnx_runtime) go to a cache of the test runs, not
# the user's ~/.cache; shared by the xdist workers (files are keyed by the weights' digest).
os.environ.setdefault("RETAILKLIP_CACHE", os.path.join(tempfile.gettempdir(), f"retailklip-test-cache-{os.getuid()}"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh runs one pytest worker per core: one torch thread each, no oversubscription,
    # and so do the processes a test starts (CLI runs, the loop, Ray's local cluster), which
    # inherit this environment.  A Ray test beside a process that takes the other core too
    # slowed from ~32 s to ~6 min here.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist: when a worker dies, say how much memory the machine had left, so a report
    tells the OOM killer (little left) from a crash (plenty left)."""
    if not error:
        return
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        avail, total = (int(info[k].split()[0]) // 1024 for k in ("MemAvailable", "MemTotal"))
        sys.stderr.write(f"\n[{node.gateway.id}] worker down ({error}); memory available {avail} MiB of {total} MiB\n")
    except (OSError, KeyError, ValueError):
        sys.stderr.write(f"\nworker down ({error}); /proc/meminfo unreadable\n")

SHARED = Path(os.environ.get("RETAILKLIP_SHARED", REPO.parent / "shared"))
GROCERY = SHARED / "data" / "grocery-store" / "dataset"
MOBILENET = SHARED / "models" / "mobilenetv2_100.imagenet.safetensors"
MOBILENET_SPEC = "timm:mobilenetv2_100"
# How the shared MobileNetV2 weights were checked (see ../shared/models/README.md).
MOBILENET_OPTIONS = {"interpolation": "bilinear"}

#: A tiny open_clip ViT (random init) for fast tests of the open_clip code path.
TINY_CLIP_SPEC = "open_clip:ViT-B-32"
TINY_CLIP_OPTIONS = {
    "model_overrides": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    }
}


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"test data missing: {path} (expected ../shared beside the repository)")
    return path


@pytest.fixture(scope="session")
def grocery() -> Path:
    return _require(GROCERY)


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    return _require(MOBILENET)


@pytest.fixture(scope="session")
def grocery_store(grocery):
    """The parsed GroceryStore files (retailklip.datasets.read_grocery_store)."""
    from retailklip.datasets import read_grocery_store

    return read_grocery_store(grocery)


def write_role_csv(path: Path, rows) -> Path:
    """A finetune CSV ``image,label,role`` with ``rows`` of (image, label, role); returns ``path``."""
    import csv

    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("image", "label", "role"), *rows])
    return path


@pytest.fixture(scope="session")
def finetune_csvs(tmp_path_factory, grocery_store) -> dict:
    """Small finetune inputs from real GroceryStore train photos: ``train`` (classes 0-2, 3 photos
    each), ``eval`` (classes 40-41: packshot + 2 photos each), and ``photos`` (label -> its train
    photo paths) and ``classes`` for tests that add their own CSVs."""
    root = tmp_path_factory.mktemp("finetune-csvs")
    photos: dict[str, list[Path]] = {}
    for p in grocery_store.photos("train"):
        photos.setdefault(p.label, []).append(p.path)
    classes = grocery_store.classes
    return {
        "train": write_role_csv(root / "train.csv", [(str(q), c.name, "query") for c in classes[0:3]
                                                     for q in photos[c.name][:3]]),
        "eval": write_role_csv(root / "eval.csv", [r for c in classes[40:42] for r in [
            (str(c.iconic), c.name, "reference"), *[(str(q), c.name, "query") for q in photos[c.name][:2]]]]),
        "photos": photos,
        "classes": classes,
    }


@pytest.fixture(scope="session")
def iconic(grocery_store) -> list[tuple[int, str, Path]]:
    """(class id, class name, iconic image path) for the 81 GroceryStore classes."""
    return [(c.fine_id, c.name, c.iconic) for c in grocery_store.classes]


@pytest.fixture(scope="session")
def val_photos(grocery_store) -> list[tuple[Path, int]]:
    """(photo path, class id) of the 296 GroceryStore val photos."""
    fine_id = {c.name: c.fine_id for c in grocery_store.classes}
    return [(p.path, fine_id[p.label]) for p in grocery_store.photos("val")]


@pytest.fixture(scope="session")
def mobilenet_encoder(mobilenet_weights):
    from retailklip import create_encoder

    return create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **MOBILENET_OPTIONS)


@pytest.fixture(scope="session")
def tiny_clip_encoder():
    from retailklip import create_encoder

    return create_encoder(TINY_CLIP_SPEC, random_init=True, **TINY_CLIP_OPTIONS)


@pytest.fixture()
def mobilenet_catalog(tmp_path, mobilenet_weights):
    """An empty catalog with the real MobileNetV2 encoder and K = 4 views."""
    from catalog import Catalog

    return Catalog.init(
        tmp_path / "cat", encoder=MOBILENET_SPEC, weights=mobilenet_weights, augmentations=4,
        encoder_options=MOBILENET_OPTIONS,
    )


@pytest.fixture()
def tiny_catalog(tmp_path):
    """An empty catalog with the tiny random open_clip encoder and K = 2 views."""
    from catalog import Catalog

    return Catalog.init(
        tmp_path / "tiny", encoder=TINY_CLIP_SPEC, augmentations=2, random_init=True, encoder_options=TINY_CLIP_OPTIONS,
    )


# ------------------------------------------------------------------ PostgreSQL
#: Set by scripts/test.sh, which starts a throwaway PostgreSQL server on 127.0.0.1.
PG_URL_ENV = "RETAILKLIP_TEST_PG_URL"


@pytest.fixture(scope="session")
def pg_url() -> str:
    """SQLAlchemy URL of the test PostgreSQL server (a role that may CREATE DATABASE).

    Unset is a failure, not a skip, so a run without PostgreSQL cannot pass silently; set
    ``RETAILKLIP_SKIP_PG=1`` to skip the PostgreSQL tests deliberately.
    """
    url = os.environ.get(PG_URL_ENV)
    if not url:
        if os.environ.get("RETAILKLIP_SKIP_PG") == "1":
            pytest.skip("RETAILKLIP_SKIP_PG=1: PostgreSQL tests skipped")
        pytest.fail(
            f"{PG_URL_ENV} is not set: run the tests with `bash scripts/test.sh`, which starts a throwaway "
            f"PostgreSQL server (or set RETAILKLIP_SKIP_PG=1 to skip the PostgreSQL tests)",
            pytrace=False,
        )
    return url


@pytest.fixture()
def pg_db_url(pg_url) -> str:
    """URL of a fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"retailklip_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request):
    """The database of a store test: None (the catalog's own SQLite file) or the URL of a fresh
    PostgreSQL database, so that one store test suite runs on both backends."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_db_url")


@pytest.fixture()
def store_catalog(tmp_path, backend_url):
    """An empty catalog on each backend (:func:`backend_url`) with the tiny random open_clip
    encoder and K = 2 views."""
    from catalog import Catalog

    cat = Catalog.init(
        tmp_path / "tiny", encoder=TINY_CLIP_SPEC, augmentations=2, random_init=True, encoder_options=TINY_CLIP_OPTIONS,
        db_url=backend_url,
    )
    yield cat
    cat.close()


# ------------------------------------------------------------------ shared helpers
@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on a CPU shared with other busy processes, torch's
    default (one thread per core) spends most of its time in OpenMP barriers (measured 100x
    slower for the tiny ViT); the results do not depend on it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_snapshot(cat) -> tuple:
    """Everything a failed write must leave unchanged, read through SQLAlchemy (SQLite or
    PostgreSQL): row counts of skus / reference_images / embeddings, stored files, generation."""
    from sqlalchemy import func, select

    from catalog.models import SKU, Embedding, ReferenceImage

    with cat.sessions() as s:
        counts = tuple(s.scalar(select(func.count()).select_from(t)) for t in (SKU, ReferenceImage, Embedding))
    files = sorted(str(p.relative_to(cat.root)) for p in (cat.root / "images").rglob("*") if p.is_file())
    return counts, files, cat.generation


@pytest.fixture(scope="module")
def sam_l0():
    """EfficientViT-SAM-L0, random init with perturbed norm / bias parameters (tests/samdecoder.py)."""
    from samdecoder import perturbed_l0

    return perturbed_l0()


@pytest.fixture(scope="module")
def sam_orange(sam_l0):
    """A predictor of ``sam_l0`` with a real photo (464 x 348) set."""
    from samdecoder import photo_predictor

    return photo_predictor(sam_l0)
