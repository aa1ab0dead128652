"""Fixtures shared by every test: no test may leave a thread behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from threadpipe._threads import drain

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
