"""The SKU catalog (SQLAlchemy store of SKUs, reference images and vectors) and the ``catalog`` CLI."""

from .errors import CatalogError, DuplicateSKUError, InvalidSKUError, NoSpaceError, ReadOnlyCatalogError, UnknownSKUError
from .skus import AddedSKU, SKUInfo, validate_name, validate_sku_id
from .store import DEFAULT_THRESHOLD, Catalog, default_catalog_dir

__all__ = [
    "DEFAULT_THRESHOLD",
    "AddedSKU",
    "Catalog",
    "CatalogError",
    "DuplicateSKUError",
    "InvalidSKUError",
    "NoSpaceError",
    "ReadOnlyCatalogError",
    "SKUInfo",
    "UnknownSKUError",
    "default_catalog_dir",
    "validate_name",
    "validate_sku_id",
]
