"""The buffer between two parts of a run that both live on the run's event loop.

Between two coroutine stages, or an async source and a coroutine stage, items need not cross to a
thread and back: the writer is a task on the loop and the reader starts its calls on the loop. A
:class:`LoopChannel` links them there. It is a :class:`~threadpipe._channel.Channel` (same bound,
same end sentinel, same numbering of items for ordered stages, same abort, readable by statistics
and the monitor from any thread), with the blocking ends replaced by loop-native ones:

* the writer ``await``\\ s :meth:`LoopChannel.put_async`, which waits for room on a future, so a full
  buffer suspends the writing task and never the loop;
* the reader does not wait at all: it registers ``on_items``, which the channel calls (on the loop)
  whenever items or the end arrive, and takes what it has room for with :meth:`LoopChannel.take`.

The blocking ``put_many``/``get_many`` are refused: called on the loop, they would freeze every
coroutine of the run. Only the loop thread moves items; other threads only read its size (under
``mutex``), abort it, and end it (``put_end``, which hops to the loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._channel import END, Channel
from ._scope import Cancelled

if TYPE_CHECKING:
    from ._aio import LoopThread

__all__ = ["LoopChannel"]


class LoopChannel(Channel):
    """A bounded FIFO whose writer and reader both run on the run's loop ``aio``.

    Args:
        maxsize: the most items it holds (the sentinel is not counted). Must be >= 1.
        name: a label for ``repr`` and statistics.
        aio: the run's loop.
    """

    def __init__(self, maxsize: int, name: str, aio: LoopThread) -> None:
        super().__init__(maxsize, name)
        self.aio = aio
        # The reader's callback, called on the loop when items or the end arrive, or when an
        # ordered reader's window opens; it takes what it has room for.
        self.on_items: Callable[[], None] | None = None
        # Loop thread only: the writers waiting for room (one future each).
        self._room: list[asyncio.Future[None]] = []
        # Set (under ``mutex``) when the reader found items it was not allowed to take yet (an
        # ordered stage's window): ``raise_limit`` calls it again.
        self._held_back = False

    def __repr__(self) -> str:
        aborted = " aborted" if self.aborted else ""
        return f"<LoopChannel {self.name!r} {self.qsize()}/{self.maxsize}{aborted}>"

    put_many = get_many = try_put = Channel._refuse  # type: ignore[assignment]

    async def put_async(self, items: list[Any]) -> None:
        """Append all of ``items`` in order, waiting (suspending the calling task) for room.

        Raises:
            Cancelled: the channel was aborted before every item was appended.
        """
        done = 0
        n = len(items)
        q = self.queue
        while done < n:
            if self.aborted:
                raise Cancelled
            room = self.maxsize - len(q)
            if room <= 0:
                waiter = asyncio.get_running_loop().create_future()
                self._room.append(waiter)
                try:
                    await waiter
                finally:
                    if not waiter.done():  # the writer was cancelled while it waited
                        self._room.remove(waiter)
                continue
            with self.mutex:
                if done == 0 and room >= n:
                    q.extend(items)
                    done = n
                else:
                    part = items[done : done + room]
                    q.extend(part)
                    done += len(part)
            self._tell_reader()

    def take(self, max_items: int) -> tuple[list[Any], int] | None:
        """On the loop: take up to ``max_items`` items that are there, without waiting.

        Returns:
            None when there is nothing to take now (empty, or an ordered reader's window is
            full). Otherwise ``(items, first_number)``, as ``Channel.get_many``: an empty list is
            the end of input (the sentinel stays at the head).

        Raises:
            Cancelled: the channel was aborted.
        """
        with self.mutex:
            if self.aborted:
                raise Cancelled
            q = self.queue
            if not q:
                return None
            if q[0] is END:
                return [], self.taken
            n = len(q)
            if q[-1] is END:
                n -= 1
            if n > max_items:
                n = max_items
            limit = self.limit
            if limit is not None and n > limit - self.taken:
                n = limit - self.taken
                if n <= 0:
                    self._held_back = True
                    return None
            popleft = q.popleft
            items = [popleft() for _ in range(n)]
            number = self.taken
            self.taken = number + n
            # Like ``Channel.get_many``, a waiting writer is woken once the buffer is down to half,
            # so it puts many items per wake-up.
            wake = len(q) <= self.maxsize >> 1
        if wake and self._room:
            self._wake_writers()
        return items, number

    def put_end(self) -> None:
        """Append the end-of-input sentinel; from any thread (the reader hears of it on the loop)."""
        with self.mutex:
            self.queue.append(END)
        if self.aio.on_loop():
            self._tell_reader()
        else:
            self.aio.call_soon(self._tell_reader)

    def raise_limit(self, limit: int) -> None:
        """Allow items numbered below ``limit`` to be taken; from any thread."""
        with self.mutex:
            self.limit = limit
            held_back, self._held_back = self._held_back, False
        if held_back:
            if self.aio.on_loop():
                self._tell_reader()
            else:
                self.aio.call_soon(self._tell_reader)

    def abort(self) -> None:
        """Drop the items held and refuse every put and take from now on; from any thread."""
        super().abort()
        self.aio.call_if_running(self._wake_writers)

    def _wake_writers(self) -> None:
        waiters, self._room = self._room, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _tell_reader(self) -> None:
        reader = self.on_items  # read once: the reader may drop it from another thread
        if reader is not None:
            reader()

