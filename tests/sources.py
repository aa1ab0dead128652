"""Sources shared by the tests."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator


class Endless:
    """An infinite generator source that records how far it was pulled and whether it was closed.

    Pass ``iter(source)`` (a generator, so a one-shot source that threadpipe closes on an early
    stop) and check ``source.closed`` afterwards.
    """

    def __init__(self) -> None:
        self.pulled = 0
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[int]:
        try:
            for i in itertools.count():
                self.pulled += 1
                yield i
        finally:
            self.closed.set()
