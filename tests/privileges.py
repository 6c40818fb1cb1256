"""Running a test command without root's permission overrides (read-only catalog tests)."""

from __future__ import annotations

import os
import shutil


def no_override() -> list[str] | None:
    """A command prefix that runs without root's permission overrides: ``[]`` when not root,
    ``setpriv`` dropping ``CAP_DAC_OVERRIDE`` / ``CAP_DAC_READ_SEARCH`` as root, None when that is
    not possible (no ``setpriv``)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
    return None
