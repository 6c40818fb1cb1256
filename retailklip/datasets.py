"""Dataset layouts for evaluation and calibration: one reference image per class + labelled photos.

Every loader returns a :class:`ZeroShotDataset`: ``references`` (class -> the ONE reference image
the RetailKLIP zero-shot protocol builds its gallery from) and ``queries`` (labelled photos to
recognise).  Supported directory layouts (``LAYOUTS``), each documented in ``docs/evaluation.md``:

``grocery-store`` (GroceryStore, Klasson et al., WACV 2019)::

    ROOT/classes.csv        Class Name, Class ID, Coarse Class Name, Coarse Class ID,
                            Iconic Image Path, Product Description Path
    ROOT/{train,val,test}.txt   "path, fine_id, coarse_id" per line, paths relative to ROOT
    ROOT/iconic-images-and-descriptions/...   the iconic image per class (= the reference)

  ROOT is the repository's ``dataset/`` folder (the repository root holding it is accepted too).

``grozi-120`` (Grozi-120, Merler et al., CVPR 2007 workshop)::

    ROOT/inVitro/<n>/web/JPEG/web<i>.jpg   web packshots; the lowest-numbered one is the reference
    ROOT/inSitu/<n>/video/video<i>.png     crops from store videos (the queries)

``capg-gp`` (CAPG-GP, Geng et al., ACM MM 2018) and ``rp2k`` (RP2K, Peng et al., 2020): class
folders, the first image (natural sort by name) of ``train/<class>/`` is the reference, every image
of ``test/<class>/`` is a query::

    ROOT/train/<class>/*.jpg       (RP2K: ROOT/all/train/...; ROOT may also be the all/ folder)
    ROOT/test/<class>/*.jpg

Also :func:`read_photos_csv` for the ``image,sku`` CSV that ``catalog calibrate`` reads, and
:func:`split_known_unknown`, the deterministic known/unknown class split of the open-set study.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RetailKlipError
from .images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


class DatasetError(RetailKlipError):
    """A dataset directory or CSV does not have the expected layout (names the missing piece)."""


@dataclass(frozen=True)
class LabelledImage:
    """An image path and its class (SKU) id."""

    path: Path
    label: str


@dataclass(frozen=True)
class ZeroShotDataset:
    """One reference image per class plus labelled query photos.

    Attributes:
        name: layout name, e.g. ``"grocery-store"``.
        root: the dataset directory.
        split: which query split was loaded (e.g. ``"val"``).
        references: class id -> path of its single reference image, in class order.
        queries: the labelled query photos; every label is a key of ``references``.
        groups: class id -> coarse group (GroceryStore's coarse class); empty where none exists.
    """

    name: str
    root: Path
    split: str
    references: dict[str, Path]
    queries: list[LabelledImage]
    groups: dict[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """Class ids in the dataset's order."""
        return list(self.references)

    def limited(self, max_classes: int | None = None, max_per_class: int | None = None) -> ZeroShotDataset:
        """A smaller copy: the first ``max_classes`` classes (gallery and queries) and at most
        ``max_per_class`` queries per class (first ones in file order)."""
        keep = self.classes[:max_classes] if max_classes else self.classes
        keep_set, seen, queries = set(keep), {}, []
        for q in self.queries:
            if q.label in keep_set and (max_per_class is None or seen.get(q.label, 0) < max_per_class):
                seen[q.label] = seen.get(q.label, 0) + 1
                queries.append(q)
        return ZeroShotDataset(
            self.name, self.root, self.split, {c: self.references[c] for c in keep}, queries,
            {c: g for c, g in self.groups.items() if c in keep_set},
        )


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers numerically (``web2`` before ``web10``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: natural_key(p.name),
    )


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: no such directory ({what})")
    return path


# ---------------------------------------------------------------------------- GroceryStore
@dataclass(frozen=True)
class GroceryClass:
    """One GroceryStore fine class (a row of ``classes.csv``).

    Attributes:
        name: fine class name (``Golden-Delicious``), the class id everywhere else.
        fine_id: ``Class ID``; ``coarse_name`` / ``coarse_id``: its coarse class (``Apple``).
        iconic: path of its iconic packshot (the reference image).
    """

    name: str
    fine_id: int
    coarse_name: str
    coarse_id: int
    iconic: Path


@dataclass(frozen=True)
class GroceryStore:
    """The GroceryStore files (Klasson et al., WACV 2019), parsed: :func:`read_grocery_store`.

    Attributes:
        root: the ``dataset/`` folder; ``classes``: the fine classes in ``classes.csv`` order.
    """

    root: Path
    classes: list[GroceryClass]

    def photos(self, split: str) -> list[LabelledImage]:
        """The photos of ``<split>.txt`` (``"path, fine_id, coarse_id"`` lines), labelled with
        fine class names, in file order.

        Raises:
            DatasetError: no such split file (names the splits there are), a malformed line.
        """
        split_file = self.root / f"{split}.txt"
        if not split_file.is_file():
            have = sorted(p.stem for p in self.root.glob("*.txt"))
            raise DatasetError(f"{self.root}: no split {split!r} ({split_file.name} missing; have: {', '.join(have) or 'none'})")
        by_id = {c.fine_id: c.name for c in self.classes}
        out = []
        for n, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = [x.strip() for x in line.split(",")]
            try:
                out.append(LabelledImage(self.root / parts[0], by_id[int(parts[1])]))
            except (IndexError, ValueError, KeyError):
                raise DatasetError(f"{split_file}:{n}: expected 'path, fine_id, coarse_id' with a class id of classes.csv") from None
        return out


def read_grocery_store(root: str | os.PathLike) -> GroceryStore:
    """Parse GroceryStore's ``classes.csv`` (the one parser of it; layout in the module docstring).

    Args:
        root: the dataset's ``dataset/`` folder, or the repository root holding it.

    Raises:
        DatasetError: no classes.csv, a row with fewer than 5 columns or a non-integer id, a
            missing iconic image.
    """
    root = Path(root)
    if not (root / "classes.csv").is_file() and (root / "dataset" / "classes.csv").is_file():
        root = root / "dataset"
    classes_csv = root / "classes.csv"
    if not classes_csv.is_file():
        raise DatasetError(f"{root}: no classes.csv (expected the GroceryStore dataset/ folder)")
    with open(classes_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    classes = []
    for n, r in enumerate(rows, start=2):
        if not r:
            continue
        try:
            c = GroceryClass(r[0].strip(), int(r[1]), r[2].strip(), int(r[3]), root / r[4].strip().lstrip("/"))
        except (IndexError, ValueError):
            raise DatasetError(f"{classes_csv}:{n}: expected at least 5 columns with integer class ids") from None
        if not c.iconic.is_file():
            raise DatasetError(f"{classes_csv}:{n}: iconic image {c.iconic} missing")
        classes.append(c)
    return GroceryStore(root, classes)


def load_grocery_store(root: str | os.PathLike, split: str = "val") -> ZeroShotDataset:
    """GroceryStore: iconic image per fine class = reference; ``<split>.txt`` photos = queries.

    Class ids are the fine class names (``Golden-Delicious``); ``groups`` maps them to the coarse
    class names (``Apple``).

    Raises:
        DatasetError: missing classes.csv / split file, malformed lines, missing iconic image.
    """
    store = read_grocery_store(root)
    references = {c.name: c.iconic for c in store.classes}
    groups = {c.name: c.coarse_name for c in store.classes}
    return ZeroShotDataset("grocery-store", store.root, split, references, store.photos(split), groups)


# ---------------------------------------------------------------------------- Grozi-120
def load_grozi120(root: str | os.PathLike, split: str = "test") -> ZeroShotDataset:
    """Grozi-120: the lowest-numbered in-vitro web image of each product = reference; every
    in-situ video crop = query.  Class ids are the product folder numbers (``"1"`` .. ``"120"``).

    Args:
        split: only ``"test"`` (Grozi-120 has no other query split).

    Raises:
        DatasetError: missing inVitro/inSitu, a product without a web image, or no queries.
    """
    root = Path(root)
    if split != "test":
        raise DatasetError(f"grozi-120 has one query split, 'test' (in-situ crops), not {split!r}")
    vitro = _need_dir(root / "inVitro", "Grozi-120 in-vitro web images")
    situ = _need_dir(root / "inSitu", "Grozi-120 in-situ video crops")
    references: dict[str, Path] = {}
    queries: list[LabelledImage] = []
    for product in sorted((p for p in vitro.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        web = product / "web" / "JPEG"
        images = _images_in(web) if web.is_dir() else []
        if not images:
            raise DatasetError(f"{web}: no web image for product {product.name}")
        references[product.name] = images[0]
        video = situ / product.name / "video"
        if video.is_dir():
            queries += [LabelledImage(p, product.name) for p in _images_in(video)]
    if not references:
        raise DatasetError(f"{vitro}: no product folders")
    if not queries:
        raise DatasetError(f"{situ}: no query images (expected inSitu/<n>/video/*.png)")
    return ZeroShotDataset("grozi-120", root, split, references, queries)


# ---------------------------------------------------------------------------- class folders
def _load_class_folders(name: str, root: Path, split: str) -> ZeroShotDataset:
    train = _need_dir(root / "train", f"{name} reference images, train/<class>/")
    test = _need_dir(root / split, f"{name} query images, {split}/<class>/")
    references: dict[str, Path] = {}
    for folder in sorted((p for p in train.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        images = _images_in(folder)
        if images:
            references[folder.name] = images[0]
    if not references:
        raise DatasetError(f"{train}: no class folder with an image")
    queries: list[LabelledImage] = []
    missing = []
    for folder in sorted((p for p in test.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        images = _images_in(folder)
        if images and folder.name not in references:
            missing.append(folder.name)
        queries += [LabelledImage(p, folder.name) for p in images]
    if missing:
        raise DatasetError(f"{test}: class(es) without a reference image in train/: {', '.join(missing[:5])}")
    if not queries:
        raise DatasetError(f"{test}: no query images (expected {split}/<class>/*.jpg)")
    return ZeroShotDataset(name, root, split, references, queries)


def load_capg_gp(root: str | os.PathLike, split: str = "test") -> ZeroShotDataset:
    """CAPG-GP in class folders: ``train/<class>/`` (first image = reference), ``test/<class>/``
    (queries).  Raises :class:`DatasetError` on a missing folder or a class without reference."""
    return _load_class_folders("capg-gp", Path(root), split)


def load_rp2k(root: str | os.PathLike, split: str = "test") -> ZeroShotDataset:
    """RP2K: ``all/train/<class>/`` (first image = reference) and ``all/test/<class>/`` (queries);
    ROOT may be the folder holding ``all/`` or ``all/`` itself.  Raises :class:`DatasetError`."""
    root = Path(root)
    if (root / "all").is_dir() and not (root / "train").is_dir():
        root = root / "all"
    return _load_class_folders("rp2k", root, split)


#: layout name -> (loader, default query split)
LAYOUTS: dict[str, tuple[Callable[..., ZeroShotDataset], str]] = {
    "grocery-store": (load_grocery_store, "val"),
    "grozi-120": (load_grozi120, "test"),
    "capg-gp": (load_capg_gp, "test"),
    "rp2k": (load_rp2k, "test"),
}


def load_dataset(layout: str, root: str | os.PathLike, split: str | None = None) -> ZeroShotDataset:
    """Load a dataset directory of a named layout (see module docstring).

    Args:
        layout: one of :data:`LAYOUTS`.
        root: the dataset directory.
        split: query split (default: ``val`` for GroceryStore, ``test`` otherwise).

    Raises:
        DatasetError: unknown layout, missing directory, or a malformed layout.
    """
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not Path(root).is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    loader, default_split = LAYOUTS[layout]
    ds = loader(root, split or default_split)
    logger.info("loaded %s %s: %d classes, %d queries", layout, ds.split, len(ds.references), len(ds.queries))
    return ds


# ---------------------------------------------------------------------------- open-set helpers
def split_known_unknown(
    classes: Sequence[str], rule: str = "alternate", groups: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Deterministic known / unknown halves of a class list, for open-set studies.

    Args:
        classes: class ids in the dataset's order (GroceryStore: fine class id order).
        rule: ``"alternate"``: classes at even positions are known (in the catalog), odd ones
            unknown, so every coarse group (e.g. apples) has known and unknown members: the hard
            case of a new variety of a familiar product.  ``"coarse"``: whole coarse groups
            alternate (groups in order of first appearance; even positions known): an unknown
            photo shows a kind of product the catalog has none of.
        groups: class id -> coarse group, required by ``"coarse"``.

    Returns:
        ``(known, unknown)`` class id lists, each in ``classes`` order.

    Raises:
        DatasetError: unknown rule, fewer than 2 classes (or groups), or a class without group.
    """
    if len(classes) < 2:
        raise DatasetError("a known/unknown split needs at least 2 classes")
    if rule == "alternate":
        return list(classes[0::2]), list(classes[1::2])
    if rule == "coarse":
        missing = [c for c in classes if not groups or c not in groups]
        if missing:
            raise DatasetError(f"split rule 'coarse' needs a coarse group for every class; none for {missing[0]!r}")
        order = list(dict.fromkeys(groups[c] for c in classes))
        if len(order) < 2:
            raise DatasetError("split rule 'coarse' needs at least 2 coarse groups")
        known_groups = set(order[0::2])
        return [c for c in classes if groups[c] in known_groups], [c for c in classes if groups[c] not in known_groups]
    raise DatasetError(f"unknown split rule {rule!r}; choose 'alternate' or 'coarse'")


def read_csv_rows(path: str | os.PathLike, required: Sequence[str], header: str) -> list[tuple[int, dict[str, str]]]:
    """Rows of a labelled-image CSV: a header row, UTF-8 (a BOM is allowed), column names and
    cells stripped; the one reader of ``catalog calibrate``'s ``image,sku`` photos and the
    finetune's ``image,label[,role]`` data (image paths are relative to the CSV's folder).

    Args:
        path: the CSV file.
        required: columns that must exist and be non-empty in every row.
        header: the expected header, for the error message (e.g. ``"image,sku"``).

    Returns:
        ``(line number, {column: cell})`` per row, in file order.

    Raises:
        DatasetError: missing file, missing columns, no rows, an empty required cell, not UTF-8
            or not CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [(c or "").strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in cols]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; expected {header}")
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a UTF-8 CSV file") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a valid CSV file ({e})") from None
    if not rows:
        raise DatasetError(f"{path}: no rows")
    for n, r in enumerate(rows, start=2):
        if not all(r.get(c) for c in required):
            raise DatasetError(f"{path}:{n}: empty {' or '.join(required)}")
    return list(enumerate(rows, start=2))


def read_photos_csv(path: str | os.PathLike) -> list[LabelledImage]:
    """Read an ``image,sku`` CSV of labelled photos (:func:`read_csv_rows`; other columns are ignored).

    Returns:
        One :class:`LabelledImage` per row, in file order.

    Raises:
        DatasetError: as :func:`read_csv_rows`.
    """
    path = Path(path)
    return [LabelledImage(path.parent / r["image"], r["sku"]) for _n, r in read_csv_rows(path, ("image", "sku"), "image,sku")]
