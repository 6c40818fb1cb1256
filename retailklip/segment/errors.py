"""Errors of the segmentation stage (subclasses of :class:`retailklip.errors.RetailKlipError`,
so the CLI prints them as one line; also ``ValueError`` for callers that expect one)."""

from __future__ import annotations

from ..errors import RetailKlipError


class UnknownSegmenterError(RetailKlipError, ValueError):
    """A segmenter name that is not registered (``list_segmenters()``) was given."""


class SegmenterOptionError(RetailKlipError, ValueError):
    """An invalid segmenter option: unusable device, out-of-range threshold, or a checkpoint
    given together with ``random_init``."""
