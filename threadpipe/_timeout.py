"""The call timeout of thread stages: a call that its worker can stop waiting for.

A running call cannot be interrupted (threads cannot be, and threadpipe never injects exceptions into
them). So a thread stage with ``timeout=`` does not make its calls on the worker's own thread: each
worker hands them, one at a time, to a caller thread of its own and waits for the outcome at most
``timeout`` seconds. A call that overruns is abandoned:

* the worker raises ``TimeoutError`` for the item, which the call core (``_calls.py``) retries or
  hands to the error policy like any other failure, and counts the call in ``abandoned``;
* the worker's next call goes to a fresh caller thread, so the stage keeps at most ``workers`` calls
  that count, plus the abandoned ones;
* the abandoned thread is not one of the run's threads (the run's ``done`` and ``join()`` do not wait
  for it): when its call returns, it drops the result (or the exception) and exits.

This is the only place the timeout of thread stages lives. Only such stages pay for it: each call
is a hand-off to another thread and back (two thread switches); without a timeout the worker calls
the function itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from ._threads import PREFIX

__all__ = ["Timed"]


class _Abandoned:
    __slots__ = ()


_ABANDONED: Final = _Abandoned()


class _Caller:
    """A thread that makes one worker's calls, one at a time, until it is stopped or abandoned.

    Lock discipline: ``_go`` and ``_done`` are held except while a call is requested (``_go``) or
    its outcome is ready (``_done``): raw locks, the cheapest hand-off there is. ``_lock`` decides
    the one race, between the worker giving up on a call and the call returning just then: whoever
    takes it first wins (the outcome is set under it, and so is ``_abandoned``).

    The thread holds no reference to the stage or the run, only to the call it makes: a failure's
    traceback reaches this thread's frame, and the run holds the failure.
    """

    __slots__ = ("_abandoned", "_done", "_go", "_job", "_lock", "_outcome", "thread")

    def __init__(self, name: str) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._lock = threading.Lock()
        self._job: tuple[Callable[..., Any], tuple[Any, ...]] | None = None
        self._outcome: tuple[Any, BaseException | None] | None = None
        self._abandoned = False
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float
    ) -> tuple[Any, BaseException | None] | _Abandoned:
        """Make the call ``fn(*args)`` on this thread; its ``(result, exception)``, or
        ``_ABANDONED`` if it did not return within ``timeout`` seconds (this thread is then lost)."""
        self._job = (fn, args)
        self._go.release()
        if not self._done.acquire(True, timeout):
            with self._lock:
                if self._outcome is None:
                    self._abandoned = True
                    return _ABANDONED
            self._done.acquire()  # the call returned just now: its outcome is released at once
        outcome = self._outcome
        assert outcome is not None
        self._outcome = None
        return outcome

    def stop(self) -> None:
        """End the thread, which is idle (its worker is done), and wait for it to exit."""
        self._job = None
        self._go.release()
        self.thread.join()

    def _serve(self) -> None:
        go, done, lock = self._go, self._done, self._lock
        while True:
            go.acquire()
            job, self._job = self._job, None
            if job is None:
                return
            fn, args = job
            del job
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (fn(*args), None)
            except BaseException as exc:  # carried to the worker, raised there as itself
                outcome = (None, exc)
            del fn, args
            with lock:
                if self._abandoned:
                    return  # the worker gave up on this call: drop what it made, and exit
                self._outcome = outcome
            del outcome
            done.release()


class Timed:
    """One worker's calls of ``fn``, each given up on after ``timeout`` seconds.

    Called as ``fn`` would be, with the same arguments, it returns what ``fn`` returns and raises
    what it raises, as itself; or raises ``TimeoutError`` when the call overran and was abandoned.
    For a ``flat_map`` (``stream``), the call returns an iterator whose every step (up to each
    output, and the closing) is timed the same way.

    Args:
        fn: the user's function.
        timeout: the most seconds one call may take.
        name: the worker's name, ``<stage>-<i>``, to name the caller threads after.
        counters: the worker's counters; ``abandoned`` counts the calls given up on.
        stream: the calls return iterables (a ``flat_map`` stage).
    """

    def __init__(
        self, fn: Callable[..., Any], timeout: float, name: str, counters: Any, stream: bool
    ) -> None:
        self._fn = fn
        self._timeout = timeout
        self._name = name
        self._counters = counters
        self._stream = stream
        self._caller: _Caller | None = None
        self._made = 0

    def __call__(self, *args: Any) -> Any:
        if self._stream:
            return _TimedIterator(self, self.run(_iterate, self._fn, *args))
        return self.run(self._fn, *args)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the worker's caller thread, within the timeout.

        Raises:
            TimeoutError: the call did not return in time; it was abandoned.
            BaseException: what ``fn`` raised, as itself.
        """
        caller = self._caller
        if caller is None:
            caller = self._caller = _Caller(f"{PREFIX}{self._name}-call-{self._made}")
            self._made += 1
        outcome = caller.call(fn, args, self._timeout)
        if outcome is _ABANDONED:
            self._caller = None
            self._counters.abandoned += 1
            caller.thread.name += "-abandoned"  # so that a thread dump tells it from live ones
            raise TimeoutError(
                f"the call did not finish within timeout={self._timeout:g} s and was abandoned "
                "(its thread runs on until the call returns; its result is dropped)"
            )
        assert isinstance(outcome, tuple)
        result, error = outcome
        del outcome
        if error is not None:
            try:
                raise error
            finally:
                del error  # the traceback holds this frame
        return result

    @property
    def abandoned(self) -> int:
        """Calls of this worker given up on so far."""
        return int(self._counters.abandoned)

    def close(self) -> None:
        """Stop the worker's caller thread (abandoned ones exit when their calls return)."""
        caller, self._caller = self._caller, None
        if caller is not None:
            caller.stop()


def _iterate(fn: Callable[..., Any], *args: Any) -> Iterator[Any]:
    return iter(fn(*args))


class _TimedIterator(Iterator[Any]):
    """A ``flat_map`` call's outputs: each step runs on the caller thread, within the timeout.

    After a step was abandoned, the iterator is still running on the abandoned thread: it is
    never touched again (not even closed: a running generator cannot be).
    """

    def __init__(self, timed: Timed, outputs: Iterator[Any]) -> None:
        self._timed = timed
        self._outputs: Iterator[Any] | None = outputs

    def __next__(self) -> Any:
        outputs = self._outputs
        if outputs is None:
            raise StopIteration
        abandoned = self._timed.abandoned
        try:
            return self._timed.run(next, outputs)
        except BaseException:
            if self._timed.abandoned != abandoned:
                self._outputs = None
            raise

    def close(self) -> None:
        """Close the outputs (a generator's ``finally`` blocks run), within the timeout."""
        outputs, self._outputs = self._outputs, None
        close = getattr(outputs, "close", None)
        if close is not None:
            self._timed.run(close)
