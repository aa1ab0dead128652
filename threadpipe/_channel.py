"""The queue link between two stages: a bounded, closable ``queue.Queue`` that moves items in batches.

Every buffer of a run is a :class:`Channel`. It is a real ``queue.Queue`` subclass and keeps that
class's lock and conditions (``mutex``, ``not_empty``, ``not_full``), adding three things:

* ``get_many``/``put_many`` move several items under one lock acquisition. Taking what is already
  there in one go is what lets a pipeline beat the hand-written ``get()``/``put()`` loop.
* ``abort()`` (what a cancel does to it) wakes every blocked getter and putter at once, makes them
  raise :class:`~threadpipe._scope.Cancelled`, and drops the items it held: nobody will read them.
  Cancellation is therefore cooperative and needs no polling: a thread blocked on a full or empty
  buffer is woken by the cancel itself.
* ``queue.Queue``'s own ``put``/``get`` family is refused: it would bypass the abort, the sentinel
  and the ordering window.
* The end of input travels as the private :data:`END` sentinel. A getter never removes it: it stays
  at the head of the buffer, so every sibling worker of the stage sees it in turn.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Final, NoReturn

from ._scope import Cancelled

__all__ = ["END", "Channel", "ReliefChannel"]


class _End:
    """Type of the end-of-input sentinel: never equal to user data, ``None`` included."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<threadpipe END>"


END: Final = _End()


class Channel(queue.Queue[Any]):
    """A bounded FIFO between two stages.

    Args:
        maxsize: the most items the channel holds (the sentinel is not counted). Must be >= 1.
        name: a label for ``repr`` and statistics.
    """

    def __init__(self, maxsize: int, name: str = "") -> None:
        super().__init__(maxsize)
        self.name = name
        self.aborted = False
        # Count of items ever taken, used to number items for ordered stages. Read and written
        # under ``mutex`` only, so that numbering and taking are one atomic step.
        self.taken = 0
        # Getters blocked on an empty channel. When items arrive and nobody is idle to take them,
        # ``on_starved`` (set by the reading stage while it can still grow) is called, outside the
        # lock, by the thread that put them: that is how a stage learns it needs another worker.
        self.idle_getters = 0
        self.idle_putters = 0
        self.on_starved: Callable[[], None] | None = None
        # Set by a reading stage that can run a batch in the putter's own thread instead (see
        # ``Stage.carry``): ``carry(items, tabs, release)`` returns 0, having done nothing, when it
        # cannot; the putter then puts the items here as usual.
        self.carry: Callable[[list[Any], dict[Any, Any], Any], int] | None = None
        # For an ordered stage: items may be taken only while ``taken < limit``; the reorder buffer
        # raises the limit as items leave it (see ``raise_limit``). None means no limit.
        self.limit: int | None = None
        self.window_waiters = 0
        # Getters waiting for the limit wait on their own condition, so that a put's notify never
        # lands on one of them instead of on a getter waiting for items.
        self.window_open = threading.Condition(self.mutex)

    def __repr__(self) -> str:
        aborted = " aborted" if self.aborted else ""
        return f"<Channel {self.name!r} {self.qsize()}/{self.maxsize}{aborted}>"

    def abort(self) -> None:
        """Wake every blocked thread and drop the items held; from now on every get and put raises
        :class:`~threadpipe._scope.Cancelled`. Idempotent."""
        with self.mutex:
            self.aborted = True
            self.queue.clear()
            self.not_empty.notify_all()
            self.not_full.notify_all()
            self.window_open.notify_all()

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            "a threadpipe Channel moves items with put_many/get_many/put_end only: queue.Queue's "
            "put/get would bypass its abort, its end sentinel and its ordering window"
        )

    put = get = put_nowait = get_nowait = _refuse

    def _starved(self) -> None:
        # Read once: the reading stage sets it to None when fully grown, from another thread, and
        # a check followed by a second read could call None.
        grow = self.on_starved
        if grow is not None:
            grow()

    def raise_limit(self, limit: int) -> None:
        """Allow items numbered below ``limit`` to be taken, and wake getters waiting for that.

        Lock discipline: the store is made without the lock and ``window_waiters`` read after it.
        A getter counts itself in ``window_waiters`` under the lock *before* it re-reads ``limit``;
        so either it sees the new limit, or this call sees it waiting and notifies it under the
        lock, after it has started waiting. No wake-up is lost, and the common case (nobody
        waiting) costs no lock at all.
        """
        self.limit = limit
        if self.window_waiters:
            with self.mutex:
                self.window_open.notify_all()

    def pass_by(self, n: int) -> bool:
        """Count ``n`` items as put and taken at once, if nothing waits to be taken before them.

        For a batch that its putter's thread runs through the reading stage itself (a carry):
        the items never sit in the buffer, but are numbered and counted as taken like any other,
        so the statistics' items in flight stay right. Refused (False) when items or the end are
        waiting, the channel was aborted, or it numbers items for an ordered stage.
        """
        with self.mutex:
            if self.queue or self.aborted or self.limit is not None:
                return False
            self.taken += n
        return True

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
            Cancelled: the channel was aborted.
        """
        with self.mutex:
            if self.aborted:
                raise Cancelled
            q = self.queue
            if len(q) >= self.maxsize:
                return False
            q.append(item)
            if self.idle_getters:
                self.not_empty.notify()
                return True
            starved = len(q) > 1
        if starved:
            self._starved()
        return True

    def _append(self, items: list[Any], done: int, room: int) -> int:
        """Under ``mutex``: append what fits of ``items[done:]`` into ``room`` free places; return
        how many."""
        q = self.queue
        if room >= len(items) - done:
            q.extend(items[done:] if done else items)
            return len(items) - done
        q.extend(items[done : done + room])
        return room

    def _pile_up(self, added: int) -> bool:
        """Under ``mutex``, after ``added`` items went in: wake that many idle getters, or return
        whether items pile up with nobody idle to take them (the reader may need to grow)."""
        # Condition.notify costs a lock probe even with nobody waiting: count instead.
        if self.idle_getters:
            self.not_empty.notify(added)
            return False
        return len(self.queue) > added  # some were waiting before these

    def put_many(self, items: list[Any], timeout: float | None = None) -> int:
        """Append all of ``items`` in order, waiting for room as needed.

        Args:
            items: what to append.
            timeout: the most seconds to wait for room; None waits as long as it takes.

        Returns:
            How many items were appended: ``len(items)`` unless the timeout ran out first.

        Raises:
            Cancelled: the channel was aborted before every item was appended.
        """
        n = len(items)
        done = 0
        starved = False
        try:
            with self.mutex:
                q = self.queue
                maxsize = self.maxsize
                while done < n:
                    if self.aborted:
                        raise Cancelled
                    room = maxsize - len(q)
                    if room <= 0:
                        self.idle_putters += 1
                        try:
                            woke = self.not_full.wait(timeout)
                        finally:
                            self.idle_putters -= 1
                        if not woke and timeout is not None:
                            return done
                        continue
                    added = self._append(items, done, room)
                    done += added
                    starved = self._pile_up(added) or starved
        finally:
            # Outside the lock: growing a stage starts a thread, which must not hold up others.
            if starved:
                self._starved()
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
            Cancelled: the channel was aborted.
        """
        with self.mutex:
            q = self.queue
            while True:
                if self.aborted:
                    raise Cancelled
                if not q:
                    self.idle_getters += 1
                    try:
                        woke = self.not_empty.wait(timeout)
                    finally:
                        self.idle_getters -= 1
                    if not woke and timeout is not None and not q:
                        return None
                    continue
                limit = self.limit
                if limit is None or self.taken < limit or q[0] is END:
                    break
                # An ordered stage's window is full: wait until the head of the line moves on.
                self.window_waiters += 1
                try:
                    if self.limit == limit:  # re-read after counting ourselves (see raise_limit)
                        self.window_open.wait()
                finally:
                    self.window_waiters -= 1
            got = self._take_now(max_items, share)
            assert got is not None  # the window is open: checked above
            # Batched hand-off: a putter waiting for room is woken once the buffer is down to half
            # (or less), not for every slot freed, so it puts many items per wake-up while the
            # half still there keeps the getters busy.
            if self.idle_putters and len(q) <= self.maxsize >> 1:
                self.not_full.notify(self.maxsize - len(q))
            starved = bool(q) and not self.idle_getters and q[0] is not END
        # Items left behind with nobody idle to take them: the stage may need another worker.
        if starved:
            self._starved()
        return got

    def _take_now(self, max_items: int, share: int = 1) -> tuple[list[Any], int] | None:
        """Under ``mutex`` (a ``LoopLink``: on the loop), with items or the end waiting: the take
        step of every reader.

        Takes up to ``max_items`` items, no more than a ``1/share`` part of those waiting
        (rounded up), and, for an ordered reader, only those its window allows.

        Returns:
            ``(items, first_number)``; ``([], taken)`` when the end is at the head (it stays
            there); None when the window allows no item now.
        """
        q = self.queue
        if q[0] is END:
            return [], self.taken
        n = len(q)
        if q[-1] is END:
            # The sentinel is always last when present: nothing is appended after it.
            n -= 1
        if share > 1:
            n = -(-n // share)
        if n > max_items:
            n = max_items
        limit = self.limit
        if limit is not None and n > limit - self.taken:
            n = limit - self.taken
            if n <= 0:
                return None
        if n == 1:
            items = [q.popleft()]
        else:
            popleft = q.popleft
            items = [popleft() for _ in range(n)]
        number = self.taken
        self.taken = number + n
        return items, number


class ReliefChannel(Channel):
    """A buffer that never makes its producers wait: when full, it drops its oldest item.

    The relief valve of a pipeline whose consumers must see the newest items (sensor readings,
    status updates) rather than every item. ``dropped`` counts what was let go. What it holds at the
    end of input is delivered.
    """

    def __init__(self, maxsize: int, name: str = "") -> None:
        super().__init__(maxsize, name)
        self.dropped = 0

    def try_put(self, item: Any) -> bool:
        """Append ``item``, dropping the oldest item if the buffer is full; always True.

        Raises:
            Cancelled: the channel was aborted.
        """
        self.put_many([item])
        return True

    def put_many(self, items: list[Any], timeout: float | None = None) -> int:
        """Append ``items`` without waiting, dropping the oldest items to make room.

        Returns:
            ``len(items)``: every item went in (some older ones may have gone out).

        Raises:
            Cancelled: the channel was aborted.
        """
        with self.mutex:
            if self.aborted:
                raise Cancelled
            q = self.queue
            q.extend(items)
            over = len(q) - self.maxsize
            if over > 0:
                # Numbers for ordered stages count items taken, not dropped: dropping from the
                # head changes no number already handed out.
                for _ in range(over):
                    q.popleft()
                self.dropped += over
            if self.idle_getters:
                self.not_empty.notify(len(items))
                starved = False
            else:
                starved = len(q) > len(items)
        if starved:
            self._starved()
        return len(items)
