"""The one stop: a cancel scope per run, and one per segment that a ``take()`` can cut off.

Every way a run can stop early (the caller's ``cancel()``, a break out of its loop, a failure, a
dropped run, Ctrl-C, a ``take()`` or ``pipe()`` that has all it needs) is one operation:
:meth:`Scope.cancel`. Cancelling a scope

* raises its flag, which every worker reads before every call, so no new call starts;
* sets its event, so a thread waiting on a clock (a retry's backoff, a rate limit) wakes at once;
* aborts everything registered with it (:meth:`Scope.add`): the channels its stages write, which
  wakes every thread blocked on them; the coroutine tasks and executor futures of its stages; its
  sources, which are closed;
* cancels its child scopes.

A run has a root scope. Its stages are grouped into segments, cut at each stream operator that can
end the run early (``take``, ``pipe``): segment ``i`` holds the stages up to the ``i``-th such
operator, which itself belongs to the next segment. Cutting at that operator cancels every segment
before it and leaves the rest running to a normal end. The root cancels every segment.

Ending is not aborting: the end of input is the sentinel that travels down the channels
(``Channel.put_end``); a cancel never sends it, and an aborted channel is not a finished one.

Free-threading note: ``cancelled`` is written once (False to True) under ``_lock`` and read without
it; a reader that sees the old value starts at most the one call it was about to start.
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["Abortable", "Cancelled", "Scope"]


class Cancelled(BaseException):
    """Raised inside the library when a wait is cut short because its scope was cancelled.

    A ``BaseException``, like ``trio.Cancelled``: a user's ``except Exception`` around code that
    calls back into the library (a ``pipe()`` generator reading its inputs) does not swallow it.
    The thread that catches it exits quietly; it never reaches a caller.
    """


class Abortable(Protocol):
    """Anything a scope stops: a channel, a stage's tasks or futures, a source."""

    def abort(self) -> None: ...


class Scope:
    """A cancel scope: one flag, one event, and what to abort when it is cancelled.

    Args:
        parent: the scope whose cancel also cancels this one (the run's root), or None.
    """

    __slots__ = ("_children", "_lock", "_members", "cancelled", "event")

    def __init__(self, parent: Scope | None = None) -> None:
        # A one-element list rather than the event: workers read it before every call, and
        # indexing a list is the cheapest read there is.
        self.cancelled = [False]
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._members: list[Abortable] = []
        self._children: list[Scope] = []
        if parent is not None:
            parent._children.append(self)  # built before any thread of the run starts

    def __repr__(self) -> str:
        return f"<Scope {'cancelled' if self.cancelled[0] else 'live'} members={len(self._members)}>"

    def add(self, member: Abortable) -> None:
        """Abort ``member`` when this scope is cancelled (at once if it already is)."""
        with self._lock:
            if not self.cancelled[0]:
                self._members.append(member)
                return
        _abort(member)

    def cancel(self) -> None:
        """Cancel the scope and its children: no new call, every waiter wakes, members abort.

        Idempotent, and safe from any thread except while holding a lock a member's ``abort``
        takes. Every call aborts every member again (aborting is idempotent), so a cancel that was
        interrupted half way (a second Ctrl-C) is finished by the next one.
        """
        with self._lock:
            self.cancelled[0] = True
            members = list(self._members)
        self.event.set()
        for child in self._children:
            child.cancel()
        for member in members:
            _abort(member)


    def release(self) -> None:
        """Forget the members and children: the run is done, nothing is left to abort.

        Members hold the run (a stage holds its state, which holds this scope): dropping them
        when the last thread exits leaves no cycle, so a finished run is freed by reference
        counting alone.
        """
        with self._lock:
            self._members = []
        for child in self._children:
            child.release()
        self._children = []


def _abort(member: Abortable) -> None:
    # One member failing to abort must not leave the others (and their threads) blocked.
    try:
        member.abort()
    except Exception:
        pass
