"""tests/isolated.py: a child that dies, raises or hangs fails the test with a clear message
instead of taking the pytest worker down or hanging the run."""

from __future__ import annotations

import os
import signal
import time

import pytest
from isolated import run_isolated


def _add(a, b):
    return a + b


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _raise():
    raise ValueError("bad input here")


def _sleep():
    time.sleep(60)


def test_returns_the_childs_result():
    assert run_isolated(_add, 2, 3) == 5


def test_a_child_killed_by_a_signal_fails_the_test_not_the_worker():
    with pytest.raises(AssertionError, match=r"_die died without a result \(exit code -9"):
        run_isolated(_die)


def test_a_childs_exception_carries_its_message_and_traceback():
    with pytest.raises(AssertionError, match=r"_raise raised ValueError: bad input here") as e:
        run_isolated(_raise)
    assert "Traceback" in str(e.value)


def test_a_hung_child_is_killed_after_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="still running after 2 s: killed"):
        run_isolated(_sleep, timeout=2)
    assert time.monotonic() - t0 < 30
