"""Run part of a test in a fresh, spawned Python process.

Ray's driver lives in the process that calls ``ray.init``; when its local cluster misbehaves
(a raylet or GCS that a loaded 2-core machine starves past Ray's health checks) Ray may end
that process outright.  In a pytest-xdist worker that kills the worker, and pytest-xdist 3.8's
``--dist loadfile`` scheduler can then wait forever for the dead worker's tests
(pytest-dev/pytest-xdist#1323, #1371).  The Ray tests therefore run their Ray part through
:func:`run_isolated`: a crash there is one failed test with the child's exit code, never a dead
worker.  The child's standard error (Ray's C++ log lines included, and a Python traceback from
:mod:`faulthandler` on a fatal signal) goes to a file whose last lines the failure message
carries, so a child that dies without a word from Python still says what it saw last.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

#: Longest a child may run before it is killed and the test fails (seconds).
DEFAULT_TIMEOUT_S = 900.0
#: Lines of the child's standard error a failure message ends with.
STDERR_TAIL_LINES = 40


def _child(conn, stderr_path: str, fn: Callable[..., Any], args: tuple) -> None:
    log = open(stderr_path, "a", buffering=1)  # noqa: SIM115 - the child's stderr until it exits
    os.dup2(log.fileno(), 2)  # C/C++ writers (Ray's core worker) included
    sys.stderr = log
    faulthandler.enable(log)
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
    fd, stderr_path = tempfile.mkstemp(prefix=f"isolated-{fn.__name__}-", suffix=".stderr")
    os.close(fd)
    proc = ctx.Process(target=_child, args=(sender, stderr_path, fn, args), daemon=True)
    proc.start()
    sender.close()
    answered = False
    try:
        if not receiver.poll(timeout):
            raise AssertionError(f"isolated {fn.__name__} still running after {timeout:.0f} s: killed"
                                 + _tail(stderr_path))
        try:
            ok, value = receiver.recv()
        except EOFError:
            proc.join(30)
            raise AssertionError(f"isolated {fn.__name__} died without a result (exit code {proc.exitcode}; "
                                 "negative = killed by that signal)" + _tail(stderr_path)) from None
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
        with open(stderr_path, errors="replace") as f:  # pytest shows it with the test's own output
            sys.stderr.write(f.read())
        os.unlink(stderr_path)


def _tail(path: str) -> str:
    """The last :data:`STDERR_TAIL_LINES` lines of the child's standard error, for a message."""
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()[-STDERR_TAIL_LINES:]
    return "; its stderr ended with:\n" + "\n".join(lines) if lines else "; its stderr was empty"
