"""A run: one execution of a pipeline, its shared state, and the caller's end of it.

:class:`RunState` is what the threads share: the stop flag, the first error, and the count of live
threads. :class:`Run` is what the caller holds: iterate it, join it, cancel it, or use it as a context
manager. Threads hold only the state, never the :class:`Run`, so dropping the last reference to an
unfinished run cancels it.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ._calls import ItemError
from ._channel import Channel, Closed
from ._errors import RunStateError, label
from ._stats import Clock, StageStats, render_report, snapshot

if TYPE_CHECKING:
    import os

    from ._monitor import Monitor
    from ._trace import Tracer

__all__ = ["MAX_ITEM_ERRORS", "Run", "RunState"]

T = TypeVar("T")

MAX_ITEM_ERRORS = 10_000
"""How many handled failures ``Run.errors`` keeps; later ones are counted, not kept."""

# The caller's thread waits in slices this long, so that Ctrl-C is handled promptly on every platform.
_SLICE = 0.1


class _Closable(Protocol):
    def close(self) -> None: ...


class RunState:
    """What the threads of one run share."""

    def __init__(self) -> None:
        # A one-element list rather than an Event: workers read it before every call, and indexing
        # a list is the cheapest read there is. Written once (False -> True), under ``_lock``.
        self.stop = [False]
        self.error: BaseException | None = None
        self.cancelled = False
        # Set when the caller has received the end of input: every call has returned by then
        # (each stage sends the sentinel on only after all its workers finished), so there is
        # nothing left to cancel, only threads on their way out.
        self.finished = False
        self.done = threading.Event()
        self.closables: list[_Closable] = []
        # Wall and CPU time from now to the last thread's exit, for statistics; and the call
        # recorder when the run is traced (workers read it once, when they start).
        self.clock = Clock()
        self.trace: Tracer | None = None
        # Set with ``stop``: threads that wait on a clock (a retry's backoff, a rate limit) wait
        # on this, so a stop wakes them too.
        self.stopped = threading.Event()
        # Failures an error policy handled (the run went on without the item), in order; capped.
        self.errors: list[ItemError] = []
        self.errors_dropped = 0
        # The channels in pipeline order (the source's output first), and the producers of those
        # a take() has cut off: their late failures concern items nobody will read.
        self.channels: list[Channel] = []
        self.halted: set[str] = set()
        self._lock = threading.Lock()
        self._live = 0

    def thread_started(self) -> None:
        """Count a thread about to start; the run is done when every counted thread has exited."""
        with self._lock:
            self._live += 1

    def thread_exited(self) -> None:
        """Count a thread out; the last one marks the run done."""
        with self._lock:
            self._live -= 1
            last = self._live == 0
        if last:
            self.clock.stop()
            self.done.set()

    @property
    def live_threads(self) -> int:
        """Threads of the run that have not exited yet."""
        return self._live

    def fail(self, exc: BaseException, stage: str, item: object, *, has_item: bool = True) -> None:
        """Record a failure and stop the run; the first failure is the one the caller sees.

        Args:
            exc: the exception, raised again to the caller as itself.
            stage: the stage it was raised in.
            item: the item being processed.
            has_item: False when there was no item (the source failed).
        """
        label(exc, stage, item, has_item=has_item)
        with self._lock:
            if stage in self.halted:
                return
            if self.error is None:
                self.error = exc
        self._stop()

    def record_error(self, error: ItemError) -> None:
        """Keep a failure that an error policy handled, up to ``MAX_ITEM_ERRORS`` of them."""
        with self._lock:
            if len(self.errors) < MAX_ITEM_ERRORS:
                self.errors.append(error)
            else:
                self.errors_dropped += 1

    def halt_upstream(self, channel: Channel) -> None:
        """Stop everything that feeds ``channel``: the source and the stages before it.

        Their channels up to ``channel`` are closed, which wakes them and makes them exit; the
        stages after it go on and end normally. Used by ``take()`` once it has all it needs.
        """
        index = self.channels.index(channel)
        upstream = self.channels[: index + 1]
        with self._lock:
            # Channel i is written by the source (i = 0) or by stage i - 1: name them all halted.
            self.halted.update(ch.name for ch in upstream)
        for ch in upstream:
            ch.close()

    def cancel(self) -> None:
        """Stop the run at the caller's request: no new calls start, every blocked thread wakes.

        A no-op on a run that already ended or delivered all its outputs, so that cleaning up after
        a complete run does not mark it cancelled.
        """
        if self.done.is_set() or self.finished:
            return
        with self._lock:
            if not self.stop[0]:
                self.cancelled = True
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            self.stop[0] = True
        self.stopped.set()
        # Every time, not only the first: closing is idempotent, and a stop interrupted half way
        # (a second Ctrl-C while closing) is then finished by the next cancel.
        self._close_all()

    def _close_all(self) -> None:
        # One closable failing must not leave the others open (and their threads blocked).
        for closable in self.closables:
            try:
                closable.close()
            except Exception:
                pass

    def cancel_stopped(self) -> None:
        """Finish a cancel whose stop flag was already set without the lock (see ``_cancel_dropped``)."""
        with self._lock:
            if self.error is None:
                self.cancelled = True
        self.stopped.set()
        self._close_all()


def _cancel_dropped(state: RunState) -> None:
    """Cancel a run whose last reference was dropped, without taking a lock in this thread.

    A finalizer runs wherever the garbage collector happens to run, possibly in a worker that
    holds a channel's lock at that moment; cancelling here could then wait for that very lock. So
    the stop flag is set at once (no new call starts) and the closing is left to a thread of its
    own. At interpreter exit, when no thread can start, cancelling here is safe: it is the main
    thread, between the script's last line and the exit.
    """
    if state.done.is_set() or state.finished:
        return
    state.stop[0] = True
    try:
        threading.Thread(target=state.cancel_stopped, name="threadpipe-cancel-0", daemon=True).start()
    except RuntimeError:
        state.cancel_stopped()


class _Output(Generic[T]):
    """The caller's iterator over a run's outputs: takes them from the last channel in batches."""

    def __init__(self, run: Run[T]) -> None:
        self._run = run  # keeps the run alive (and so not cancelled) while this iterator is
        self._state = run._state
        self._channel = run._output
        self._stop = run._state.stop
        self._buffer: deque[Any] = deque()
        self._batch = max(1, run._output.maxsize)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._buffer and not self._stop[0]:
            return self._buffer.popleft()  # type: ignore[no-any-return]
        return self._refill()

    def _refill(self) -> T:
        while True:
            if self._stop[0]:
                self._stopped()
            try:
                got = self._channel.get_many(self._batch, _SLICE)
            except Closed:
                self._stopped()
            except BaseException:
                # Ctrl-C (or any asynchronous exception) while waiting: stop the run, then let it go.
                self._state.cancel()
                raise
            if got is None:
                continue
            items = got[0]
            if not items:
                self._state.finished = True
                self._run._close_monitor()  # final counts drawn before the caller goes on
                raise StopIteration
            buffer = self._buffer
            buffer.extend(items)
            return buffer.popleft()  # type: ignore[no-any-return]

    def count(self) -> int:
        """Consume everything left and return how many outputs there were (no per-item call)."""
        n = len(self._buffer)
        self._buffer.clear()
        while True:
            if self._stop[0]:
                self._stopped()
            try:
                got = self._channel.get_many(self._batch, _SLICE)
            except Closed:
                self._stopped()
            except BaseException:
                self._state.cancel()
                raise
            if got is None:
                continue
            if not got[0]:
                self._state.finished = True
                self._run._close_monitor()
                return n
            n += len(got[0])

    def _stopped(self) -> Any:
        self._buffer.clear()
        self._run._raise_error()
        raise StopIteration


class Run(Generic[T]):
    """One execution of a pipeline, returned by :meth:`Pipeline.start`.

    Iterate it (once) to get the outputs. ``join()`` waits for every thread and raises the stage's
    exception if one failed. ``cancel()`` stops it. As a context manager, leaving the block cancels
    whatever is unfinished and joins.
    """

    def __init__(
        self,
        state: RunState,
        output: Channel,
        stages: tuple[Any, ...],
        monitor: Monitor | None = None,
    ) -> None:
        self._state = state
        self._output = output
        self._stages = stages
        self._monitor = monitor  # the thread sampling the run and drawing its bars, if any
        self._iterated = False
        # Dropping the last reference to an unfinished run cancels it, and so does interpreter exit
        # (finalize runs its callbacks at exit), so a forgotten run never keeps threads busy.
        self._finalizer = weakref.finalize(self, _cancel_dropped, state)

    def __repr__(self) -> str:
        if self._state.error is not None:
            status = f"failed: {type(self._state.error).__name__}"
        elif self._state.cancelled:
            status = "cancelled"
        elif self._state.done.is_set():
            status = "done"
        else:
            status = "running"
        names = ", ".join(stage.spec.name for stage in self._stages)
        return f"<threadpipe.Run [{names}] {status}>"

    def __iter__(self) -> Iterator[T]:
        """Return the iterator over the outputs.

        Raises:
            RunStateError: the run was already iterated.
        """
        self._claim()
        return _Output(self)

    def _claim(self) -> None:
        """Mark the run's outputs as taken by an iterator; a run yields them once."""
        if self._iterated:
            raise RunStateError(
                "this run was already iterated: a run yields its outputs once; "
                "call pipeline.start() again for a new run"
            )
        self._iterated = True

    def __aiter__(self) -> AsyncIterator[T]:
        """Return an async iterator over the outputs, for ``async for x in run``.

        Waiting for an output never blocks the caller's event loop: a helper thread waits and wakes
        the caller's task through its loop. Otherwise as iterating the run: the outputs come once,
        and a stage's exception is raised as itself. Leaving the loop early does not cancel the
        run; ``cancel()`` does.

        Raises:
            RunStateError: the run was already iterated.
        """
        self._claim()
        from ._aio import AsyncOutput  # here, not at the top: only async callers import asyncio

        return AsyncOutput(self)

    @property
    def done(self) -> bool:
        """Whether every thread of the run has exited."""
        return self._state.done.is_set()

    @property
    def cancelled(self) -> bool:
        """Whether the run was cancelled (by ``cancel()``, an early exit or a dropped iterator)."""
        return self._state.cancelled

    @property
    def errors(self) -> list[ItemError]:
        """The failures an ``on_error`` policy handled so far, in order (a copy).

        Each has ``.stage``, ``.item`` and ``.exception`` (the exception itself, with its note).
        At most ``MAX_ITEM_ERRORS`` (10,000) are kept; the stage's ``errors`` count has them all.
        """
        with self._state._lock:
            return list(self._state.errors)

    @property
    def exception(self) -> BaseException | None:
        """The exception that failed the run, or None."""
        return self._state.error

    def cancel(self) -> None:
        """Stop the run without waiting for it.

        No function is called again after this returns, blocked threads wake and exit, the source
        is no longer pulled (a generator source is closed by the feeder thread). A call already
        running is not interrupted: its thread exits when the call returns. Iteration ends quietly
        (or raises the run's exception if a stage had already failed). Progress bars are closed
        before this returns. Idempotent.
        """
        self._state.cancel()
        self._close_monitor()

    def join(self, timeout: float | None = None) -> None:
        """Wait until every thread of the run has exited.

        This does not consume outputs: iterate the run (or cancel it) first, otherwise a run whose
        outputs nobody reads waits once its last buffer is full.

        Args:
            timeout: the most seconds to wait; None waits as long as it takes.

        Raises:
            TimeoutError: the timeout passed with threads still running (the run goes on).
            BaseException: the exception a stage or the source raised, as itself.
        """
        deadline = None if timeout is None else monotonic() + timeout
        done = self._state.done
        try:
            while True:
                wait = _SLICE if deadline is None else min(_SLICE, max(0.0, deadline - monotonic()))
                if done.wait(wait):
                    break
                if deadline is not None and monotonic() >= deadline:
                    raise TimeoutError(
                        f"the run did not finish within {timeout} s "
                        f"({self._state.live_threads} threads still running)"
                    )
        except KeyboardInterrupt:
            self._state.cancel()
            raise
        self._raise_error()

    def _raise_error(self) -> None:
        self._close_monitor()  # the bars close before an exception or the caller's next output
        error = self._state.error
        if error is not None:
            try:
                raise error
            finally:
                # The traceback holds this frame, which holds ``error``: drop the local reference
                # so the exception does not keep the frame (and its locals) alive in a cycle.
                error = None

    # ------------------------------------------------------------------ observing

    def _close_monitor(self) -> None:
        monitor = self._monitor
        if monitor is not None:
            monitor.close()

    def _finished(self) -> bool:
        return self._state.done.is_set() or self._state.finished or self._state.stop[0]

    def stats(self) -> tuple[StageStats, ...]:
        """A snapshot of every stage's statistics, during the run or after it.

        Statistics are always kept: each worker counts its own items and busy time, and this call
        merges the counts. Utilization is measured against the wall time of the run so far.

        Returns:
            One frozen :class:`StageStats` per stage, in stage order.
        """
        if self._finished():
            self._close_monitor()  # the bars show the final counts before the caller goes on
        return snapshot(self._stages, self._state.clock)

    def report(self) -> str:
        """A readable report: the statistics table, the bottleneck stage, why, and what to try.

        The bottleneck is the busiest stage (highest utilization), with a full buffer before it and
        an empty one after it. Buffer fill, CPU peak and memory are sampled only by a run started
        with ``progress=`` or ``monitor=True``; without them the verdict rests on utilization.

        Returns:
            The report, several lines, without a trailing newline.
        """
        stats = self.stats()
        monitor = self._monitor
        samples = None if monitor is None else monitor.samples()
        return render_report(stats, self._state, self._output, samples, monitor is not None)

    def _tracer(self) -> Tracer:
        tracer = self._state.trace
        if tracer is None:
            raise RunStateError("this run was not traced: start it with start(trace=True)")
        return tracer

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write the calls recorded so far as Chrome trace-event JSON (Perfetto, chrome://tracing).

        Each stage is a process, each worker a thread, each call an ``"X"`` event (``ts`` and
        ``dur`` in microseconds from the run's start, the item number in ``args``).

        Args:
            path: the file to write.

        Raises:
            RunStateError: the run was not started with ``trace=``.
            OSError: the file cannot be written.
        """
        self._tracer().save(path)

    def plot_timeline(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        """Draw the calls recorded so far as a Gantt chart (one lane per worker) and save it.

        Args:
            path: the image file to write; the format follows the suffix (``.png``, ``.svg``).
            title: the chart's title (default: how many calls it shows).

        Raises:
            RunStateError: the run was not started with ``trace=``.
            ImportError: matplotlib is not installed (``pip install 'threadpipe[plot]'``).
            OSError: the file cannot be written.
        """
        self._tracer().plot(path, title)

    def __enter__(self) -> Run[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state.cancel()  # a no-op when every output was delivered
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Ctrl-C or SystemExit: return control at once rather than wait for running calls.
            return
        try:
            self.join()
        except BaseException as error:
            if exc is None:
                raise
            if error is not exc:
                # The block's own exception propagates; keep the stage's failure visible on it.
                exc.add_note(f"threadpipe: the run also failed with {type(error).__name__}: {error}")
