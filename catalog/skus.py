"""SKU ids and display names: what is allowed, the one normal form they are stored in, and how
an SKU is listed (:class:`SKUInfo`, and :class:`AddedSKU` for what ``add`` returns)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from .errors import InvalidSKUError, UnknownSKUError
from .models import NAME_MAX, SKU, SKU_ID_MAX

# ASCII (C0, DEL) and 8-bit (C1, U+0080-U+009F: e.g. U+009B, the CSI escape introducer that
# terminals obey) control characters.
_SKU_RE = re.compile(r"^[^\x00-\x1f\x7f-\x9f/\\]+$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates (how Python passes undecodable bytes of file names
    and arguments), which no database can store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_sku_id(sku: str) -> str:
    """Check an SKU id and return it in Unicode NFC: 1-128 characters, no control characters
    (ASCII C0 and DEL, NUL included, and the 8-bit C1 range U+0080-U+009F), no ``/`` or
    ``\\``, not ``.`` or ``..``, no leading/trailing whitespace.  NFC makes "café" typed with a
    combining accent (NFD, as macOS file names have it) and with a precomposed "é" one SKU.

    Raises:
        InvalidSKUError: with the reason.
    """
    if not isinstance(sku, str) or not sku:
        raise InvalidSKUError("SKU id must be a non-empty string")
    if not _is_utf8(sku):
        raise InvalidSKUError(f"SKU id {sku[:40]!r} is not valid Unicode text (undecodable bytes in a file name or argument?)")
    sku = unicodedata.normalize("NFC", sku)
    if len(sku) > SKU_ID_MAX:
        raise InvalidSKUError(f"SKU id is {len(sku)} characters long; the limit is {SKU_ID_MAX}")
    if not _SKU_RE.match(sku) or sku in (".", "..") or sku != sku.strip():
        raise InvalidSKUError(
            f"SKU id {sku[:40]!r} is not allowed: no control characters, '/', '\\', '.' or '..', "
            f"and no leading or trailing spaces"
        )
    return sku


def validate_name(name: str | None) -> str | None:
    """Check a display name and return it in Unicode NFC: at most 512 characters, no control
    characters (C0, DEL, C1) except tab and newline.

    Raises:
        InvalidSKUError: with the reason.
    """
    if name is None:
        return None
    if not _is_utf8(name):
        raise InvalidSKUError("SKU name is not valid Unicode text (undecodable bytes?)")
    name = unicodedata.normalize("NFC", name)
    if len(name) > NAME_MAX:
        raise InvalidSKUError(f"SKU name is {len(name)} characters long; the limit is {NAME_MAX}")
    if _CONTROL_RE.search(name):
        raise InvalidSKUError("SKU name contains control characters")
    return name


@dataclass(frozen=True)
class SKUInfo:
    """An SKU as listed by :meth:`Catalog.list_skus`."""

    sku: str
    name: str | None
    created: datetime
    references: int
    vectors: int

    def to_dict(self) -> dict:
        return {
            "sku": self.sku,
            "name": self.name,
            "created": self.created.isoformat(),
            "references": self.references,
            "vectors": self.vectors,
        }


#: A new reference image is a hub when it takes more than this many times an average SKU's share
#: of the catalog's unlabeled store photos from other SKUs (the share: photos / SKUs).  Set before
#: measuring.  On GroceryStore's train split (capture-session folds, main job, CSLS), one-SKU fixes
#: of 2 in-store photos appended one ``add --append`` at a time: both photos refused in 342 of 383
#: fixes, and the fixes cost other SKUs 0.1 photos of a fold on average instead of 25.4 unchecked;
#: 38 of 383 new SKUs' packshots are flagged (they cost 2.3 photos against 0.6):
#: benchmarks/bench_csls_store_fix.py --product-check, docs/evaluation.md "More references per SKU".
HUB_SHARE = 2.0

#: ... but never below this fraction of the photos checked: with more SKUs than photos an SKU's
#: share is under one photo, and a reference that takes back one or two misrecognised photos of
#: its own product would count as a hub (found in review; set by that reasoning, not measured:
#: no catalog of thousands of SKUs is at hand).
HUB_MIN_FRACTION = 0.01

#: At most this many of the stored unlabeled photos (an even sample) are matched per ``add``, so
#: its cost stays bounded (440 photos, CSLS, 2 cores: 60 ms on 1,000 vectors, 92 ms on 10,000,
#: 0.53 s on 100,000; benchmarks/bench_hubness.py).
STORE_PHOTOS_CHECKED = 512


def hub_limit(photos: int, skus: int) -> float:
    """Photos a new reference image may take from other SKUs before it is a hub:
    ``max(HUB_SHARE * photos / skus, HUB_MIN_FRACTION * photos)``."""
    return max(HUB_SHARE * photos / max(skus, 1), HUB_MIN_FRACTION * photos)


@dataclass(frozen=True)
class StorePhotosTaken:
    """What a new reference image does to the catalog's unlabeled store photos (``catalog init
    --center-photos``): how many it would take from other SKUs (their nearest SKU would become
    its SKU).

    Attributes:
        taken: photos taken from other SKUs.
        photos: photos checked (at most :data:`STORE_PHOTOS_CHECKED`).
        limit: :data:`HUB_SHARE` times the photos per SKU (SKUs after the add), at least
            :data:`HUB_MIN_FRACTION` of the photos (:func:`hub_limit`).
    """

    taken: int
    photos: int
    limit: float

    @property
    def hub(self) -> bool:
        """More photos taken than :attr:`limit`: other products' photos would be recognised as
        this SKU."""
        return self.taken > self.limit

    def to_dict(self) -> dict:
        return {"taken": self.taken, "photos": self.photos, "limit": round(self.limit, 3), "hub": self.hub}


@dataclass(frozen=True)
class AddedSKU(SKUInfo):
    """What :meth:`Catalog.add` returns: the SKU's :class:`SKUInfo` plus the other SKUs its new
    reference image could be confused with.

    Attributes:
        confusable_with: :class:`retailklip.matching.Neighbour` s (SKU id, cosine distance in
            [0, 2] from the new reference image's embedding to that SKU's nearest vector) of the
            other SKUs within the catalog's threshold, nearest first (at most 2: the 1-NN and
            the runner-up).  Non-empty means photos of either SKU may be recognised as the
            other: a near-duplicate SKU (the same product added twice) or siblings that need
            more reference images.
        store_photos: the :class:`StorePhotosTaken` by the new reference image, or None when
            the catalog keeps no unlabeled store photos.
    """

    confusable_with: tuple = ()
    store_photos: StorePhotosTaken | None = None

    def to_dict(self) -> dict:
        return dict(super().to_dict(), confusable_with=[{"sku": n.sku, "distance": round(n.distance, 6)}
                                                        for n in self.confusable_with],
                    store_photos=None if self.store_photos is None else self.store_photos.to_dict())


@dataclass(frozen=True)
class ImportedSKU:
    """One SKU of what :meth:`Catalog.import_csv` wrote.

    Attributes:
        sku: the SKU id.
        references: reference images imported for it (rows of the CSV).
        store_photos: the :class:`StorePhotosTaken` by its new reference image(s), or None when
            the catalog keeps no unlabeled store photos.  A new SKU is counted against the
            catalog as it was before the import; with ``append``, every SKU's new images are
            counted together, against the catalog the whole import makes.
    """

    sku: str
    references: int
    store_photos: StorePhotosTaken | None = None

    def to_dict(self) -> dict:
        return {"sku": self.sku, "references": self.references,
                "store_photos": None if self.store_photos is None else self.store_photos.to_dict()}


@dataclass(frozen=True)
class ReferenceImageInfo:
    """One stored reference image of an SKU, as listed by :meth:`Catalog.reference_images`.

    Attributes:
        sku: the SKU id.
        sha256: SHA-256 (hex) of the image file's bytes: what identifies it (``remove --reference``).
        path: the catalog's stored copy of the file (absolute).
        width, height: pixels, as decoded (EXIF orientation applied).
        created: when it was added.
    """

    sku: str
    sha256: str
    path: Path
    width: int
    height: int
    created: datetime

    def to_dict(self) -> dict:
        return {"sku": self.sku, "sha256": self.sha256, "path": str(self.path), "width": self.width,
                "height": self.height, "created": self.created.isoformat()}


def id_forms(sku: str) -> list[str]:
    """The forms an SKU id given by a user may be stored in: NFC (how ids are stored since they
    are normalised) and, for catalogs from before that, the text as given."""
    forms = [unicodedata.normalize("NFC", sku)] if isinstance(sku, str) and _is_utf8(sku) else []
    return forms + [sku] if sku not in forms else forms


def find_sku(s: Session, sku: str) -> SKU:
    """The SKU row of a user-given id (:func:`id_forms`).  Raises :class:`UnknownSKUError`."""
    for form in id_forms(sku):
        row = s.get(SKU, form)
        if row is not None:
            return row
    raise UnknownSKUError(f"unknown SKU {sku!r}")
