"""The buffers a run's event loop writes: no thread between a coroutine stage and what follows it.

A coroutine stage (or an async source) runs on the run's loop. The buffer after it is written there,
by a task, so it must never make the writer *block*: a blocked loop freezes every coroutine of the
run. These buffers are :class:`~threadpipe._channel.Channel`\\ s (same bound, same end sentinel,
same numbering of items for ordered stages, same abort, readable by statistics and the monitor from
any thread) with a loop-native writing end:

* :class:`LoopChannel`, read by threads (a thread stage's workers, an operator, the caller): the
  writer ``await``\\ s :meth:`LoopChannel.put_async`, which suspends the writing task on a future
  while the buffer is full; the reader that makes room (down to half, as ``Channel`` batches its
  wake-ups) has the loop resolve it. So the loop hands items straight to the threads, with no
  emitter thread in between. One exception to "never block", bounded: a buffer that fills while
  its reader thread is kept from running by the loop itself (see ``_yield_to_reader``) has the
  loop thread wait for room once, at most a switch interval, instead.
* :class:`LoopLink`, read on the loop too (by the next coroutine stage): the reader does not wait
  at all. It registers ``on_items``, which the buffer calls on the loop whenever items or the end
  arrive, and takes what its permits allow with :meth:`LoopLink.take`. Items between two coroutine
  stages never leave the loop.

The blocking ``put_many``/``try_put`` are refused, and a ``LoopLink``'s ``get_many``: called on the
loop, they would freeze it. Threads only read a buffer's size (under ``mutex``), read a
``LoopChannel``, abort one, and end one (``put_end``); what they do to a ``LoopLink``, which only
the loop changes, they hand to the loop.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._channel import END, Channel
from ._scope import Cancelled

if TYPE_CHECKING:
    from ._aio import LoopThread

__all__ = ["LoopChannel", "LoopLink"]


# The most fillings of a LoopChannel that go by without the loop waiting for its reader, after
# waits the reader did not end (see ``LoopChannel._yield_to_reader``).
_YIELD_BACKOFF = 64


class LoopChannel(Channel):
    """A bounded FIFO written on the run's loop ``aio`` and read by threads.

    Args:
        maxsize: the most items it holds (the sentinel is not counted). Must be >= 1.
        name: a label for ``repr`` and statistics.
        aio: the run's loop.
    """

    written_on_loop = True  # a source feeds it from the loop (see ``Source.launch``)

    def __init__(self, maxsize: int, name: str, aio: LoopThread) -> None:
        super().__init__(maxsize, name)
        # Weakly: the run's state holds its channels, and the loop holds the run's state. A run
        # that failed must be freed by reference counting alone; with no loop, nobody is waiting.
        self._aio = weakref.ref(aio)
        # Loop thread only: the writers waiting for room, a future each, and how many of them
        # were woken and have not looked for room yet (the room is kept for them).
        self._room: deque[asyncio.Future[None]] = deque()
        self._woken = 0
        # Under ``mutex``: a writer waits for room (a reader in a thread reads this to know it
        # must have the loop wake it).
        self._writer_waits = False
        # Loop thread only: see ``_yield_to_reader``. Whether the loop thread waited for room
        # since the last put that found room; after waits that the reader did not end, how many
        # fillings to let pass without one, and how many the next such wait will make it.
        self._yielded = False
        self._yield_skip = 0
        self._yield_backoff = 1

    def __repr__(self) -> str:
        aborted = " aborted" if self.aborted else ""
        return f"<{type(self).__name__} {self.name!r} {self.qsize()}/{self.maxsize}{aborted}>"

    put_many = try_put = Channel._refuse

    async def put_async(self, items: list[Any]) -> None:
        """On the loop: append all of ``items`` in order, suspending the calling task for room.

        Raises:
            Cancelled: the channel was aborted before every item was appended.
        """
        done = 0
        n = len(items)
        while done < n:
            starved = False
            with self.mutex:
                if self.aborted:
                    raise Cancelled
                q = self.queue
                room = self.maxsize - len(q)
                if room <= 0 and self._yield_to_reader():
                    continue
                if room <= 0:
                    aio = self._aio()
                    if aio is None:  # the loop is gone: nobody would wake this writer
                        raise Cancelled
                    waiter = aio.here().create_future()
                    self._room.append(waiter)
                    self._writer_waits = True
                else:
                    # As ``Channel.put_many``: wake idle readers, or tell a stage that can grow
                    # that items pile up with nobody idle to take them.
                    waiter = None
                    self._yielded = False
                    added = self._append(items, done, room)
                    done += added
                    starved = self._pile_up(added)
            if waiter is not None:
                try:
                    await waiter
                finally:
                    if not waiter.done():  # the writer was cancelled while it waited
                        self._room.remove(waiter)
                    elif not waiter.cancelled():
                        self._woken -= 1  # woken for room: here it is
                continue
            if starved:
                self._starved()
            self._told()

    def _yield_to_reader(self) -> bool:
        """Under ``mutex``, the buffer full: let a reader thread the loop keeps from running make
        room, with the loop thread waiting for it here; return whether it waited.

        A thread that wants the interpreter lock asks its holder to let go only after waiting a
        switch interval for it, and the loop lets go and takes it back on every turn (to poll), which
        starts that wait over: a busy loop keeps a reader thread from running for as long as it has
        work. Its buffer fills, and then every writer waits on a future and is woken for its
        item: a future, a wake-up and a retry per item, which made fast coroutine stages feeding a
        thread two to three times slower per item than with a buffer that never fills.
        Waiting here instead (on ``not_full``, as a thread writer does) lets go of the lock until
        the reader has taken the buffer down to half.

        Once per filling (``_yielded``), for at most one switch interval. A reader busy in a call
        that does not need the lock (I/O) lets the wait time out; the writers then wait on futures
        as before, and the fillings after such a wait go by without one, 1, 2, 4 ... up to 64 of
        them (reset by a wait the reader ends), so a slow reader costs the loop a switch interval
        every 64 fillings at most, never one per item. A reader told of items that has not come
        for them (``idle_getters``: it waits for the lock) is always waited for. A ``LoopLink``'s
        reader is on the loop: never (see there).
        """
        if self._room or self._yielded:
            return False
        if self._yield_skip and not self.idle_getters:
            self._yield_skip -= 1
            return False
        self._yielded = True
        self.idle_putters += 1
        try:
            came = self.not_full.wait(sys.getswitchinterval())
        finally:
            self.idle_putters -= 1
        if came:
            self._yield_backoff = 1
        else:
            self._yield_skip = self._yield_backoff
            self._yield_backoff = min(2 * self._yield_backoff, _YIELD_BACKOFF)
        return True

    def put_now(self, items: list[Any]) -> bool:
        """On the loop: append all of ``items`` if they fit now, else none; never waits.

        Raises:
            Cancelled: the channel was aborted.
        """
        n = len(items)
        with self.mutex:
            if self.aborted:
                raise Cancelled
            if self._room or len(self.queue) + n > self.maxsize:
                return False  # no room, or writers wait for it already: they go first
            self.queue.extend(items)  # all of them fit: no ``_append`` to split them
            starved = self._pile_up(n)
        if starved:
            self._starved()
        return True  # read by threads: no reader on the loop to tell (``LoopLink.put_now``)

    def get_many(
        self, max_items: int, timeout: float | None = None, share: int = 1
    ) -> tuple[list[Any], int] | None:
        """As ``Channel.get_many``, and a writer on the loop waiting for room is woken once the
        buffer is down to half."""
        got = super().get_many(max_items, timeout, share)
        with self.mutex:
            wake = self._writer_waits and len(self.queue) <= self.maxsize >> 1
            if wake:
                self._writer_waits = False
        aio = self._aio()
        if wake and aio is not None:
            aio.call_soon(self._wake_writers)
        return got

    def abort(self) -> None:
        """Drop the items held and refuse every put and take from now on; from any thread."""
        super().abort()
        aio = self._aio()
        if aio is not None:
            aio.call_if_running(self._wake_writers)

    def _wake_writers(self) -> None:
        """On the loop: let as many waiting writers look for room again as there is room (all of
        them once aborted), first come first; the others wait on."""
        with self.mutex:
            if self.aborted:
                free = len(self._room)
            else:  # less the room writers woken already will take
                free = self.maxsize - len(self.queue) - self._woken
        waiters = self._room
        woken = 0
        while waiters and woken < free:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1
        self._woken += woken
        with self.mutex:
            self._writer_waits = bool(waiters)

    def _told(self) -> None:
        """Items were put (on the loop): a reader on the loop hears of it here."""


class LoopLink(LoopChannel):
    """A bounded FIFO whose writer and reader both run on the run's loop ``aio``.

    Confined to the loop: its items and its count of items taken change on the loop thread only,
    so the loop's puts and takes need no lock (the two lock round-trips per item and stage were
    about a tenth of what a coroutine stage that awaits nothing costs per item). What another
    thread does to it goes through the loop: the end (``put_end``) and an abort are handed to the
    loop, or made at once when no loop runs (before it starts nothing is in the buffer, once it
    has closed nothing takes from it). ``mutex`` still guards the window of an ordered reader: a
    reader that finds it closed marks itself held back under the lock, and ``raise_limit``, from
    any thread, raises the limit and reads that mark under it, so no raise misses a reader. A
    thread that reads the size (statistics) may see one a moment old.
    """

    def __init__(self, maxsize: int, name: str, aio: LoopThread) -> None:
        super().__init__(maxsize, name, aio)
        # The reader's callback, called on the loop when items or the end arrive, or when an
        # ordered reader's window opens; it takes what it has room for.
        self.on_items: Callable[[], None] | None = None
        # Under ``mutex``: the reader found items it was not allowed to take yet (an ordered
        # stage's window); ``raise_limit`` calls it again.
        self._held_back = False

    get_many = Channel._refuse

    def _yield_to_reader(self) -> bool:
        """Never: the reader is on the loop, and the loop waiting for it would freeze both."""
        return False

    def put_now(self, items: list[Any]) -> bool:
        """On the loop: append all of ``items`` if they fit now, else none; never waits. The
        reader hears of them at once (no thread reads this buffer, so none is woken).

        Raises:
            Cancelled: the channel was aborted.
        """
        if self.aborted:
            raise Cancelled
        q = self.queue
        if self._room or len(q) + len(items) > self.maxsize:
            return False  # no room, or writers wait for it already: they go first
        q.extend(items)
        self._told()
        return True

    def take(self, max_items: int) -> tuple[list[Any], int] | None:
        """On the loop: take up to ``max_items`` items that are there, without waiting.

        Returns:
            None when there is nothing to take now (empty, or an ordered reader's window is
            full). Otherwise ``(items, first_number)``, as ``Channel.get_many``: an empty list is
            the end of input (the sentinel stays at the head).

        Raises:
            Cancelled: the channel was aborted.
        """
        if self.aborted:
            raise Cancelled
        if not self.queue:
            return None
        got = self._take_now(max_items)
        if got is None:
            got = self._window_closed(max_items)
            if got is None:
                return None
        self._made_room()
        return got

    def take_one(self) -> tuple[int, Any] | None:
        """On the loop: ``take(1)`` for a reader that takes items one by one (a passing stage's
        worker, see ``CoroutineStage._take_one``), with no list made.

        Returns:
            None when there is nothing to take now; ``(number, END)`` when the end is at the head
            (it stays there); else ``(number, item)``.

        Raises:
            Cancelled: the channel was aborted.
        """
        if self.aborted:
            raise Cancelled
        q = self.queue
        if not q:
            return None
        number = self.taken
        item = q[0]
        if item is END:
            return number, END
        limit = self.limit
        if limit is not None and number >= limit:
            got = self._window_closed(1)
            if got is None:
                return None
            number = got[1]
        else:
            q.popleft()
            self.taken = number + 1
        self._made_room()
        return number, item

    def _window_closed(self, max_items: int) -> tuple[list[Any], int] | None:
        """On the loop, the reader's window found closed: look again under ``mutex``, against a
        ``raise_limit`` from another thread, and if it is still closed, mark the reader held back
        (the next raise calls it again). Returns what ``_take_now`` takes."""
        with self.mutex:
            got = self._take_now(max_items)
            if got is None:
                self._held_back = True
            return got

    def _made_room(self) -> None:
        """On the loop, after a take: writers waiting are woken for the room made, now, if there
        is room for more of them than were woken already. (Not batched at half the buffer, as a
        thread writer is: a reader with as many workers as the buffer holds then starves while
        it refills, 1.4-1.5 times the cost per item at 64 and 256 workers.)"""
        if self._room and self.maxsize - len(self.queue) > self._woken:
            self._wake_writers()

    def waiting(self) -> tuple[int, bool]:
        """On the loop: how many items wait to be taken, and whether the end is behind them (or
        alone)."""
        q = self.queue
        ended = bool(q) and q[-1] is END
        return len(q) - ended, ended

    def put_end(self) -> None:
        """Append the end-of-input sentinel; from any thread (the reader hears of it on the loop)."""
        if not self._handed_to_loop(self._end):
            self.queue.append(END)  # no loop runs: there is no reader to tell

    def _end(self) -> None:
        self.queue.append(END)
        self._told()

    def abort(self) -> None:
        """Refuse every put and take from now on, and drop the items held; from any thread."""
        self.aborted = True
        if not self._handed_to_loop(self._drop):
            self.queue.clear()  # no loop runs: nobody else changes the buffer

    def _drop(self) -> None:
        """On the loop: the buffer was aborted; let its items go and wake its waiting writers."""
        self.queue.clear()
        self._wake_writers()

    def _handed_to_loop(self, change: Callable[[], None]) -> bool:
        """Have the loop make ``change`` (a change to the buffer), now if called on the loop;
        False when no loop runs to make it (the caller then makes it itself)."""
        aio = self._aio()
        if aio is None:
            return False
        if aio.on_loop():
            change()
            return True
        return aio.call_if_running(change)

    def raise_limit(self, limit: int) -> None:
        """Allow items numbered below ``limit`` to be taken; from any thread."""
        with self.mutex:
            self.limit = limit
            held_back, self._held_back = self._held_back, False
        if held_back:
            self._handed_to_loop(self._told)  # with no loop running, nobody waits to be told

    def _told(self) -> None:
        reader = self.on_items  # read once: the reader may drop it from another thread
        if reader is not None:
            reader()
