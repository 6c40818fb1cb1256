"""Exception hierarchy of retailklip.

Every error a user can cause (bad image, missing weights, ...; the catalog's own errors
— unknown SKU, read-only catalog, ... — are in :mod:`catalog.errors` and derive from it) is a subclass of
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


class EmptyCatalogError(RetailKlipError):
    """Recognition was asked of a gallery (catalog) that holds no SKU."""


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """``"TypeName: message"`` of an exception on one line (whitespace runs collapsed, the
    message cut at ``limit`` characters), to quote a library's error inside one of ours."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__
