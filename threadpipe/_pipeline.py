"""The pipeline builder: an immutable description of a source and its stages, started into runs."""

from __future__ import annotations

import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from concurrent.futures import Executor
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Generic, Literal, TypeVar, cast, overload

from ._channel import Channel
from ._coroutine import check_timeout, coroutine_kind
from ._errors import describe
from ._executor import ExecutorStage, check_executor
from ._monitor import Monitor
from ._progress import Bars, check_progress, source_length
from ._run import Run, RunState
from ._source import SOURCE_NAME, Source, feed
from ._stage import EACH, FILTER, FLAT_MAP, MAP, Stage, StageSpec, held_bound
from ._trace import Tracer, check_trace

if TYPE_CHECKING:
    from ._aio import AsyncSource, LoopThread

__all__ = ["DEFAULT_BUFFER", "Pipeline"]

T = TypeVar("T")
U = TypeVar("U")

DEFAULT_BUFFER: Final = 32
"""Capacity of every buffer that ``backpressure()`` does not size."""


def _check_count(param: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{param} must be an int >= 1, got {describe(value)} ({type(value).__qualname__})")
    if value < 1:
        raise ValueError(f"{param} must be an int >= 1, got {value}")
    return value


def _check_callable(param: str, value: object) -> None:
    if not callable(value):
        raise TypeError(f"{param} must be callable, got {describe(value)} ({type(value).__qualname__})")


def _runtime(spec: StageSpec) -> type[Stage] | type[ExecutorStage]:
    """The class that runs ``spec`` in a run: a pool of threads, or a feeder of an executor."""
    return Stage if spec.executor is None else ExecutorStage


def _default_name(kind: str, fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name.isidentifier():
        return name
    return kind


class Pipeline(Generic[T]):
    """A source and a chain of stages; immutable, lazy, and started into runs.

    Every builder method returns a new pipeline and leaves this one unchanged, so a pipeline can be
    extended in several ways. Nothing runs until :meth:`start`, iteration, :meth:`run` or
    :meth:`to_list`.
    """

    __slots__ = ("_source", "_stages", "_next_capacity")

    def __init__(
        self,
        source: Source | AsyncSource,
        stages: tuple[StageSpec, ...] = (),
        next_capacity: int | None = None,
    ) -> None:
        self._source = source
        self._stages = stages
        # Capacity set by backpressure() for the buffer after the last stage: it becomes the input
        # buffer of the next stage added, or the output buffer if none is.
        self._next_capacity = next_capacity

    # ------------------------------------------------------------------ building

    @classmethod
    def from_iter(cls, iterable: Iterable[T]) -> Pipeline[T]:
        """Build a pipeline whose source is ``iterable``.

        The iterable is pulled by a feeder thread of each run. A re-iterable source (a list, a
        range) can be run any number of times; a one-shot iterator (a generator) feeds one run.

        Args:
            iterable: the items to feed.

        Returns:
            A pipeline with no stages yet.

        Raises:
            TypeError: ``iterable`` is not iterable.
        """
        return cls(Source(iterable))

    @classmethod
    def from_async_iter(cls, aiterable: AsyncIterable[T]) -> Pipeline[T]:
        """Build a pipeline whose source is the async iterable ``aiterable`` (an async generator).

        Each run iterates it on the run's event loop (see coroutine stages), one item ahead of
        the first buffer at most, as a plain source is pulled. When the run stops early (break,
        cancel, a failure) the iterator is closed with ``aclose()`` on that loop, so its
        ``finally`` blocks run. It must not use objects bound to another event loop. An async
        iterator (an async generator object) feeds one run; an object whose ``__aiter__`` makes
        a fresh iterator feeds any number.

        Args:
            aiterable: the items to feed.

        Returns:
            A pipeline with no stages yet.

        Raises:
            TypeError: ``aiterable`` is not an async iterable.
        """
        from ._aio import AsyncSource  # here, not at the top: only async pipelines import asyncio

        return cls(AsyncSource(aiterable))

    def _add(
        self,
        kind: str,
        fn: Callable[[Any], Any],
        workers: int,
        ordered: bool,
        name: str | None,
        executor: Executor | str | None = None,
        timeout: float | None = None,
    ) -> Pipeline[Any]:
        _check_callable("fn", fn)
        _check_count("workers", workers)
        check_executor(executor)
        coroutine = coroutine_kind(kind, fn)
        timeout = check_timeout(timeout, coroutine is not None)
        if coroutine is not None and executor is not None:
            raise TypeError(
                f"executor={describe(executor)} takes a plain function; {describe(fn)} is a "
                "coroutine function, whose calls run on the run's event loop"
            )
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be a bool, got {describe(ordered)}")
        taken = {spec.name for spec in self._stages} | {SOURCE_NAME}
        if name is None:
            base = _default_name(kind, fn)
            name = base
            suffix = 2
            while name in taken:
                name = f"{base}{suffix}"
                suffix += 1
        elif not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str or None, got {describe(name)}")
        elif name in taken:
            raise ValueError(f"name {name!r} is already used by another stage of this pipeline")
        capacity = DEFAULT_BUFFER if self._next_capacity is None else self._next_capacity
        spec = StageSpec(
            kind, fn, workers, ordered, name, capacity, executor, coroutine=coroutine,
            timeout=timeout,
        )
        return Pipeline(self._source, (*self._stages, spec))

    @overload
    def map(
        self,
        fn: Callable[[T], Awaitable[U]],
        *,
        workers: int = ...,
        ordered: bool = ...,
        name: str | None = ...,
        executor: None = ...,
        timeout: float | None = ...,
    ) -> Pipeline[U]: ...

    @overload
    def map(
        self,
        fn: Callable[[T], U],
        *,
        workers: int = ...,
        ordered: bool = ...,
        name: str | None = ...,
        executor: Executor | Literal["processes"] | None = ...,
        timeout: None = ...,
    ) -> Pipeline[U]: ...

    def map(
        self,
        fn: Callable[[T], Any],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
        executor: Executor | Literal["processes"] | None = None,
        timeout: float | None = None,
    ) -> Pipeline[Any]:
        """Add a stage that outputs ``fn(item)`` for each item.

        A coroutine function (``async def``, also through ``functools.partial``) makes a coroutine
        stage: its calls run as tasks on the run's event loop, ``workers`` of them at most in flight,
        and the stage uses two threads whatever ``workers`` is.

        Args:
            fn: the function to call, from the stage's worker threads.
            workers: the most threads that call ``fn`` at once (started as work needs them); with
                ``executor``, the most calls in flight on it (the stage then runs two threads).
            ordered: keep outputs in input order (True), or emit each as soon as it is ready.
            name: the stage's label in errors, thread names and statistics (default: ``fn``'s name).
            executor: run the calls on this ``concurrent.futures.Executor`` (a process pool, a Dask
                ``Client(...).get_executor()``) instead of on the stage's threads; or
                ``"processes"`` for a ``ProcessPoolExecutor(workers)`` that each run creates and
                shuts down. ``fn`` and the items must then pickle. On cancel, calls not started
                are cancelled and calls already running are not waited for.
            timeout: coroutine stages only: the most seconds one call may take. A call that
                overruns is cancelled, and the run fails with ``TimeoutError`` (noted with the
                stage and the item, as any failure).

        Returns:
            A new pipeline ending in this stage.

        Raises:
            TypeError: ``fn`` is not callable, an argument has the wrong type, ``executor`` is
                neither an ``Executor`` nor ``"processes"`` or is given with a coroutine function,
                ``timeout`` is given for a plain function, or ``fn`` is an async generator
                function (only ``flat_map`` takes one).
            ValueError: ``workers`` < 1, ``name`` is taken, or ``timeout`` is not > 0.
        """
        return self._add(MAP, fn, workers, ordered, name, executor, timeout)

    def filter(
        self,
        pred: Callable[[T], object],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
        executor: Executor | Literal["processes"] | None = None,
        timeout: float | None = None,
    ) -> Pipeline[T]:
        """Add a stage that keeps the items for which ``pred(item)`` is true.

        An async ``pred`` makes a coroutine stage: the awaited result decides.

        Args and raises are those of :meth:`map`.
        """
        return self._add(FILTER, pred, workers, ordered, name, executor, timeout)

    @overload
    def flat_map(
        self,
        fn: Callable[[T], Awaitable[Iterable[U] | AsyncIterable[U]] | AsyncIterator[U]],
        *,
        workers: int = ...,
        ordered: bool = ...,
        name: str | None = ...,
        executor: None = ...,
        timeout: float | None = ...,
    ) -> Pipeline[U]: ...

    @overload
    def flat_map(
        self,
        fn: Callable[[T], Iterable[U]],
        *,
        workers: int = ...,
        ordered: bool = ...,
        name: str | None = ...,
        executor: Executor | Literal["processes"] | None = ...,
        timeout: None = ...,
    ) -> Pipeline[U]: ...

    def flat_map(
        self,
        fn: Callable[[T], Any],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
        executor: Executor | Literal["processes"] | None = None,
        timeout: float | None = None,
    ) -> Pipeline[Any]:
        """Add a stage that outputs every element of the iterable ``fn(item)`` returns.

        Unordered, the outputs of one item are streamed on as they come; ordered (with more than
        one worker), each item's outputs wait until the items before it are out.

        A coroutine stage takes an ``async def`` that returns an iterable or an async iterable, or
        an async generator function; either way the outputs of one item are collected before they
        are passed on (``timeout`` covers the whole of it).

        Args and raises are those of :meth:`map`.
        """
        return self._add(FLAT_MAP, fn, workers, ordered, name, executor, timeout)

    def each(
        self,
        fn: Callable[[T], object],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
        executor: Executor | Literal["processes"] | None = None,
        timeout: float | None = None,
    ) -> Pipeline[T]:
        """Add a stage that calls ``fn(item)`` for its side effect and passes the item on.

        An async ``fn`` makes a coroutine stage: the item passes on once its coroutine is done.

        Args and raises are those of :meth:`map`.
        """
        return self._add(EACH, fn, workers, ordered, name, executor, timeout)

    def backpressure(self, n: int) -> Pipeline[T]:
        """Size the buffer after the last stage (or after the source): it holds at most ``n`` items.

        When the buffer is full, the stage before it waits. Without this call a buffer holds
        ``DEFAULT_BUFFER`` (32) items.

        Args:
            n: the buffer's capacity, >= 1.

        Returns:
            A new pipeline with the buffer sized.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n`` < 1.
        """
        _check_count("n", n)
        return Pipeline(self._source, self._stages, n)

    # ------------------------------------------------------------------ facts

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages' names, in order."""
        return tuple(spec.name for spec in self._stages)

    @property
    def output_capacity(self) -> int:
        """The capacity of the buffer the caller reads outputs from."""
        return DEFAULT_BUFFER if self._next_capacity is None else self._next_capacity

    def buffer_bound(self) -> int:
        """The most items a run of this pipeline holds at once between its source and the caller.

        The sum of: what the feeder thread holds (one item, or a buffer's worth when the source is
        a built-in container such as a list or a range, whose items are in memory anyway); for
        each stage, its input buffer's capacity ``C`` plus what its workers hold, at most
        ``ceil(C/1) + ceil(C/2) + ... + ceil(C/workers)`` items (twice that for an ordered stage
        with more than one worker: its reorder buffer), plus, for a ``flat_map`` stage, one
        output buffer's worth per worker while it streams; and the output buffer twice (the
        buffer, and the batch the caller's iterator took from it). Items are counted where they
        are: a ``flat_map`` stage's outputs count as many items as it yields.

        Returns:
            The bound, an int.
        """
        capacities = [spec.capacity for spec in self._stages] + [self.output_capacity]
        bound = capacities[0] if self._source.in_memory else 1
        for spec, next_capacity in zip(self._stages, capacities[1:]):
            bound += spec.capacity + held_bound(spec)
            if spec.kind == FLAT_MAP:
                bound += spec.workers * next_capacity
        return bound + 2 * self.output_capacity

    def __repr__(self) -> str:
        stages = " | ".join(f"{s.kind}({s.name}, workers={s.workers})" for s in self._stages)
        return f"<threadpipe.Pipeline {stages or 'source only'}>"

    # ------------------------------------------------------------------ running

    def start(
        self,
        *,
        progress: bool | Mapping[str, Any] | None = None,
        trace: bool | int = False,
        monitor: bool = False,
    ) -> Run[T]:
        """Start a run: the feeder thread and one worker per stage start now, more as work needs them.

        Args:
            progress: show one tqdm bar per stage, counting the items out of it, refreshed ten
                times a second by a thread of the run (workers never touch the bars). True for
                the default bars, or a dict of tqdm keyword arguments for every bar (``position``
                places the first bar). The bars close when the run ends, fails or is cancelled.
            trace: record the start and end of every call, for ``save_trace()`` and
                ``plot_timeline()``: True records up to ``DEFAULT_TRACE_CAP`` (100,000) calls,
                an int up to that many; later calls are counted, not kept.
            monitor: sample buffer fill, CPU and memory ten times a second for ``report()``,
                without bars (``progress`` implies it).

        Returns:
            The run: iterate it once for the outputs; ``join()``, ``cancel()``, or use it as a
            context manager.

        Raises:
            SourceConsumedError: the source is a one-shot iterator that an earlier run consumed.
            TypeError: ``progress``, ``trace`` or ``monitor`` has the wrong type.
            ValueError: ``trace`` is an int < 1.
        """
        bar_options = check_progress(progress)
        trace_cap = check_trace(trace)
        if not isinstance(monitor, bool):
            raise TypeError(f"monitor must be a bool, got {describe(monitor)}")
        watcher = None
        if bar_options is not None or monitor:
            # The bars are drawn now, in the caller's thread: a bad tqdm argument fails here.
            bars = None
            if bar_options is not None:
                bars = Bars(self._stages, bar_options, source_length(self._source.iterable))
            watcher = Monitor(bars)
        try:
            iterator = self._source.open()
        except BaseException:
            if watcher is not None:
                watcher.close()
            raise
        state = RunState()
        if trace_cap:
            state.trace = Tracer(self.stage_names, trace_cap, state.clock.started)
        capacities = [spec.capacity for spec in self._stages] + [self.output_capacity]
        names = [SOURCE_NAME, *self.stage_names]
        channels = [Channel(cap, name) for cap, name in zip(capacities, names)]
        aio: LoopThread | None = None
        if not isinstance(self._source, Source) or any(spec.coroutine for spec in self._stages):
            from ._aio import LoopThread  # here, not at the top: only such runs import asyncio

            aio = LoopThread(state)
        stages = tuple(
            aio.stage(spec, channels[i], channels[i + 1])
            if aio is not None and spec.coroutine
            else _runtime(spec)(spec, channels[i], channels[i + 1], state)
            for i, spec in enumerate(self._stages)
        )
        feeder: Callable[[], None]
        if aio is not None and not isinstance(self._source, Source):
            feeder = aio.feeder(cast("AsyncIterator[Any]", iterator), channels[0])
        else:
            plain = cast("Iterator[Any]", iterator)
            feeder = partial(feed, plain, channels[0], state, self._source.in_memory)
        state.closables.extend(channels)
        run: Run[T] = Run(state, channels[-1], stages, watcher)
        # Count the starting itself as a live thread, so the run cannot look done (every thread
        # exited) between the feeder finishing a short source and the first worker starting.
        state.thread_started()
        try:
            if aio is not None:
                aio.start()
            state.thread_started()
            try:
                threading.Thread(
                    target=feeder,
                    name=f"threadpipe-{SOURCE_NAME}-0",
                    daemon=True,
                ).start()
            except BaseException:
                state.thread_exited()
                raise
            for stage in stages:
                stage.start()
            if watcher is not None:
                watcher.start(stages, channels[-1], state)
        except BaseException:
            state.cancel()
            if watcher is not None:
                watcher.close()
            raise
        finally:
            state.thread_exited()
        return run

    def __iter__(self) -> Iterator[T]:
        """Start a run and iterate its outputs.

        Leaving the loop early (``break``, an exception in the loop body, dropping the iterator)
        cancels the run and returns at once, without waiting for calls still running. A stage's
        exception is raised from the loop as itself.
        """
        return _iterate(self.start())

    def __aiter__(self) -> AsyncIterator[T]:
        """Start a run and iterate its outputs from async code: ``async for x in pipeline``.

        Waiting for an output never blocks the caller's event loop (a helper thread waits and wakes
        the caller's task through its loop); the pipeline's own coroutine stages, if any, run on the
        run's loop, not on the caller's. Leaving the loop early drops the iterator, which cancels
        the run, as with ``for``; ``aclose()`` on the iterator cancels it at once. A stage's
        exception is raised from the loop as itself.

        Raises:
            SourceConsumedError: the source is a one-shot iterator that an earlier run consumed.
        """
        from ._aio import AsyncOutput

        return AsyncOutput(self.start(), own=True)

    def run(self, *, progress: bool | Mapping[str, Any] | None = None) -> int:
        """Run the pipeline to the end, discarding the outputs.

        Args:
            progress: show progress bars, as for :meth:`start`.

        Returns:
            How many outputs there were.

        Raises:
            BaseException: a stage's or the source's exception, as itself.
            SourceConsumedError: the source is a one-shot iterator that an earlier run consumed.
            TypeError: ``progress`` has the wrong type.
        """
        run = self.start(progress=progress)
        try:
            count = iter(run).count()  # type: ignore[attr-defined]
            run._raise_error()  # as in __iter__: after the end, threads exiting are not waited for
            return count  # type: ignore[no-any-return]
        finally:
            run.cancel()

    def to_list(self, *, progress: bool | Mapping[str, Any] | None = None) -> list[T]:
        """Run the pipeline to the end and return its outputs in a list.

        Args:
            progress: show progress bars, as for :meth:`start`.

        Raises:
            BaseException: a stage's or the source's exception, as itself.
            SourceConsumedError: the source is a one-shot iterator that an earlier run consumed.
            TypeError: ``progress`` has the wrong type.
        """
        return list(_iterate(self.start(progress=progress)))


def _iterate(run: Run[T]) -> Iterator[T]:
    try:
        yield from run
        # Every call has returned once the end arrives, so no failure can follow it. Threads still
        # on their way out are not waited for: with hundreds of workers that wait is measurable.
        run._raise_error()
    finally:
        # After a complete run this is a no-op; after an early exit it cancels without waiting.
        run.cancel()
