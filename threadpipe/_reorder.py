"""The reorder buffer: lets an ordered stage run several workers and still emit in input order.

Each batch a worker takes is numbered by the input channel when it is taken. When the worker is
done, it hands the batch's outputs to :meth:`Reorder.complete`. Results that finish ahead of their
turn wait in a dict; whoever completes the head of the line emits it and every finished batch that
follows it. Nothing is ever collected whole and sorted: output streams as soon as order allows.

A :class:`Gate` bounds the buffer. A worker takes one permit per input item before taking the item
and the permit is returned only when the item's outputs leave the buffer, so a stage never holds
more than ``window`` items, however long one slow item keeps the head of the line waiting.
"""

from __future__ import annotations

import threading
from typing import Any

from ._channel import Channel, Closed

__all__ = ["Gate", "Reorder"]


class Gate:
    """A closable counting semaphore that grants several permits at once.

    Args:
        permits: the number of permits, >= 1.
    """

    def __init__(self, permits: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._free = permits
        self.closed = False

    def acquire(self, wanted: int) -> int:
        """Wait for at least one permit, then take up to ``wanted`` of those free.

        Returns:
            The number of permits taken, between 1 and ``wanted``.

        Raises:
            Closed: the gate was closed.
        """
        with self._cond:
            while not self._free:
                if self.closed:
                    raise Closed
                self._cond.wait()
            if self.closed:
                raise Closed
            n = wanted if wanted < self._free else self._free
            self._free -= n
            return n

    def release(self, n: int) -> None:
        """Return ``n`` permits."""
        if n:
            with self._cond:
                self._free += n
                self._cond.notify(n)

    def close(self) -> None:
        """Wake every waiter; from now on ``acquire`` raises :class:`Closed`."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Reorder:
    """Puts the outputs of numbered batches into ``out`` in the order of their numbers.

    Args:
        out: the channel that receives the outputs.
        window: the most input items the stage may hold at once, >= 1.
    """

    def __init__(self, out: Channel, window: int) -> None:
        self.out = out
        self.gate = Gate(window)
        self.window = window
        # Lock discipline: ``_lock`` is held while emitting into ``out``, which may block on a full
        # channel. That is what keeps two emitters from interleaving; a cancel closes ``out``, so the
        # holder always wakes and releases the lock.
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[int, list[Any]]] = {}

    def held(self) -> int:
        """How many finished batches wait for their turn (a snapshot)."""
        return len(self._waiting)

    def complete(self, number: int, count: int, outputs: list[Any]) -> None:
        """Hand over the outputs of the ``count`` input items numbered from ``number``.

        Raises:
            Closed: the run was cancelled while emitting.
        """
        with self._lock:
            if number != self._next:
                self._waiting[number] = (count, outputs)
                return
            released = count
            nxt = number + count
            waiting = self._waiting
            if nxt in waiting:
                outputs = list(outputs)
                while nxt in waiting:
                    more_count, more = waiting.pop(nxt)
                    outputs.extend(more)
                    released += more_count
                    nxt += more_count
            self._next = nxt
            if outputs:
                self.out.put_many(outputs)
        self.gate.release(released)

    def skip(self, number: int, count: int) -> None:
        """Record that the items numbered from ``number`` produced nothing (end of input reached)."""
        self.complete(number, count, [])
