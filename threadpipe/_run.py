"""A run: one execution of a pipeline, its shared state, and the caller's end of it.

:class:`RunState` is what the threads share: the stop flag, the first error, and the count of live
threads. :class:`Run` is what the caller holds: iterate it, join it, cancel it, or use it as a context
manager. Threads hold only the state, never the :class:`Run`, so dropping the last reference to an
unfinished run cancels it.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from time import monotonic, perf_counter, process_time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._calls import ItemError
from ._channel import Channel
from ._errors import RunStateError, clear_own_frames, label, strip_own_frames
from ._scope import Cancelled, Scope
from ._threads import in_library_thread

if TYPE_CHECKING:
    from ._monitor import Monitor
    from ._stats import StageStats
    from ._trace import Tracer

__all__ = ["MAX_ITEM_ERRORS", "Clock", "Run", "RunState"]

T = TypeVar("T")

MAX_ITEM_ERRORS = 10_000
"""How many handled failures ``Run.errors`` keeps; later ones are counted, not kept."""

# The caller's thread waits in slices this long, so that Ctrl-C is handled promptly on every platform.
_SLICE = 0.1

# The failures each thread recorded, so that it can let go of its frames when it ends (see
# ``release_frames``).
_RECORDED = threading.local()


def _remember(exc: BaseException) -> None:
    recorded = getattr(_RECORDED, "excs", None)
    if recorded is None:
        recorded = _RECORDED.excs = []
    recorded.append(exc)


def release_frames() -> None:
    """Called by each library thread as it ends: clear the finished library frames that the
    failures it recorded still reach, so that a failed run is freed by reference counting."""
    recorded = getattr(_RECORDED, "excs", None)
    if recorded:
        _RECORDED.excs = None
        for exc in recorded:
            clear_own_frames(exc)


class Clock:
    """A run's wall-clock and process CPU time, from its start to the exit of its last thread."""

    __slots__ = ("cpu_ended", "cpu_started", "ended", "started")

    def __init__(self) -> None:
        self.started = perf_counter()
        self.cpu_started = process_time()
        self.ended: float | None = None
        self.cpu_ended: float | None = None

    def stop(self) -> None:
        """Mark the end of the run; called once, by the run's last thread to exit."""
        if self.ended is None:
            # CPU first: a reader that sees ``ended`` set also sees ``cpu_ended`` set.
            self.cpu_ended = process_time()
            self.ended = perf_counter()

    def elapsed(self) -> float:
        """Wall seconds from the start to the end of the run (or to now, while it runs)."""
        ended = self.ended
        return (perf_counter() if ended is None else ended) - self.started

    def cpu_seconds(self) -> float:
        """CPU seconds the whole process used (all threads, user and system) during the run."""
        ended = self.cpu_ended
        return (process_time() if ended is None else ended) - self.cpu_started


# Every run not yet done, so that a child forked while runs are live can disown them (see _forked).
_LIVE: weakref.WeakSet[RunState] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


class RunState:
    """What the threads of one run share: its scopes, its first error, its count of live threads.

    Free-threading audit (who writes, who reads, why it is safe):

    ============================  ==========================  =========================================
    state                         written by                  safe because
    ============================  ==========================  =========================================
    scope flags                   ``Scope.cancel`` (locked)   written once, False to True
    ``error``, ``cancelled``      ``fail``/``cancel``         under ``_lock``; read after ``done`` or
                                                              a raised flag, both set after the write
    ``_live``                     every thread, at start/end  under ``_lock``
    ``errors``, ``errors_dropped``  ``record_error``          under ``_lock``; ``Run.errors`` copies
                                                              under it
    ``delivered``                 the caller's iterator       one writer; readers only skip work
    worker counters               their own worker only       readers sum plain ints (never torn);
                                                              an executor stage's dispatcher and
                                                              collector each have their own
    ``Run._iterated``             the first iterator          under ``Run._claim_lock``
    ``Channel`` state             putters, getters, abort     under the queue's ``mutex``;
                                                              ``on_starved`` read once per call
    ``Crew`` counts               its threads, ``_grow``      under ``Crew._lock``
    ``Reorder`` head, waiting     the emitting worker         under ``_lock``; turn waiters under
                                                              ``_turn``, counted before re-reading
    tracer reservations           every traced worker         under ``Tracer._lock``; each lane
                                                              written by its own worker only
    rate limiter's last start     every worker of the stage   claimed under its ``_lock``
    ============================  ==========================  =========================================
    """

    def __init__(self) -> None:
        # The run's root scope; ``stop`` is its flag, which the caller's iterator reads.
        self.scope = Scope()
        self.stop = self.scope.cancelled
        # One scope per segment (see ``_scope``): segment i ends at the i-th cut point.
        self.segments: list[Scope] = [Scope(self.scope)]
        self.error: BaseException | None = None
        # The stage a failure came from, for the message when it cannot be raised as itself.
        self.error_stage = ""
        self.cancelled = False
        # Set when the caller has received the end of input: every call has returned by then
        # (each stage sends the sentinel on only after all its workers finished), so there is
        # nothing left to cancel, only threads on their way out.
        self.delivered = False
        # Set in a child process forked while this run was live: its threads are not there.
        self.forked = False
        self.done = threading.Event()
        # Wall and CPU time from now to the last thread's exit, for statistics; and the call
        # recorder when the run is traced (workers read it once, when they start).
        self.clock = Clock()
        self.trace: Tracer | None = None
        # Failures an error policy handled (the run went on without the item), in order; capped.
        self.errors: list[ItemError] = []
        self.errors_dropped = 0
        self.channels: list[Channel] = []
        self._lock = threading.Lock()
        self._live = 0
        with _LIVE_LOCK:
            _LIVE.add(self)

    def segment(self) -> Scope:
        """Open the next segment: the stages added from now on belong to it."""
        scope = Scope(self.scope)
        self.segments.append(scope)
        return scope

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
            with _LIVE_LOCK:
                _LIVE.discard(self)
            # Every thread has exited: break the cycles a live run needs (scope members and a
            # stage's grow callback hold the stage, which holds this state).
            self.scope.release()
            for channel in self.channels:
                channel.on_starved = None
            self.done.set()

    @property
    def live_threads(self) -> int:
        """Threads of the run that have not exited yet."""
        return self._live

    def fail(
        self, exc: BaseException, scope: Scope, stage: str, item: object, *, has_item: bool = True
    ) -> None:
        """Record a failure and cancel the run; the first failure is the one the caller sees.

        A failure raised in a scope already cancelled is not recorded: it came while the run was
        stopping (a cancel, an earlier failure) or after a ``take()`` cut its segment off, and
        concerns items nobody will read.

        Args:
            exc: the exception, raised again to the caller as itself.
            scope: the scope of the stage that raised it.
            stage: the stage it was raised in.
            item: the item being processed.
            has_item: False when there was no item (a source, or a failure between items).
        """
        label(exc, stage, item, has_item=has_item)
        # The library's own frames leave the traceback: they hold the stage, the stage holds this
        # state, and this state holds the error, a cycle only the garbage collector could break.
        strip_own_frames(exc)
        _remember(exc)
        with self._lock:
            if scope.cancelled[0] or self.error is not None:
                return
            self.error = exc
            self.error_stage = stage
        self.scope.cancel()

    def record_error(self, error: ItemError) -> None:
        """Keep a failure that an error policy handled, up to ``MAX_ITEM_ERRORS`` of them."""
        strip_own_frames(error.exception)
        _remember(error.exception)
        with self._lock:
            if len(self.errors) < MAX_ITEM_ERRORS:
                self.errors.append(error)
            else:
                self.errors_dropped += 1

    def cut(self, segment: int) -> None:
        """Cancel segments ``0..segment``: everything upstream of a ``take()`` that has all it needs.

        Their stages start no new call, their coroutines and executor calls are cancelled, their
        sources closed; the stages after the cut go on and end normally.
        """
        for scope in self.segments[: segment + 1]:
            scope.cancel()

    def cancel(self) -> None:
        """Stop the run at the caller's request: no new calls start, every blocked thread wakes.

        A no-op on a run that already ended or delivered all its outputs (a ``take()`` cancelled
        what it cut off when it cut it), so that cleaning up after a complete run does not mark
        it cancelled.
        """
        if self.forked or self.done.is_set() or self.delivered:
            return
        with self._lock:
            if self.error is None and not self.stop[0]:
                self.cancelled = True
        self.scope.cancel()

    def check_end(self, output: Channel) -> None:
        """For a reader of the run's outputs whose wait found none: if every thread of the run has
        exited and ``output`` is empty, the end of the outputs is lost, and the run fails.

        A stage's last thread puts the end in before it exits, so that is a threadpipe bug (one
        found so far did it). The reader would wait forever, with nothing left to cancel; it gets
        the error instead."""
        if not self.done.is_set() or output.qsize():
            return
        self.fail(
            RuntimeError(
                "threadpipe: every thread of the run exited, and the end of the outputs never "
                "came; this is a bug in threadpipe, please report it"
            ),
            self.scope,
            "run",
            None,
            has_item=False,
        )

    def cancel_soon(self) -> None:
        """Cancel from a finalizer, which may run in a thread that holds one of this run's locks.

        The garbage collector runs finalizers wherever it happens to run; in one of the library's
        threads that could be while it holds a channel's lock, and cancelling there would wait for
        that very lock. So a library thread hands the cancel to a thread of its own. At
        interpreter exit, when no thread can start, cancelling here is safe: it is the main
        thread, between the script's last line and the exit.
        """
        if self.forked or self.done.is_set() or self.delivered:
            return
        if not in_library_thread():
            self.cancel()
            return
        try:
            threading.Thread(target=self.cancel, name="threadpipe-cancel-0", daemon=True).start()
        except RuntimeError:
            self.cancel()

    def raise_error(self) -> None:
        """Raise the run's failure to the caller, if there is one.

        As itself, except a ``StopIteration`` (or ``StopAsyncIteration``): raised from an
        iterator's ``__next__`` it would end the caller's loop quietly, losing the failure, so it
        is raised as a ``RuntimeError`` naming the stage, from the original (as PEP 479 does for
        generators). ``Run.exception`` stays the original.

        Raises:
            BaseException: the failure.
        """
        error = self.error
        if error is None:
            return
        if isinstance(error, StopIteration | StopAsyncIteration):
            notes = [n for n in getattr(error, "__notes__", ()) if isinstance(n, str)]
            where = notes[0].removeprefix("threadpipe: ") if notes else f"stage {self.error_stage!r}"
            wrapped = RuntimeError(
                f"{type(error).__name__} {where}; it is raised as RuntimeError because a "
                f"{type(error).__name__} reaching the caller's loop would end it silently"
            )
            try:
                raise wrapped from error
            finally:
                del wrapped, error
        try:
            raise error
        finally:
            # The traceback holds this frame: hold no reference to the error (or the state) in it.
            del error, self


def _forked() -> None:
    """In a child forked while runs were live: their threads are gone, and so may be their locks'
    owners. Disown them: their flags stop any loop over them, and nothing takes their locks."""
    global _LIVE_LOCK
    _LIVE_LOCK = threading.Lock()  # the parent's may have been held by a thread that is gone
    for state in list(_LIVE):
        state.forked = True
        state.stop[0] = True
    _LIVE.clear()


if hasattr(os, "register_at_fork"):
    # As concurrent.futures.thread does: hold the lock across the fork, so the set is whole.
    os.register_at_fork(
        before=lambda: _LIVE_LOCK.acquire(),
        after_in_parent=lambda: _LIVE_LOCK.release(),
        after_in_child=_forked,
    )


_ENDED: Any = object()  # _Output.take: the end of input arrived
_STOPPED: Any = object()  # _Output.take: the run stopped (failed or cancelled)


class _Output(Generic[T]):
    """The caller's iterator over a run's outputs: takes them from the last channel in batches.

    Leaving a loop over it early (``break``, an exception in the loop body, dropping it) cancels the
    run: the iterator is dropped then, and an iterator dropped before the end cancels its run.

    A frame that raises the run's failure to the caller keeps no reference to the run, the iterator
    or the state: the failure's traceback holds those frames, the state holds the failure, and a
    failed run must be freed by reference counting alone once the caller lets go of both.
    """

    def __init__(self, run: Run[T]) -> None:
        self._run = run  # keeps the run alive (and so not cancelled) while this iterator is
        self._state = run._state
        self._channel = run._output
        self._stop = run._state.stop
        self._buffer: deque[Any] = deque()
        self._batch = max(1, run._output.maxsize)
        self._over = False  # the end arrived, or the run's failure was raised

    def __del__(self) -> None:
        if not self._over:
            self._state.cancel_soon()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        buffer = self._buffer
        if buffer and not self._stop[0]:
            return buffer.popleft()  # type: ignore[no-any-return]
        got = self._take()
        if got is not _ENDED and got is not _STOPPED:
            buffer.extend(got)
            return buffer.popleft()  # type: ignore[no-any-return]
        buffer.clear()
        state = self._state
        del self, buffer
        try:
            if got is _STOPPED:
                _raise_stopped(state)
        finally:
            del state
        raise StopIteration

    def _take(self) -> Any:
        """The next batch of outputs, or ``_ENDED``, or ``_STOPPED``; waits in slices."""
        while True:
            if self._stop[0]:
                self._over = True
                self._run._close_monitor()  # the bars close before an exception or the next output
                return _STOPPED
            try:
                got = self._channel.get_many(self._batch, _SLICE)
            except Cancelled:
                continue  # the flag is up: reported at the top
            except BaseException:
                # Ctrl-C (or any asynchronous exception) while waiting: stop the run, then let it go.
                self._over = True
                self._state.cancel()
                raise
            if got is None:
                self._state.check_end(self._channel)
                continue
            items = got[0]
            if not items:
                self._over = True
                self._state.delivered = True
                self._run._close_monitor()  # final counts drawn before the caller goes on
                return _ENDED
            return items

    def count(self) -> int:
        """Consume everything left and return how many outputs there were (no per-item call).

        Raises:
            BaseException: the run's failure (see ``RunState.raise_error``).
        """
        n = len(self._buffer)
        self._buffer.clear()
        while True:
            got = self._take()
            if got is _ENDED:
                return n
            if got is _STOPPED:
                state = self._state
                del self
                try:
                    _raise_stopped(state)
                finally:
                    del state
                return n
            n += len(got)


def _raise_stopped(state: RunState) -> None:
    """Raise what a stopped run's caller sees: its failure, or nothing for a cancel."""
    if state.forked:
        raise RunStateError(
            "this run was started in the parent process before os.fork(): its threads are not in "
            "this child; leave the loop and start a new run here"
        )
    try:
        state.raise_error()
    finally:
        del state  # the traceback holds this frame


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
        length: int | None = None,
    ) -> None:
        self._state = state
        self._length = length  # how many outputs the run makes, when known (see __len__)
        self._output = output
        self._stages = stages
        self._monitor = monitor  # the thread sampling the run and drawing its bars, if any
        self._iterated = False
        self._claim_lock = threading.Lock()  # two threads iterating at once: one wins
        # Dropping the last reference to an unfinished run cancels it, and so does interpreter exit
        # (finalize runs its callbacks at exit), so a forgotten run never keeps threads busy.
        self._finalizer = weakref.finalize(self, state.cancel_soon)

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

    def __len__(self) -> int:
        """How many outputs the run makes in all, so ``tqdm(run)`` shows a total.

        Known as for ``len(pipeline)``; the count of a complete run (a cancel or a failure ends it
        sooner).

        Raises:
            TypeError: the number is not known.
        """
        if self._length is None:
            raise TypeError(
                "this run's length is not known: its source has no length, or a stage "
                "(filter, flat_map, an operator, on_error='skip') changes the count"
            )
        return self._length

    def __length_hint__(self) -> int:
        return NotImplemented if self._length is None else self._length

    def __bool__(self) -> bool:
        """A run is always true (``__len__`` would make an empty or unknown one false)."""
        return True

    def __iter__(self) -> Iterator[T]:
        """Return the iterator over the outputs.

        Raises:
            RunStateError: the run was already iterated.
        """
        self._claim()
        return _Output(self)

    def _claim(self) -> None:
        """Mark the run's outputs as taken by an iterator; a run yields them once."""
        with self._claim_lock:
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
        and a stage's exception is raised as itself. Leaving the loop early (``break``, an
        exception in the body, dropping the iterator, ``aclose()``) cancels the run.

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
        The cap counts failures, not bytes: each keeps its item and exception alive, so 10,000
        failures over large items hold 10,000 large items.
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
            RunStateError: the run was started in the parent of this forked process.
            RuntimeError: a stage raised ``StopIteration``, which is its ``__cause__``.
            BaseException: the exception a stage or the source raised, as itself.
        """
        state = self._state
        if state.forked:
            _raise_stopped(state)
        deadline = None if timeout is None else monotonic() + timeout
        done = state.done
        try:
            while True:
                wait = _SLICE if deadline is None else min(_SLICE, max(0.0, deadline - monotonic()))
                if done.wait(wait):
                    break
                if deadline is not None and monotonic() >= deadline:
                    raise TimeoutError(
                        f"the run did not finish within {timeout} s "
                        f"({state.live_threads} threads still running)"
                    )
        except KeyboardInterrupt:
            state.cancel()
            raise
        self._close_monitor()
        del self, done  # the traceback holds this frame: it must not hold the run
        try:
            _raise_stopped(state)
        finally:
            del state

    def _raise_error(self) -> None:
        self._close_monitor()  # the bars close before an exception or the caller's next output
        state = self._state
        del self  # the traceback holds this frame: it must not hold the run
        try:
            state.raise_error()
        finally:
            del state

    # ------------------------------------------------------------------ observing

    def _close_monitor(self) -> None:
        monitor = self._monitor
        if monitor is not None:
            monitor.close()

    def _finished(self) -> bool:
        return self._state.done.is_set() or self._state.delivered or self._state.stop[0]

    def stats(self) -> tuple[StageStats, ...]:
        """A snapshot of every stage's statistics, during the run or after it.

        Statistics are always kept: each worker counts its own items and busy time, and this call
        merges the counts. Utilization is measured against the wall time of the run so far.

        Returns:
            One frozen :class:`StageStats` per stage, in stage order.
        """
        if self._finished():
            self._close_monitor()  # the bars show the final counts before the caller goes on
        from ._stats import snapshot  # here, not at the top: runs nobody asks about never need it

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
        from ._report import render_report  # here, not at the top: few runs are reported on

        report = render_report(stats, self._state, self._output, samples, monitor is not None)
        failure = None if monitor is None else monitor.failure
        if failure is not None:
            # Monitoring never fails a run, but a report resting on samples that stopped must say so.
            report += (
                f"\nnote: the monitor stopped early ({type(failure).__name__}: {failure}); "
                "buffer and resource figures cover the run only up to then"
            )
        return report

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
        if self._state.forked:
            return  # a child of a fork: the run's threads are in the parent, nothing to wait for
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Ctrl-C or SystemExit: return control at once rather than wait for running calls.
            return
        try:
            self.join()
        except BaseException as error:
            del self, tb  # the traceback holds this frame: it must not hold the run
            if exc is None:
                raise
            if error is not exc:
                # The block's own exception propagates; keep the stage's failure visible on it.
                exc.add_note(f"threadpipe: the run also failed with {type(error).__name__}: {error}")
            # ``join()`` raised the very exception the block raised, whose traceback now holds
            # this frame: holding it here too would make a cycle.
            del exc
