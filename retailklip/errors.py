"""Exception hierarchy of retailklip.

Every error a user can cause (bad image, unknown SKU, missing weights, ...) is a subclass of
:class:`RetailKlipError`, so the CLI can print it as one line and exit non-zero, and POS software
can catch one type.  Each message names the offending input and, where one exists, the remedy.
"""

from __future__ import annotations


class RetailKlipError(Exception):
    """Base class of all errors raised on bad input or bad configuration."""


class InvalidImageError(RetailKlipError, ValueError):
    """A file is not a decodable image: missing, 0-byte, truncated, corrupt, not an image,
    a directory, or larger than the decompression-bomb limit."""


class WeightsError(RetailKlipError):
    """Model weights are missing, unreadable, unsafe (pickled code), or of the wrong architecture."""


class WeightsUnavailableError(WeightsError):
    """Pretrained weights would have to be downloaded and no network (or hub cache) is available."""


class EncoderMismatchError(RetailKlipError):
    """Vectors made by one encoder were about to be compared or mixed with another encoder's."""


class CatalogError(RetailKlipError):
    """The catalog directory or database is missing, uninitialised or inconsistent."""


class EmptyCatalogError(CatalogError):
    """Recognition was asked of a catalog that holds no SKU."""


class UnknownSKUError(CatalogError, KeyError):
    """An SKU id that is not in the catalog was named."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown SKU"


class DuplicateSKUError(CatalogError):
    """An SKU id that already exists was added again."""


class InvalidSKUError(CatalogError, ValueError):
    """An SKU id or name is malformed (empty, too long, control characters, path separators)."""


class ReadOnlyCatalogError(CatalogError):
    """A write was asked of a catalog this process cannot write (permissions, read-only mount)."""


class NoSpaceError(CatalogError):
    """The disk holding the catalog is full; the write was rolled back and nothing changed."""
