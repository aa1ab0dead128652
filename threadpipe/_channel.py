"""The queue link between two stages: a bounded, closable ``queue.Queue`` that moves items in batches.

Every buffer of a run is a :class:`Channel`. It is a real ``queue.Queue`` subclass and keeps that
class's lock and conditions (``mutex``, ``not_empty``, ``not_full``), adding three things:

* ``get_many``/``put_many`` move several items under one lock acquisition. Taking what is already
  there in one go is what lets a pipeline beat the hand-written ``get()``/``put()`` loop.
* ``close()`` wakes every blocked getter and putter at once and makes them raise :class:`Closed`.
  Cancellation is therefore cooperative and needs no polling: a thread blocked on a full or empty
  buffer is woken by the cancel itself.
* The end of input travels as the private :data:`END` sentinel. A getter never removes it: it stays
  at the head of the buffer, so every sibling worker of the stage sees it in turn.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any, Final

__all__ = ["END", "Channel", "Closed"]


class _End:
    """Type of the end-of-input sentinel: never equal to user data, ``None`` included."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<threadpipe END>"


END: Final = _End()


class Closed(Exception):
    """Raised inside the library when a thread finds its channel or gate closed by a cancel.

    It never reaches a user: workers catch it and exit quietly.
    """


class Channel(queue.Queue[Any]):
    """A bounded FIFO between two stages.

    Args:
        maxsize: the most items the channel holds (the sentinel is not counted). Must be >= 1.
        name: a label for ``repr`` and statistics.
    """

    def __init__(self, maxsize: int, name: str = "") -> None:
        super().__init__(maxsize)
        self.name = name
        self.closed = False
        # Count of items ever taken, used to number items for ordered stages. Read and written
        # under ``mutex`` only, so that numbering and taking are one atomic step.
        self.taken = 0
        # Getters blocked on an empty channel. When items arrive and nobody is idle to take them,
        # ``on_starved`` (set by the reading stage while it can still grow) is called, outside the
        # lock, by the thread that put them: that is how a stage learns it needs another worker.
        self.idle_getters = 0
        self.on_starved: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<Channel {self.name!r} {self.qsize()}/{self.maxsize}{' closed' if self.closed else ''}>"

    def close(self) -> None:
        """Wake every blocked thread; from now on ``get_many``/``put_many`` raise :class:`Closed`."""
        with self.mutex:
            self.closed = True
            self.not_empty.notify_all()
            self.not_full.notify_all()

    def put_end(self) -> None:
        """Append the end-of-input sentinel.

        The sentinel is not counted against ``maxsize``: the stage that sends it has no more items
        to send, so letting it in at once keeps the last worker from blocking for nothing.
        """
        with self.mutex:
            self.queue.append(END)
            self.not_empty.notify_all()

    def try_put(self, item: Any) -> bool:
        """Append ``item`` if there is room; return whether it was appended. Never blocks.

        Raises:
            Closed: the channel was closed.
        """
        with self.mutex:
            if self.closed:
                raise Closed
            q = self.queue
            if len(q) >= self.maxsize:
                return False
            q.append(item)
            self.not_empty.notify()
            starved = len(q) > 1 and not self.idle_getters
        if starved and self.on_starved is not None:
            self.on_starved()
        return True

    def put_many(self, items: list[Any], timeout: float | None = None) -> int:
        """Append all of ``items`` in order, waiting for room as needed.

        Args:
            items: what to append.
            timeout: the most seconds to wait for room; None waits as long as it takes.

        Returns:
            How many items were appended: ``len(items)`` unless the timeout ran out first.

        Raises:
            Closed: the channel was closed before every item was appended.
        """
        n = len(items)
        done = 0
        starved = False
        try:
            with self.not_full:
                q = self.queue
                while done < n:
                    if self.closed:
                        raise Closed
                    room = self.maxsize - len(q)
                    if room <= 0:
                        if not self.not_full.wait(timeout) and timeout is not None:
                            return done
                        continue
                    if room >= n - done:
                        q.extend(items[done:] if done else items)
                        room = n - done
                    else:
                        q.extend(items[done : done + room])
                    done += room
                    self.not_empty.notify(room)
                    # Growing helps when items pile up: some were already waiting before these.
                    starved = starved or (len(q) > room and not self.idle_getters)
        finally:
            # Outside the lock: growing a stage starts a thread, which must not hold up others.
            if starved and self.on_starved is not None:
                self.on_starved()
        return done

    def get_many(
        self, max_items: int, timeout: float | None = None, share: int = 1
    ) -> tuple[list[Any], int] | None:
        """Take up to ``max_items`` items that are already there, waiting only for the first.

        Args:
            max_items: the most items to take (>= 1).
            timeout: the most seconds to wait for an item; None waits as long as it takes.
            share: how many getters share this channel: take no more than a ``1/share`` part of
                the items waiting (rounded up), so that one getter never hoards items that idle
                siblings could be working on.

        Returns:
            None when the timeout ran out. Otherwise ``(items, first_number)``: the items taken, in
            order (an empty list means end of input: the sentinel was at the head and was left
            there for the next getter), and the running number of the first item taken.

        Raises:
            Closed: the channel was closed.
        """
        with self.not_empty:
            q = self.queue
            while not q:
                if self.closed:
                    raise Closed
                self.idle_getters += 1
                try:
                    woke = self.not_empty.wait(timeout)
                finally:
                    self.idle_getters -= 1
                if not woke and timeout is not None and not q:
                    return None
            if self.closed:
                raise Closed
            first = q[0]
            if first is END:
                return [], self.taken
            n = len(q)
            if q[-1] is END:
                # The sentinel is always last when present: nothing is appended after it.
                n -= 1
            if share > 1:
                n = -(-n // share)
            if max_items == 1 or n == 1:
                items = [q.popleft()]
            else:
                if n > max_items:
                    n = max_items
                popleft = q.popleft
                items = [popleft() for _ in range(n)]
            number = self.taken
            self.taken = number + len(items)
            self.not_full.notify(len(items))
            starved = bool(q) and not self.idle_getters and q[0] is not END
        # Items left behind with nobody idle to take them: the stage may need another worker.
        if starved and self.on_starved is not None:
            self.on_starved()
        return items, number

