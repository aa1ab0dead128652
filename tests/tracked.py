"""Items that count themselves, to check ``Pipeline.buffer_bound()`` against what a run really holds.

One :class:`Tracked` object is one item: its ``__init__`` counts it in, its ``__del__`` counts it
out, under the tracker's lock, and the tracker keeps the peak. Stage functions of ``map``,
``filter`` and ``each`` keep the very object they were given; ``flat_map`` functions make new ones
(their outputs are new items), so every item a run holds anywhere is one live object.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from threadpipe import Pipeline, Run


class Tracker:
    """Counts the live :class:`Tracked` objects of one check, and the most there were at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.peak = 0
        self.created = 0


class Tracked:
    """One item; counted live from ``__init__`` to ``__del__``."""

    __slots__ = ("tracker", "value")

    def __init__(self, tracker: Tracker, value: int) -> None:
        self.tracker = tracker
        self.value = value
        with tracker.lock:
            tracker.live += 1
            tracker.created += 1
            tracker.peak = max(tracker.peak, tracker.live)

    def __del__(self) -> None:
        tracker = self.tracker
        with tracker.lock:
            tracker.live -= 1

    def __repr__(self) -> str:
        return f"Tracked({self.value})"


def tracked_source(tracker: Tracker, n: int) -> Iterator[Tracked]:
    """A generator making ``n`` items lazily, one per pull."""
    for i in range(n):
        yield Tracked(tracker, i)


def wait_saturated(tracker: Tracker, cap: float = 1.0) -> None:
    """Wait, at most ``cap`` seconds, until the run stops making and freeing items.

    With the caller holding back, that is when every buffer in front of it is as full as it gets.
    This only makes full buffers likely; nothing is decided by it.
    """
    deadline = time.monotonic() + cap
    pause = threading.Event()
    last = (-1, -1)
    stable = 0
    while stable < 5 and time.monotonic() < deadline:
        pause.wait(0.002)
        now = (tracker.created, tracker.live)
        stable = stable + 1 if now == last else 0
        last = now


def drain_slowly(run: Run[Any], tracker: Tracker, cap: float = 1.0) -> int:
    """Read one output, let the buffers fill behind it, then read the rest; how many outputs.

    Every output is released before the next is taken (the loop variable is rebound), so the
    caller holds at most one item (a ``batch`` output: one list) at a time.
    """
    it = iter(run)
    first = next(it, None)
    if first is None:
        return 0
    wait_saturated(tracker, cap)
    del first
    n = 1
    for _ in it:  # rebinding ``_`` releases the previous output
        n += 1
    return n


def check_bound(pipeline: Pipeline[Any], tracker: Tracker, join_timeout: float = 10.0) -> str | None:
    """Run ``pipeline`` with a slow start; a message if more items were live than its bound allows.

    Allowed: ``buffer_bound()``, plus the output in the caller's hand, plus the items that
    ``run.errors`` keeps (each handled failure keeps its item, by design: those are not in the
    run's buffers).
    """
    bound = pipeline.buffer_bound()
    run = pipeline.start()
    try:
        drain_slowly(run, tracker)
    finally:
        run.cancel()
    run.join(timeout=join_timeout)
    kept = len(run.errors)
    if tracker.peak > bound + 1 + kept:
        return (
            f"peak {tracker.peak} live items > buffer_bound() {bound} + 1 in hand"
            f"{f' + {kept} kept by run.errors' if kept else ''}: {pipeline!r}"
        )
    return None
