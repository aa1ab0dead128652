"""Fixtures shared by every test: no test may leave a thread behind, and what a test's process
pools leave to the garbage collector is collected before the next test."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from threadpipe._threads import drain

# ``THREADPIPE_SWITCH_INTERVAL=1e-6 python -m pytest`` runs the suite with the interpreter
# switching threads every microsecond (the default is 5 ms): a thread then loses the interpreter
# lock between almost any two bytecodes, so an interleaving that a run meets once in a million at
# the default comes up in every run. Tests that measure the pace the default gives are marked
# ``default_switch_interval`` and skipped then.
_SWITCH_VARIABLE = "THREADPIPE_SWITCH_INTERVAL"


def pytest_configure(config: pytest.Config) -> None:
    value = os.environ.get(_SWITCH_VARIABLE)
    if not value:
        return
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise pytest.UsageError(f"{_SWITCH_VARIABLE} must be seconds > 0, got {value!r}")
    sys.setswitchinterval(seconds)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get(_SWITCH_VARIABLE):
        return
    skip = pytest.mark.skip(reason=f"measures the default switch interval's pace ({_SWITCH_VARIABLE})")
    for item in items:
        if item.get_closest_marker("default_switch_interval") is not None:
            item.add_marker(skip)


# Threads a run started may still be returning from their last call when a test ends (a cancelled
# run does not wait for them); they get this long to exit before the test counts as leaking.
_GRACE_SECONDS = 10.0


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail the test if it leaves a thread running that was not there before it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + _GRACE_SECONDS
    leaked = [t for t in threading.enumerate() if t not in before]
    for thread in leaked:
        # The threads that served the test's runs park for the next run (threadpipe._threads):
        # retire them as they park. A thread still returning from a call parks after it returns.
        while thread.is_alive() and time.monotonic() < deadline:
            drain(0.0)
            thread.join(min(0.05, max(0.0, deadline - time.monotonic())))
    alive = [t.name for t in leaked if t.is_alive()]
    assert not alive, f"threads leaked by this test: {alive}"


@pytest.fixture(autouse=True)
def pool_garbage_collected() -> Iterator[None]:
    """Collect, after each test that may have made a process pool, what its pools left behind.

    A pool's semaphores unregister themselves from multiprocessing's resource tracker when they
    are collected. A collection that happens to run inside the tracker's own call (a later test
    making a pool) makes that call reentrant, which CPython before 3.13.7 reports as an unraisable
    warning (python/cpython#131788): seen once, at random, in a test that only made its own pool.
    Collected here, they go at a point where no tracker call is running. Only when the test left
    more finalizers registered than it found (a semaphore is one until it is collected): a full
    collection after every test would add a minute to the suite.
    """
    before = _finalizers()
    yield
    if _finalizers() > before:
        gc.collect()


def _finalizers() -> int:
    """How many multiprocessing finalizers are registered (0 before multiprocessing is used)."""
    util = sys.modules.get("multiprocessing.util")
    return len(getattr(util, "_finalizer_registry", ())) if util is not None else 0
