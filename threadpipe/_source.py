"""The source: the user's iterable, and the feeder thread that pulls it into the first buffer."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any

from ._channel import Channel, Closed
from ._errors import SourceConsumedError, describe

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

    Raises:
        TypeError: ``iterable`` is not iterable.
    """

    def __init__(self, iterable: Iterable[Any]) -> None:
        if not _is_iterable(iterable):
            raise TypeError(
                f"from_iter(iterable) needs an iterable, got {describe(iterable)} "
                f"of type {type(iterable).__qualname__}"
            )
        self.iterable = iterable
        self.one_shot = iter(iterable) is iterable
        self.in_memory = type(iterable) in _IN_MEMORY
        self._lock = threading.Lock()
        self._opened = False

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


def feed(iterator: Iterator[Any], out: Channel, run: RunState, in_memory: bool = False) -> None:
    """Pull ``iterator`` into ``out`` until it ends or the run stops; runs in the feeder thread.

    A generator is closed here, in the thread that iterates it (a generator cannot be closed from
    another thread while it runs), so its ``finally`` blocks run when the run is cancelled.

    Args:
        iterator: the items.
        out: the first buffer.
        run: the run's shared state.
        in_memory: the items come from a built-in container, so taking a buffer's worth at a time
            cannot keep an item waiting on the source.
    """
    stop = run.stop
    exhausted = False
    try:
        if in_memory:
            size = out.maxsize
            while not stop[0]:
                chunk = list(islice(iterator, size))
                if not chunk:
                    exhausted = True
                    out.put_end()
                    return
                out.put_many(chunk)
                del chunk
            return
        for item in iterator:
            if stop[0]:
                break
            if not out.try_put(item):
                out.put_many([item])
            del item
        else:
            exhausted = True
            out.put_end()
            return
    except Closed:
        pass  # cancelled, or cut off by a take() downstream
    except BaseException as exc:
        exhausted = True  # a generator that raised is finished already
        run.fail(exc, SOURCE_NAME, None, has_item=False)
    finally:
        try:
            close = getattr(iterator, "close", None)
            if close is not None and not exhausted:
                close()
        except BaseException as exc:
            run.fail(exc, SOURCE_NAME, None, has_item=False)
        finally:
            run.thread_exited()


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

    def launch(self, out: Channel, state: RunState) -> None:
        """Start the feeder thread; called by ``Pipeline.start``."""
        state.thread_started()
        try:
            threading.Thread(
                target=feed,
                args=(self._items(state), out, state),
                name=f"threadpipe-{SOURCE_NAME}-0",
                daemon=True,
            ).start()
        except BaseException:
            state.thread_exited()
            raise

    def _items(self, state: RunState) -> Iterator[Any]:
        q, sentinel, stop = self.q, self.sentinel, state.stop
        while not stop[0]:
            try:
                # A slice, not a blocking get: a cancel must end this thread even when nothing
                # ever arrives (ten wake-ups a second cost nothing measurable).
                item = q.get(timeout=_QUEUE_SLICE)
            except queue.Empty:
                continue
            if item is sentinel:
                return
            yield item
