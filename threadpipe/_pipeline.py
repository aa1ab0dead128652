"""The pipeline builder: an immutable description of a source and its stages, started into runs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Generic, TypeVar

from ._channel import Channel
from ._errors import describe
from ._run import Run, RunState
from ._source import SOURCE_NAME, Source, feed
from ._stage import EACH, FILTER, FLAT_MAP, MAP, Stage, StageSpec, held_bound

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
        source: Source,
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

    def _add(
        self,
        kind: str,
        fn: Callable[[Any], Any],
        workers: int,
        ordered: bool,
        name: str | None,
    ) -> Pipeline[Any]:
        _check_callable("fn", fn)
        _check_count("workers", workers)
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
        spec = StageSpec(kind, fn, workers, ordered, name, capacity)
        return Pipeline(self._source, (*self._stages, spec))

    def map(
        self,
        fn: Callable[[T], U],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
    ) -> Pipeline[U]:
        """Add a stage that outputs ``fn(item)`` for each item.

        Args:
            fn: the function to call, from the stage's worker threads.
            workers: the most threads that call ``fn`` at once (started as work needs them).
            ordered: keep outputs in input order (True), or emit each as soon as it is ready.
            name: the stage's label in errors, thread names and statistics (default: ``fn``'s name).

        Returns:
            A new pipeline ending in this stage.

        Raises:
            TypeError: ``fn`` is not callable, or an argument has the wrong type.
            ValueError: ``workers`` < 1, or ``name`` is taken.
        """
        return self._add(MAP, fn, workers, ordered, name)

    def filter(
        self,
        pred: Callable[[T], object],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
    ) -> Pipeline[T]:
        """Add a stage that keeps the items for which ``pred(item)`` is true.

        Args and raises are those of :meth:`map`.
        """
        return self._add(FILTER, pred, workers, ordered, name)

    def flat_map(
        self,
        fn: Callable[[T], Iterable[U]],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
    ) -> Pipeline[U]:
        """Add a stage that outputs every element of the iterable ``fn(item)`` returns.

        Unordered, the outputs of one item are streamed on as they come; ordered (with more than
        one worker), each item's outputs wait until the items before it are out.

        Args and raises are those of :meth:`map`.
        """
        return self._add(FLAT_MAP, fn, workers, ordered, name)

    def each(
        self,
        fn: Callable[[T], object],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
    ) -> Pipeline[T]:
        """Add a stage that calls ``fn(item)`` for its side effect and passes the item on.

        Args and raises are those of :meth:`map`.
        """
        return self._add(EACH, fn, workers, ordered, name)

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

    def start(self) -> Run[T]:
        """Start a run: the feeder thread and one worker per stage start now, more as work needs them.

        Returns:
            The run: iterate it once for the outputs; ``join()``, ``cancel()``, or use it as a
            context manager.

        Raises:
            SourceConsumedError: the source is a one-shot iterator that an earlier run consumed.
        """
        iterator = self._source.open()
        state = RunState()
        capacities = [spec.capacity for spec in self._stages] + [self.output_capacity]
        names = [SOURCE_NAME, *self.stage_names]
        channels = [Channel(cap, name) for cap, name in zip(capacities, names)]
        stages = tuple(
            Stage(spec, channels[i], channels[i + 1], state) for i, spec in enumerate(self._stages)
        )
        state.closables.extend(channels)
        run: Run[T] = Run(state, channels[-1], stages)
        # Count the starting itself as a live thread, so the run cannot look done (every thread
        # exited) between the feeder finishing a short source and the first worker starting.
        state.thread_started()
        try:
            state.thread_started()
            try:
                threading.Thread(
                    target=feed,
                    args=(iterator, channels[0], state, self._source.in_memory),
                    name=f"threadpipe-{SOURCE_NAME}-0",
                    daemon=True,
                ).start()
            except BaseException:
                state.thread_exited()
                raise
            for stage in stages:
                stage.start()
        except BaseException:
            state.cancel()
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

    def run(self) -> int:
        """Run the pipeline to the end, discarding the outputs.

        Returns:
            How many outputs there were.

        Raises:
            BaseException: a stage's or the source's exception, as itself.
            SourceConsumedError: the source is a one-shot iterator that an earlier run consumed.
        """
        run = self.start()
        try:
            count = iter(run).count()  # type: ignore[attr-defined]
            run._raise_error()  # as in __iter__: after the end, threads exiting are not waited for
            return count  # type: ignore[no-any-return]
        finally:
            run.cancel()

    def to_list(self) -> list[T]:
        """Run the pipeline to the end and return its outputs in a list.

        Raises:
            BaseException: a stage's or the source's exception, as itself.
            SourceConsumedError: the source is a one-shot iterator that an earlier run consumed.
        """
        return list(self)


def _iterate(run: Run[T]) -> Iterator[T]:
    try:
        yield from run
        # Every call has returned once the end arrives, so no failure can follow it. Threads still
        # on their way out are not waited for: with hundreds of workers that wait is measurable.
        run._raise_error()
    finally:
        # After a complete run this is a no-op; after an early exit it cancels without waiting.
        run.cancel()
