"""The reorder buffer: lets an ordered stage run several workers and still emit in input order.

Each batch a worker takes is numbered by the input channel when it is taken. When the worker is
done, it hands the batch's outputs to :meth:`Reorder.complete`. Results that finish ahead of their
turn wait in a dict; whoever completes the head of the line emits it and every finished batch that
follows it. Nothing is ever collected whole and sorted: output streams as soon as order allows.

The input channel's limit bounds the buffer: items may be taken only while their number is below
``next + window``, where ``next`` is the number of the first item whose outputs have not left yet.
So a stage never holds more than ``window`` items, however long one slow item keeps the head of the
line waiting.
"""

from __future__ import annotations

import threading
from typing import Any

from ._channel import Channel
from ._scope import Cancelled

__all__ = ["Reorder"]


class Reorder:
    """Puts the outputs of numbered batches into ``out`` in the order of their numbers.

    Args:
        inp: the stage's input channel, whose numbering the batches carry; its limit is the window.
        out: the channel that receives the outputs.
        window: the most input items the stage may hold at once, >= 1.
    """

    def __init__(self, inp: Channel, out: Channel, window: int) -> None:
        self.inp = inp
        self.out = out
        self.window = window
        inp.raise_limit(window)
        # Lock discipline: ``_lock`` is held while emitting into ``out``, which may block on a full
        # channel. That is what keeps two emitters from interleaving; a cancel closes ``out``, so the
        # holder always wakes and releases the lock.
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[int, list[Any]]] = {}
        self._parked = 0  # outputs waiting in ``_waiting``
        # Workers waiting for their turn (``wait_turn``) wait on a condition of their own, not on
        # ``_lock``, which an emitter holds while it waits for room downstream: an abort must be
        # able to wake them without waiting for that emitter.
        self._turn = threading.Condition(threading.Lock())
        self._turn_waiters = 0
        self._aborted = False

    def abort(self) -> None:
        """Wake every worker waiting for its turn; they raise ``Cancelled``. Idempotent."""
        with self._turn:
            self._aborted = True
            self._turn.notify_all()

    def complete_within(self, number: int, count: int, outputs: list[Any], room: int) -> None:
        """As :meth:`complete`, parking the outputs only while at most ``room`` outputs wait.

        For a stage whose items make many outputs (``flat_map``): a batch that would take the
        parked outputs past ``room`` waits for its turn instead, so the buffer holds at most
        ``room`` outputs however many items wait, and a worker whose outputs fit goes on to its
        next items (a slow head of the line does not idle the others).

        Raises:
            Cancelled: the run was cancelled while waiting or emitting.
        """
        with self._lock:
            fits = number == self._next or self._parked + len(outputs) <= room
        if not fits:
            self.wait_turn(number)
        self.complete(number, count, outputs)

    def wait_turn(self, number: int) -> None:
        """Wait until the batch numbered ``number`` is at the head of the line.

        Then every earlier batch's outputs have left, and the caller may put its outputs into
        ``out`` directly, until it completes its batch.

        Raises:
            Cancelled: the stage's scope was cancelled.
        """
        with self._turn:
            self._turn_waiters += 1
            try:
                while self._next != number:
                    if self._aborted:
                        raise Cancelled
                    self._turn.wait()
            finally:
                self._turn_waiters -= 1

    @property
    def head(self) -> int:
        """The number of the first item whose outputs have not all left yet."""
        return self._next

    def held(self) -> int:
        """How many finished batches wait for their turn (a snapshot)."""
        return len(self._waiting)

    def complete(self, number: int, count: int, outputs: list[Any]) -> None:
        """Hand over the outputs of the ``count`` input items numbered from ``number``.

        Raises:
            Cancelled: the run was cancelled while emitting.
        """
        with self._lock:
            if number != self._next:
                self._waiting[number] = (count, outputs)
                self._parked += len(outputs)
                return
            nxt = number + count
            waiting = self._waiting
            if nxt in waiting:
                outputs = list(outputs)
                while nxt in waiting:
                    more_count, more = waiting.pop(nxt)
                    self._parked -= len(more)
                    outputs.extend(more)
                    nxt += more_count
            if outputs:
                self.out.put_many(outputs)
            self._next = nxt
            # Under the lock, so that limits only ever go up.
            self.inp.raise_limit(nxt + self.window)
        # Counted under ``_turn`` before a waiter re-reads ``_next``: either it sees the new
        # head, or this sees it waiting and wakes it. Nobody waiting costs no lock at all.
        if self._turn_waiters:
            with self._turn:
                self._turn.notify_all()
