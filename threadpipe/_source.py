"""The source: the user's iterable, and the feeder thread that pulls it into the first buffer."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from ._channel import Channel
from ._errors import SourceConsumedError, describe
from ._scope import Cancelled, Scope
from ._threads import Crew

if TYPE_CHECKING:
    from ._run import RunState

__all__ = ["SOURCE_NAME", "QueueSource", "Source"]

_QUEUE_SLICE = 0.1

SOURCE_NAME = "source"


# Built-in containers: iterating them never blocks, so the feeder may take several items at a time
# without holding back an item that a worker is waiting for. (A user's Sequence may load items
# lazily, so only these exact types qualify.)
_IN_MEMORY: tuple[type, ...] = (list, tuple, range, str, bytes, bytearray, dict, set, frozenset, deque)


def _is_iterable(obj: object) -> bool:
    cls = type(obj)
    return hasattr(cls, "__iter__") or hasattr(cls, "__getitem__")


class Source:
    """A pipeline's source as built: an iterable, and whether it can be iterated more than once.

    An object that is its own iterator (a generator, a file, ``iter(x)``) can feed one run only; any
    other iterable (a list, a range, a dict) is iterated afresh by every run.

    Args:
        iterable: the items to feed.
        call: the building call's name, for the message of a bad argument.

    Raises:
        TypeError: ``iterable`` is not iterable.
    """

    is_async = False  # iterated on the run's event loop

    def __init__(self, iterable: Iterable[Any], call: str = "from_iter") -> None:
        if not _is_iterable(iterable):
            raise TypeError(
                f"{call}(iterable) needs an iterable, got {describe(iterable)} "
                f"of type {type(iterable).__qualname__}"
            )
        self.iterable = iterable
        self.one_shot = iter(iterable) is iterable
        self.in_memory = type(iterable) in _IN_MEMORY
        self._lock = threading.Lock()
        self._opened = False

    def held(self, first_capacity: int) -> int:
        """The most items the feeder holds: one, or a buffer's worth from a container in memory."""
        return first_capacity if self.in_memory else 1

    def open(self) -> Iterator[Any]:
        """Return a fresh iterator over the items.

        Raises:
            SourceConsumedError: the source is a one-shot iterator that a previous run already used.
        """
        with self._lock:
            if self.one_shot:
                if self._opened:
                    raise SourceConsumedError(
                        f"this pipeline's source is a one-shot iterator "
                        f"({type(self.iterable).__qualname__}) that an earlier run already consumed; "
                        "build the pipeline on a re-iterable source (a list, a range) to run it again"
                    )
                self._opened = True
        return iter(self.iterable)

    def launch(
        self, opened: Iterator[Any], out: Channel, state: RunState, scope: Scope, aio: Any
    ) -> None:
        """Start the feeder thread over what :meth:`open` returned; or, for a container in memory
        whose first buffer is written on the run's loop (a coroutine stage reads it), a task there."""
        if aio is not None and getattr(out, "written_on_loop", False):
            aio.feeder(opened, out, scope).start()
            return
        start_feeder(opened, out, state, scope, self.in_memory)


def start_feeder(
    iterator: Iterator[Any], out: Channel, run: RunState, scope: Scope, in_memory: bool = False
) -> Crew:
    """Start the feeder thread (``threadpipe-source-0``) that pulls ``iterator`` into ``out``."""
    crew = Crew(SOURCE_NAME, run, scope, out, pooled=True)
    crew.start(feed, iterator, out, run, scope, in_memory)
    return crew


def feed(
    index: int,
    iterator: Iterator[Any],
    out: Channel,
    run: RunState,
    scope: Scope,
    in_memory: bool = False,
) -> bool:
    """Pull ``iterator`` into ``out`` until it ends or the scope is cancelled; the feeder's body.

    A generator is closed here, in the thread that iterates it (a generator cannot be closed from
    another thread while it runs), so its ``finally`` blocks run when the run is cancelled.

    Args:
        index: the thread's number (0).
        iterator: the items.
        out: the first buffer.
        run: the run's shared state.
        scope: the source's scope (the first segment's).
        in_memory: the items come from a built-in container, so taking a buffer's worth at a time
            cannot keep an item waiting on the source.

    Returns:
        Whether the source was exhausted (its crew then sends the end on).
    """
    stop = scope.cancelled
    exhausted = False
    try:
        if in_memory:
            size = out.maxsize
            while not stop[0]:
                chunk = list(islice(iterator, size))
                if not chunk:
                    exhausted = True
                    return True
                out.put_many(chunk)
                del chunk
            return False
        for item in iterator:
            if stop[0]:
                return False
            if not out.try_put(item):
                out.put_many([item])
            del item
        exhausted = True
        return True
    except Cancelled:
        return False  # cancelled, or cut off by a take() downstream
    except BaseException as exc:
        exhausted = True  # a generator that raised is finished already
        run.fail(exc, scope, SOURCE_NAME, None, has_item=False)
        return False
    finally:
        try:
            close = getattr(iterator, "close", None)
            if close is not None and not exhausted:
                close()
        except BaseException as exc:
            run.fail(exc, scope, SOURCE_NAME, None, has_item=False)


class QueueSource:
    """A pipeline's source that reads a ``queue.Queue`` until a sentinel arrives.

    For a producer thread feeding a pipeline: every run reads the queue until the next sentinel,
    so the same pipeline can be run again for the next batch of work. The feeder waits on the
    queue in short slices, so a cancel ends it promptly even while the queue is empty.

    Args:
        q: the queue to read.
        sentinel: the object that ends the input (compared with ``is``; ``None`` is allowed).

    Raises:
        TypeError: ``q`` is not a ``queue.Queue`` (or has no ``get(timeout=...)``).
    """

    is_async = False  # iterated on the run's event loop

    in_memory = False
    one_shot = False
    iterable = None  # no length to show: progress bars count without a total

    def __init__(self, q: Any, sentinel: object) -> None:
        if not callable(getattr(q, "get", None)):
            raise TypeError(
                f"from_queue(q) needs a queue.Queue, got {describe(q)} of type {type(q).__qualname__}"
            )
        self.q = q
        self.sentinel = sentinel

    def held(self, first_capacity: int) -> int:
        """The most items the feeder holds: the one it took from the queue."""
        return 1

    def open(self) -> None:
        """Nothing to open: every run reads the queue on from where the last one stopped."""

    def launch(self, opened: None, out: Channel, state: RunState, scope: Scope, aio: Any) -> None:
        """Start the feeder thread."""
        waker = _Waker(self.q)
        scope.add(waker)
        start_feeder(self._items(scope), out, state, scope)

    def _items(self, scope: Scope) -> Iterator[Any]:
        """The items up to the sentinel; nothing is taken from the queue once ``scope`` is cancelled.

        An item taken is in the run: the next run starts after it. So the check that the scope is
        live and the taking are one step, under a ``queue.Queue``'s own lock, and a cancel (a
        ``take()`` downstream that has all it needs) wakes the wait through the same lock; no item
        put after a cancel is ever taken by it. Any other queue (``get(timeout=...)`` only) is read
        in slices of 0.1 s, checking the flag between them.
        """
        q, sentinel, stop = self.q, self.sentinel, scope.cancelled
        native = isinstance(q, queue.Queue)
        while True:
            if native:
                with q.not_empty:
                    while not q._qsize() and not stop[0]:
                        q.not_empty.wait()
                    if stop[0]:
                        return
                    item = q._get()
                    q.not_full.notify()
            else:
                if stop[0]:
                    return
                try:
                    # A slice, not a blocking get: a cancel must end this thread even when
                    # nothing ever arrives (ten wake-ups a second cost nothing measurable).
                    item = q.get(timeout=_QUEUE_SLICE)
                except queue.Empty:
                    continue
            if item is sentinel:
                return
            yield item
            del item


class _Waker:
    """Wakes a feeder waiting on a ``queue.Queue`` when its scope is cancelled.

    The scope's flag is up before this runs, and the feeder reads it under the queue's lock before
    it waits: so it either sees the flag or is waiting when this notifies, under the same lock.
    """

    def __init__(self, q: Any) -> None:
        self.q = q

    def abort(self) -> None:
        if isinstance(self.q, queue.Queue):
            with self.q.not_empty:
                self.q.not_empty.notify_all()
