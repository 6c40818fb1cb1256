"""Run part of a test in a fresh, spawned Python process.

Ray's driver lives in the process that calls ``ray.init``; when its local cluster misbehaves
(a raylet or GCS that a loaded 2-core machine starves past Ray's health checks) Ray may end
that process outright.  In a pytest-xdist worker that kills the worker, and pytest-xdist 3.8's
``--dist loadfile`` scheduler can then wait forever for the dead worker's tests
(pytest-dev/pytest-xdist#1323, #1371).  The Ray tests therefore run their Ray part through
:func:`run_isolated`: a crash there is one failed test with the child's exit code, never a dead
worker.
"""

from __future__ import annotations

import multiprocessing
import traceback
from collections.abc import Callable
from typing import Any

#: Longest a child may run before it is killed and the test fails (seconds).
DEFAULT_TIMEOUT_S = 900.0


def _child(conn, fn: Callable[..., Any], args: tuple) -> None:
    try:
        result = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        result = (False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    conn.send(result)
    conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """``fn(*args)`` in a spawned child process; returns its (picklable) result.

    ``fn`` must be a module-level function of an importable module (the child imports it).

    Raises:
        AssertionError: the child raised (the message carries its traceback), died without
            answering (its exit code or signal), or ran past ``timeout`` seconds (it is killed).
    """
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, fn, args), daemon=True)
    proc.start()
    sender.close()
    answered = False
    try:
        if not receiver.poll(timeout):
            raise AssertionError(f"isolated {fn.__name__} still running after {timeout:.0f} s: killed")
        try:
            ok, value = receiver.recv()
        except EOFError:
            proc.join(30)
            raise AssertionError(f"isolated {fn.__name__} died without a result (exit code {proc.exitcode}; "
                                 "negative = killed by that signal)") from None
        answered = True
        if not ok:
            raise AssertionError(f"isolated {fn.__name__} raised {value}")
        return value
    finally:
        receiver.close()
        if answered:
            proc.join(30)  # it is shutting down
        if proc.is_alive():
            proc.kill()
            proc.join()
