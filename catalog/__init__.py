"""The SKU catalog (SQLAlchemy store of SKUs, reference images and vectors) and the ``catalog`` CLI."""

from .store import DEFAULT_THRESHOLD, AddedSKU, Catalog, SKUInfo, default_catalog_dir, validate_name, validate_sku_id

__all__ = ["DEFAULT_THRESHOLD", "AddedSKU", "Catalog", "SKUInfo", "default_catalog_dir", "validate_name", "validate_sku_id"]
