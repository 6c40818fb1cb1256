"""Errors of the training side.

Every mistake a user can make on the command line (empty dataset, one class, eval classes that
were trained on, bad CSV) raises :class:`FinetuneError`, a :class:`~retailklip.errors.RetailKlipError`,
so ``python -m finetune`` prints it as one line and exits with status 1.
"""

from __future__ import annotations

from retailklip.errors import RetailKlipError


class FinetuneError(RetailKlipError, ValueError):
    """Bad training input or configuration; the message names the input and the remedy."""
