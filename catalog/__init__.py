"""The SKU catalog (SQLAlchemy store of SKUs, reference images and vectors) and the ``catalog`` CLI."""

from .errors import CatalogError, DuplicateSKUError, InvalidSKUError, NoSpaceError, ReadOnlyCatalogError, UnknownSKUError
from .outliers import OutlierInfo, UnknownOutlierError
from .skus import AddedSKU, ImportedSKU, ReferenceImageInfo, SKUInfo, validate_name, validate_sku_id
from .store import DEFAULT_THRESHOLD, Catalog, default_catalog_dir

__all__ = [
    "DEFAULT_THRESHOLD",
    "AddedSKU",
    "ImportedSKU",
    "Catalog",
    "CatalogError",
    "DuplicateSKUError",
    "InvalidSKUError",
    "NoSpaceError",
    "OutlierInfo",
    "ReadOnlyCatalogError",
    "ReferenceImageInfo",
    "SKUInfo",
    "UnknownOutlierError",
    "UnknownSKUError",
    "default_catalog_dir",
    "validate_name",
    "validate_sku_id",
]
