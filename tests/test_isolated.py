"""tests/isolated.py: a child that dies, raises or hangs fails the test with a clear message
instead of taking the pytest worker down or hanging the run."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from isolated import run_isolated


def _add(a, b):
    return a + b


def _die():
    os.write(2, b"last words from C\n")  # fd 2, as Ray's C++ logger writes
    print("last words from Python", file=sys.stderr)
    os.kill(os.getpid(), signal.SIGKILL)


def _exit_quietly():
    os._exit(1)  # as a C++ library's _Exit(1): no exception, no result


def _raise():
    raise ValueError("bad input here")


def _sleep():
    time.sleep(60)


def test_returns_the_childs_result():
    assert run_isolated(_add, 2, 3) == 5


def test_a_child_killed_by_a_signal_fails_the_test_not_the_worker():
    with pytest.raises(AssertionError, match=r"_die died without a result \(exit code -9") as e:
        run_isolated(_die)
    assert str(e.value).endswith("its stderr ended with:\nlast words from C\nlast words from Python"), str(e.value)


def test_a_child_that_exits_without_a_word_says_so():
    with pytest.raises(AssertionError, match=r"died without a result \(exit code 1; .*its stderr was empty$"):
        run_isolated(_exit_quietly)


def test_a_childs_exception_carries_its_message_and_traceback():
    with pytest.raises(AssertionError, match=r"_raise raised ValueError: bad input here") as e:
        run_isolated(_raise)
    assert "Traceback" in str(e.value)


def test_a_hung_child_is_killed_after_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="still running after 2 s: killed"):
        run_isolated(_sleep, timeout=2)
    assert time.monotonic() - t0 < 30
