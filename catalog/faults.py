"""Deterministic crash and pause points for the reliability tests (``tests/test_crash.py``,
``tests/test_concurrency.py``).

Code that writes the catalog calls :func:`crash_point` with a name at each step where a crash
would leave a distinct on-disk state (e.g. ``"add.after_file"``: the image file is stored, the
database transaction not yet committed).  Two environment variables act on those points; when
neither is set the call is one dictionary lookup:

``RETAILKLIP_CRASH_AT=NAME``
    the process kills itself with ``SIGKILL`` on the spot: no ``finally`` block, ``atexit``
    handler or database rollback runs, as in a power cut or an OOM kill.  Several points may be
    given, separated by commas; ``NAME@N`` fires on the N-th time (1-based) the point is reached
    in this process, e.g. ``add.after_each_file@2`` (the second file of an import).

``RETAILKLIP_PAUSE_AT=NAME`` (with ``RETAILKLIP_PAUSE_FILE=PATH``)
    the process creates ``PATH.reached`` and waits until ``PATH`` exists (at most
    ``$RETAILKLIP_PAUSE_LIMIT`` seconds, default 120), then goes on.  A test uses it to run
    another writer exactly inside this one's critical section (if that writer is blocked by a
    lock this one holds, the limit ends the wait).  ``NAME@N`` works as above.

Never set these variables in production.
"""

from __future__ import annotations

import os
import signal
import time

CRASH_ENV = "RETAILKLIP_CRASH_AT"
PAUSE_ENV = "RETAILKLIP_PAUSE_AT"
PAUSE_FILE_ENV = "RETAILKLIP_PAUSE_FILE"
PAUSE_LIMIT_ENV = "RETAILKLIP_PAUSE_LIMIT"
#: Default longest wait at a pause point, in seconds (a test that never releases it must not hang).
PAUSE_LIMIT_S = 120.0

_hits: dict[tuple[str, str], int] = {}


def _armed(kind: str, name: str, spec: str) -> bool:
    for item in spec.split(","):
        target, _, nth = item.strip().partition("@")
        if target != name:
            continue
        if not nth:
            return True
        key = (kind, name)
        _hits[key] = _hits.get(key, 0) + 1
        try:
            return _hits[key] == int(nth)
        except ValueError:
            return False
    return False


def _pause(name: str) -> None:
    release = os.environ.get(PAUSE_FILE_ENV)
    if not release:
        return
    with open(release + ".reached", "w") as f:
        f.write(name)
    deadline = time.monotonic() + float(os.environ.get(PAUSE_LIMIT_ENV) or PAUSE_LIMIT_S)
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)


def crash_point(name: str) -> None:
    """Kill this process with ``SIGKILL`` if ``$RETAILKLIP_CRASH_AT`` names ``name``, or pause it
    if ``$RETAILKLIP_PAUSE_AT`` does (see module docstring); a cheap no-op otherwise."""
    env = os.environ
    crash = env.get(CRASH_ENV)
    if crash and _armed("crash", name, crash):
        os.kill(os.getpid(), signal.SIGKILL)
    pause = env.get(PAUSE_ENV)
    if pause and _armed("pause", name, pause):
        _pause(name)
