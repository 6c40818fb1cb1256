"""Errors of the SKU catalog (all :class:`retailklip.errors.RetailKlipError`, so the CLI prints
each as one line and POS software can catch one type).  Each message names the offending input
and, where one exists, the remedy."""

from __future__ import annotations

from retailklip.errors import RetailKlipError


class CatalogError(RetailKlipError):
    """The catalog directory or database is missing, uninitialised or inconsistent."""


class UnknownSKUError(CatalogError, KeyError):
    """An SKU id that is not in the catalog was named."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown SKU"


class DuplicateSKUError(CatalogError):
    """An SKU id that already exists was added again."""


class HubReferenceError(CatalogError):
    """A reference image appended to an SKU would take many of the catalog's unlabeled store
    photos from other SKUs (a hub); nothing was written (``catalog add --append --force`` appends
    it all the same)."""


class InvalidSKUError(CatalogError, ValueError):
    """An SKU id or name is malformed (empty, too long, control characters, path separators)."""


class ReadOnlyCatalogError(CatalogError):
    """A write was asked of a catalog this process cannot write (permissions, read-only mount)."""


class NoSpaceError(CatalogError):
    """The disk holding the catalog is full; the write was rolled back and nothing changed."""


class IndexFileError(CatalogError):
    """A version's index files are missing or do not match the database record."""


class RebuildError(CatalogError):
    """A rebuild failed; the previous version keeps serving (CLI exit code 1)."""

    exit_code = 1


class RebuildBusyError(RebuildError):
    """Another rebuild (or rollback, or check) holds the catalog's rebuild lock (exit code 3)."""

    exit_code = 3


class ValidationError(RebuildError):
    """The new index failed validation (kept as a failed version for inspection; exit code 4)."""

    exit_code = 4
