"""The pipeline builder: an immutable description of a source and its stages, started into runs."""

from __future__ import annotations

import math
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
)
from functools import partial
from itertools import islice
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    Literal,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
    overload,
)

from ._calls import CallOptions, check_options
from ._coroutine import check_timeout, coroutine_kind
from ._errors import describe
from ._executor import check_executor
from ._composed import ConcatSource, MergeSource
from ._operators import BATCH, GROUP_BY, PIPE, SKIP_WHILE, TAKE, TAKE_WHILE
from ._progress import check_progress, source_length
from ._run import Run
from ._source import SOURCE_NAME, QueueSource, Source
from ._stage import EACH, FILTER, FLAT_MAP, MAP, StageSpec, count_through
from ._trace import check_trace
from ._wiring import runtime_of, wire

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from ._aio import AsyncSource

__all__ = ["DEFAULT_BUFFER", "Pipeline"]

T = TypeVar("T")
U = TypeVar("U")
K = TypeVar("K", bound=Hashable)

DEFAULT_BUFFER: Final = 32
"""The capacity of a buffer that ``backpressure()`` does not size, unless the stage next to it
calls for more: the buffer the caller reads holds as many items as the last stage has ``workers``,
and one next to a coroutine stage as many as that stage has (see ``Pipeline.output_capacity``)."""


def _check_count(call: str, param: str, value: object, least: int = 1) -> int:
    """Check an int argument; the message names the call, the parameter, the bound and the value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{call}(): {param} must be an int >= {least}, "
            f"got {describe(value)} ({type(value).__qualname__})"
        )
    if value < least:
        raise ValueError(f"{call}(): {param} must be an int >= {least}, got {value}")
    return value


def _check_callable(param: str, value: object, call: str | None = None) -> None:
    if not callable(value):
        where = f"{call}(): " if call else ""
        raise TypeError(
            f"{where}{param} must be callable, got {describe(value)} ({type(value).__qualname__})"
        )


def _check_seconds(call: str, param: str, value: object) -> float | None:
    """Check a duration argument (None, or a finite number > 0); the message names the call,
    the parameter and the value."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{call}(): {param} must be a number of seconds > 0 or None, got {describe(value)}"
        )
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{call}(): {param} must be a number of seconds > 0 or None, got {value}")
    return float(value)


class CallKwargs(TypedDict, total=False):
    """How a ``map``/``filter``/``flat_map``/``each`` stage calls its function, beyond ``fn(item)``.

    Keys:
        on_error: ``"raise"`` (default: the failure stops the run and reaches the caller),
            ``"skip"`` (the item is dropped, the run goes on), or a callable ``(exc, item) ->
            value`` whose result stands for the call's (raising inside it stops the run). Handled
            failures are listed in ``run.errors`` and counted in the stage's ``errors``.
        retries: how many times a failing item is tried again before ``on_error`` applies.
        retry_delay: the first retry's delay in seconds (default 0.1); each next one doubles,
            with jitter (0.5x to 1.5x).
        retry_on: the exception type or types that are retried (default ``Exception``).
        rate: the most calls per second, across all the stage's workers.
        resource: a callable that makes a resource (a session, a connection) once per worker; the
            function is then called as ``fn(item, resource)``. A context manager is entered and
            exited; any other object with ``close()`` is closed when its worker exits, also on
            failure and cancel. Thread stages only.
    """

    on_error: str | Callable[[BaseException, Any], Any]
    retries: int
    retry_delay: float
    retry_on: type[BaseException] | tuple[type[BaseException], ...]
    rate: float | None
    resource: Callable[[], Any] | None


_CALL_KEYS: Final = frozenset(CallKwargs.__annotations__)


def _call_options(
    kind: str, call: CallKwargs | None, executor: Executor | str | None
) -> CallOptions:
    """Check a stage's call keywords; refuse those its kind of stage cannot honour."""
    call = call or {}
    unknown = set(call) - _CALL_KEYS
    if unknown:
        raise TypeError(f"{kind}() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    options = check_options(**call)
    if options.plain:
        return options
    if executor is not None:
        others = sorted(key for key in call if key != "resource")
        if others:
            raise TypeError(
                f"{kind}(): {', '.join(others)}: not available with executor= (the calls run "
                "elsewhere); retry or rate-limit inside the function"
            )
        if options.resource is not None and executor != "processes":
            raise TypeError(
                f"{kind}(): resource= on an executor needs executor='processes', which makes one "
                f"per worker process; {describe(executor)} runs calls where threadpipe cannot "
                "make or close one: create it inside the function"
            )
    return options


def _given(
    on_error: object,
    retries: object,
    retry_delay: object,
    retry_on: object,
    rate: object,
    resource: object,
) -> CallKwargs:
    """The call options given with other than their default values (checked by ``_add``)."""
    values = {
        "on_error": on_error,
        "retries": retries,
        "retry_delay": retry_delay,
        "retry_on": retry_on,
        "rate": rate,
        "resource": resource,
    }
    given = {
        key: value
        for key, value in values.items()
        if value is not _CALL_DEFAULTS[key] and value != _CALL_DEFAULTS[key]
    }
    return cast("CallKwargs", given)


_CALL_DEFAULTS: Final[dict[str, object]] = {
    "on_error": "raise",
    "retries": 0,
    "retry_delay": 0.1,
    "retry_on": Exception,
    "rate": None,
    "resource": None,
}


def _no_call(item: Any) -> Any:
    """The function slot of operators that call none (``take``, ``batch``)."""
    raise AssertionError("never called")


def _skip(n: int, items: Iterator[Any]) -> Iterator[Any]:
    return islice(items, n, None)


def _unique(name: str, stages: tuple[StageSpec, ...]) -> str:
    taken = {spec.name for spec in stages} | {SOURCE_NAME}
    unique = name
    suffix = 2
    while unique in taken:
        unique = f"{name}{suffix}"
        suffix += 1
    return unique


def _default_name(kind: str, fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name.isidentifier():
        return name
    return kind


class Pipeline(Generic[T]):
    """A source and a chain of stages; immutable, lazy, and started into runs.

    Start from a source: :meth:`from_iter`, :meth:`from_async_iter`, :meth:`from_queue`,
    :meth:`merge` or :meth:`concat`. Every builder method returns a new pipeline and leaves this one unchanged, so a pipeline can be
    extended in several ways. Nothing runs until :meth:`start`, iteration, :meth:`run` or
    :meth:`to_list`.
    """

    __slots__ = ("_next_capacity", "_next_relief", "_source", "_stages")
    _source: Source | AsyncSource | QueueSource | MergeSource | ConcatSource
    _stages: tuple[StageSpec, ...]
    _next_capacity: int | None
    _next_relief: bool

    def __init__(self) -> None:
        """Not called directly: a pipeline starts from a source, with :meth:`from_iter`,
        :meth:`from_async_iter`, :meth:`from_queue`, :meth:`merge` or :meth:`concat`.

        Raises:
            TypeError: always.
        """
        raise TypeError(
            "Pipeline() is not called directly: start from a source, "
            "Pipeline.from_iter(iterable) (or from_async_iter, from_queue, merge, concat)"
        )

    @classmethod
    def _make(
        cls,
        source: Source | AsyncSource | QueueSource | MergeSource | ConcatSource,
        stages: tuple[StageSpec, ...] = (),
        next_capacity: int | None = None,
        next_relief: bool = False,
    ) -> Pipeline[Any]:
        """The internal constructor: a pipeline of ``source`` and ``stages``."""
        self: Pipeline[Any] = object.__new__(cls)
        self._source = source
        self._stages = stages
        # Set by backpressure() or relief_valve() for the buffer after the last stage: it becomes
        # the input buffer of the next stage added, or the output buffer if none is.
        self._next_capacity = next_capacity
        self._next_relief = next_relief
        return self

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
        return cls._make(Source(iterable))

    @classmethod
    def from_queue(cls, q: Any, *, sentinel: object) -> Pipeline[Any]:
        """Build a pipeline fed by a ``queue.Queue`` that another thread fills.

        Each run reads the queue until ``sentinel`` arrives (compared with ``is``, so ``None``
        can be data or the sentinel, as you choose); the next run goes on from there. Cancelling
        a run ends it promptly even while the queue is empty.

        Args:
            q: the queue (anything with ``get(timeout=...)`` raising ``queue.Empty``).
            sentinel: the object that ends the input.

        Returns:
            A pipeline with no stages yet.

        Raises:
            TypeError: ``q`` is not a queue.
        """
        return cls._make(QueueSource(q, sentinel))

    @classmethod
    def merge(cls, *pipelines: Pipeline[T]) -> Pipeline[T]:
        """Build a pipeline whose source is the outputs of several pipelines, as they come.

        Each merged pipeline runs as a run of its own; their outputs are interleaved in the order
        they arrive. The merged source ends when all of them have ended. A failure in any of them
        fails the merged run with that very exception; cancelling the merged run cancels all.

        Args:
            pipelines: the pipelines to merge, at least one.

        Returns:
            A pipeline with no stages yet.

        Raises:
            TypeError: no pipeline given, or an argument is not a Pipeline.
        """
        return cls._make(MergeSource(pipelines))

    @classmethod
    def concat(cls, *pipelines: Pipeline[T]) -> Pipeline[T]:
        """Build a pipeline whose source is the outputs of several pipelines, one after another.

        All outputs of the first pipeline, in its order, then all of the second, and so on
        (:meth:`merge` interleaves them instead). Each runs as a run of its own, started only once
        the run before it has ended; the source ends when the last has. A failure in any of them
        fails the concatenated run with that very exception and starts none of the rest;
        cancelling the concatenated run (or a ``take()`` after it having all it needs) cancels the
        run under way and starts no other. A pipeline whose one-shot source an earlier run
        consumed fails the run with ``SourceConsumedError`` when its turn comes.

        Args:
            pipelines: the pipelines to concatenate, at least one.

        Returns:
            A pipeline with no stages yet.

        Raises:
            TypeError: no pipeline given, or an argument is not a Pipeline.
        """
        return cls._make(ConcatSource(pipelines))

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

        return cls._make(AsyncSource(aiterable))

    def over(self, iterable: Iterable[Any]) -> Pipeline[T]:
        """Build a pipeline with this one's stages and buffers, fed by ``iterable`` instead.

        A chain built once can so run over many inputs, one-shot generators included: each call
        makes a new pipeline with a source of its own, as :meth:`from_iter` does, and leaves this
        one unchanged.

        Args:
            iterable: the items to feed.

        Returns:
            A new pipeline with the same stages.

        Raises:
            TypeError: ``iterable`` is not iterable.
        """
        return Pipeline._make(
            Source(iterable, "over"), self._stages, self._next_capacity, self._next_relief
        )

    def _add(
        self,
        kind: str,
        fn: Callable[[Any], Any],
        workers: int,
        ordered: bool,
        name: str | None,
        executor: Executor | str | None = None,
        timeout: float | None = None,
        call: CallKwargs | None = None,
    ) -> Pipeline[Any]:
        _check_callable("fn", fn)
        _check_count(kind, "workers", workers)
        check_executor(executor)
        coroutine = coroutine_kind(kind, fn)
        timeout = check_timeout(timeout, executor is not None)
        options = _call_options(kind, call, executor)
        if timeout is not None and options.resource is not None and coroutine is None:
            # A coroutine stage cancels an overrunning call; a thread stage can only abandon it.
            raise TypeError(
                f"{kind}(): timeout= with resource= on a thread stage: a call given up on keeps "
                "running with its worker's resource, which the worker would go on using; use "
                "the resource's own timeout"
            )
        if coroutine is not None and executor is not None:
            raise TypeError(
                f"executor={describe(executor)} takes a plain function; {describe(fn)} is a "
                "coroutine function, whose calls run on the run's event loop"
            )
        if not isinstance(ordered, bool):
            raise TypeError(f"ordered must be a bool, got {describe(ordered)}")
        taken = {spec.name for spec in self._stages} | {SOURCE_NAME}
        if name is None:
            name = _unique(_default_name(kind, fn), self._stages)
        elif not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str or None, got {describe(name)}")
        elif name in taken:
            raise ValueError(f"name {name!r} is already used by another stage of this pipeline")
        capacity = self._capacity_before(workers if coroutine is not None else 1)
        spec = StageSpec(
            kind, fn, workers, ordered, name, capacity, executor, coroutine=coroutine,
            timeout=timeout, options=options, relief=self._next_relief,
        )
        return Pipeline._make(self._source, (*self._stages, spec))

    def _operator(
        self, kind: str, name: str, fn: Callable[..., Any], arg: Any = None
    ) -> Pipeline[Any]:
        """Add a one-thread stream operator (``pipe``, ``take``, ``batch``, ``group_by``...)."""
        unique = _unique(name, self._stages)
        capacity = self._capacity_before(1)
        spec = StageSpec(kind, fn, 1, True, unique, capacity, arg=arg, relief=self._next_relief)
        return Pipeline._make(self._source, (*self._stages, spec))

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
        **call: Unpack[CallKwargs],
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
        timeout: float | None = ...,
        **call: Unpack[CallKwargs],
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
        on_error: str | Callable[[BaseException, Any], Any] = "raise",
        retries: int = 0,
        retry_delay: float = 0.1,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        rate: float | None = None,
        resource: Callable[[], Any] | None = None,
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
            timeout: the most seconds one call may take; the call's item then fails with
                ``TimeoutError`` (noted with the stage and the item), which ``retries`` and
                ``on_error`` handle like any failure. A coroutine stage cancels the call. A thread
                stage cannot interrupt it: it abandons it (its thread runs on until the call
                returns, then exits; the result is dropped) and makes its next calls on a fresh
                thread, so at most ``workers`` calls that count run at once. Abandoned calls are
                counted in ``StageStats.abandoned``; ``join()`` does not wait for them. Not with
                ``executor=``, nor with ``resource=`` on a thread stage.
            on_error: ``"raise"`` (the failure stops the run and reaches the caller),
                ``"skip"`` (the item is dropped, the run goes on), or a callable ``(exc, item) ->
                value`` whose result stands for the call's (raising inside it stops the run).
                Handled failures are listed in ``run.errors`` and counted in the stage's
                ``errors``.
            retries: how many times a failing item is tried again before ``on_error`` applies
                (a ``flat_map`` call only while it has yielded nothing).
            retry_delay: the first retry's delay in seconds; each next one doubles, with jitter
                (0.5x to 1.5x). A cancel cuts the wait short.
            retry_on: the exception type or types that are retried.
            rate: the most call starts per second, across all the stage's workers, measured from
                the previous call's actual start; waits count in ``StageStats.throttled_seconds``.
            resource: a callable making a resource, passed as ``fn(item, resource)``: one per
                worker thread, one per coroutine stage (made on the run's loop; an async context
                manager is entered), or one per worker process with ``executor="processes"``.
                A context manager is exited (anything with ``close()`` closed) when its worker,
                stage or process is done, with the call failure that ended it if one did.

        Returns:
            A new pipeline ending in this stage.

        Raises:
            TypeError: ``fn`` is not callable, an argument has the wrong type, ``executor`` is
                neither an ``Executor`` nor ``"processes"`` or is given with a coroutine function,
                ``timeout`` is given with ``executor`` or ``resource``, or ``fn`` is an async
                generator function (only ``flat_map`` takes one).
            ValueError: ``workers`` < 1, ``name`` is taken, or ``timeout`` is not > 0.
        """
        return self._add(MAP, fn, workers, ordered, name, executor, timeout, _given(on_error, retries, retry_delay, retry_on, rate, resource))

    def filter(
        self,
        pred: Callable[[T], object] | None = None,
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
        executor: Executor | Literal["processes"] | None = None,
        timeout: float | None = None,
        on_error: str | Callable[[BaseException, Any], Any] = "raise",
        retries: int = 0,
        retry_delay: float = 0.1,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        rate: float | None = None,
        resource: Callable[[], Any] | None = None,
    ) -> Pipeline[T]:
        """Add a stage that keeps the items for which ``pred(item)`` is true.

        Without ``pred`` (or with None), keeps the items that are true themselves, as the
        built-in ``filter(None, items)`` does; the stage is then named ``filter``. An async
        ``pred`` makes a coroutine stage: the awaited result decides.

        Args and raises are those of :meth:`map`.
        """
        if pred is None:
            pred = bool
            name = _unique(FILTER, self._stages) if name is None else name
        return self._add(FILTER, pred, workers, ordered, name, executor, timeout, _given(on_error, retries, retry_delay, retry_on, rate, resource))

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
        **call: Unpack[CallKwargs],
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
        timeout: float | None = ...,
        **call: Unpack[CallKwargs],
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
        on_error: str | Callable[[BaseException, Any], Any] = "raise",
        retries: int = 0,
        retry_delay: float = 0.1,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        rate: float | None = None,
        resource: Callable[[], Any] | None = None,
    ) -> Pipeline[Any]:
        """Add a stage that outputs every element of the iterable ``fn(item)`` returns.

        Unordered, the outputs of one item are streamed on as they come; ordered (with more than
        one worker), each item's outputs wait until the items before it are out.

        A coroutine stage takes an ``async def`` that returns an iterable or an async iterable, or
        an async generator function; either way the outputs stream on a buffer's worth at a time
        (``timeout`` covers the whole call).

        Args and raises are those of :meth:`map`.
        """
        return self._add(FLAT_MAP, fn, workers, ordered, name, executor, timeout, _given(on_error, retries, retry_delay, retry_on, rate, resource))

    def each(
        self,
        fn: Callable[[T], object],
        *,
        workers: int = 1,
        ordered: bool = True,
        name: str | None = None,
        executor: Executor | Literal["processes"] | None = None,
        timeout: float | None = None,
        on_error: str | Callable[[BaseException, Any], Any] = "raise",
        retries: int = 0,
        retry_delay: float = 0.1,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        rate: float | None = None,
        resource: Callable[[], Any] | None = None,
    ) -> Pipeline[T]:
        """Add a stage that calls ``fn(item)`` for its side effect and passes the item on.

        An async ``fn`` makes a coroutine stage: the item passes on once its coroutine is done.

        Args and raises are those of :meth:`map`.
        """
        return self._add(EACH, fn, workers, ordered, name, executor, timeout, _given(on_error, retries, retry_delay, retry_on, rate, resource))

    def backpressure(self, n: int) -> Pipeline[T]:
        """Size the buffer after the last stage (or after the source): it holds at most ``n`` items.

        When the buffer is full, the stage before it waits. Without this call a buffer holds
        ``DEFAULT_BUFFER`` (32) items; more where the stage next to it calls for more: the one the
        caller reads holds as many as the last stage has ``workers``, and one next to a coroutine
        stage as many as that stage has (see ``output_capacity``).

        Args:
            n: the buffer's capacity, >= 1.

        Returns:
            A new pipeline with the buffer sized.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n`` < 1.
        """
        _check_count("backpressure", "n", n)
        return Pipeline._make(self._source, self._stages, n)

    def relief_valve(self, n: int) -> Pipeline[T]:
        """Make the buffer after the last stage (or the source) a relief valve of ``n`` items.

        A relief valve never makes the stage before it wait: when it is full, a new item pushes
        the oldest one out. Use it where the newest items matter more than every item (live
        readings, status updates). The stage after it counts what was dropped in its statistics
        (``StageStats.dropped``). At the end of input, whatever the valve holds is delivered.

        Args:
            n: the most items the valve holds, >= 1.

        Returns:
            A new pipeline with the valve in place.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n`` < 1.
        """
        _check_count("relief_valve", "n", n)
        return Pipeline._make(self._source, self._stages, n, next_relief=True)

    def pipe(
        self, fn: Callable[[Iterator[T]], Iterable[U]], *, name: str | None = None
    ) -> Pipeline[U]:
        """Add a stage that runs ``fn(inputs)``, a generator function over the whole stream.

        The counterpart of a custom pump: ``fn`` receives an iterator over the stage's inputs, in
        order, and yields outputs; it runs in one thread of its own and may keep any state (a
        running total, a window, deduplication). The same guarantees hold as for other stages:
        its outputs are handed on as it yields them, its exception reaches the caller as itself,
        and on cancel it is closed (its ``finally`` blocks run). If it returns before its inputs
        end, the stage ends there and everything upstream of it stops, as with :meth:`take`.

        Args:
            fn: a function of an iterator returning an iterable (typically a generator function).
            name: the stage's label (default: ``fn``'s name).

        Returns:
            A new pipeline ending in this stage.

        Raises:
            TypeError: ``fn`` is not callable.
        """
        _check_callable("fn", fn)
        return self._operator(PIPE, name or _default_name(PIPE, fn), fn)

    def batch(self, n: int, timeout: float | None = None) -> Pipeline[list[T]]:
        """Add a stage that groups items into lists of ``n``, in order.

        The last batch may be shorter: it is emitted when the input ends. With ``timeout``, a
        partial batch is also emitted once ``timeout`` seconds have passed since its first item
        arrived, so that a slow trickle of items still moves on.

        Args:
            n: the batch size, >= 1.
            timeout: the most seconds an item waits for its batch to fill, > 0; None to wait
                for a full batch (or the end of input).

        Returns:
            A new pipeline of lists.

        Raises:
            TypeError: ``n`` is not an int or ``timeout`` not a number.
            ValueError: ``n`` < 1 or ``timeout`` <= 0.
        """
        _check_count("batch", "n", n)
        seconds = _check_seconds("batch", "timeout", timeout)
        return self._operator(BATCH, BATCH, _no_call, (n, seconds))

    def group_by(
        self,
        key: Callable[[T], K],
        n: int,
        *,
        timeout: float | None = None,
        max_open: int = 1024,
    ) -> Pipeline[tuple[K, list[T]]]:
        """Add a stage that groups items by ``key(item)`` into ``(k, [items])`` tuples.

        One list per key, its items in arrival order. A key's group goes out when it holds ``n``
        items; when its first item has waited ``timeout`` seconds; when more than ``max_open``
        groups are open (the oldest open group goes out first); and at the end of input (every
        open group, oldest first). The next item of a key whose group went out opens a new one.
        ``key`` runs in the stage's one thread, item by item; its keys must be hashable. Memory
        is bounded: at most ``max_open`` groups of fewer than ``n`` items are open, and
        ``buffer_bound()`` counts ``n * max_open`` for them.

        Args:
            key: a function of an item returning its (hashable) key.
            n: the most items in a group, >= 1.
            timeout: the most seconds an item waits for its group to fill, > 0; None to wait for
                a full group (or another reason to go out).
            max_open: the most groups open at once, >= 1.

        Returns:
            A new pipeline of ``(key, items)`` tuples.

        Raises:
            TypeError: ``key`` is not callable, ``n`` or ``max_open`` is not an int, or
                ``timeout`` not a number.
            ValueError: ``n`` or ``max_open`` < 1, or ``timeout`` not a finite number > 0.
        """
        _check_callable("key", key, "group_by")
        _check_count("group_by", "n", n)
        seconds = _check_seconds("group_by", "timeout", timeout)
        _check_count("group_by", "max_open", max_open)
        return self._operator(GROUP_BY, GROUP_BY, key, (n, seconds, max_open))

    def flatten(self: Pipeline[Iterable[U]]) -> Pipeline[U]:
        """Add a stage that passes on the elements of each (iterable) item: the inverse of batch.

        Returns:
            A new pipeline of the elements.
        """
        return self._add(FLAT_MAP, iter, 1, True, _unique("flatten", self._stages))

    def enumerate(self) -> Pipeline[tuple[int, T]]:
        """Add a stage that outputs ``(index, item)`` pairs, numbering items in arrival order.

        Returns:
            A new pipeline of pairs.
        """
        return self._operator(PIPE, "enumerate", enumerate)

    def skip(self, n: int) -> Pipeline[T]:
        """Add a stage that drops the first ``n`` items and passes on the rest.

        Args:
            n: how many items to drop, >= 0.

        Returns:
            A new pipeline.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n`` < 0.
        """
        _check_count("skip", "n", n, least=0)
        return self._operator(PIPE, "skip", partial(_skip, n))

    def take(self, n: int) -> Pipeline[T]:
        """Add a stage that passes on the first ``n`` items, then ends the run.

        Once ``n`` items are through, the stages after it finish those items and end normally,
        while everything before it stops at once: no new calls, the source is no longer pulled
        (a generator source is closed), so ``take`` on an infinite source is fine. Failures of the
        stopped stages after that moment are ignored: their items are not needed.

        Args:
            n: how many items to pass on, >= 0.

        Returns:
            A new pipeline.

        Raises:
            TypeError: ``n`` is not an int.
            ValueError: ``n`` < 0.
        """
        _check_count("take", "n", n, least=0)
        return self._operator(TAKE, TAKE, _no_call, n)

    def take_while(self, pred: Callable[[T], object]) -> Pipeline[T]:
        """Add a stage that passes on items while ``pred(item)`` is true, then ends the run.

        At the first item for which ``pred`` is false, that item and everything after it are
        dropped and the run ends as with :meth:`take`: the stages after it finish the items they
        have and end normally, everything before it stops at once (a generator source is
        closed). ``pred`` runs in the stage's one thread, in input order, as
        ``itertools.takewhile`` calls it.

        Args:
            pred: a function of an item; its result is taken as true or false.

        Returns:
            A new pipeline.

        Raises:
            TypeError: ``pred`` is not callable.
        """
        _check_callable("pred", pred, "take_while")
        return self._operator(TAKE_WHILE, TAKE_WHILE, pred)

    def skip_while(self, pred: Callable[[T], object]) -> Pipeline[T]:
        """Add a stage that drops items while ``pred(item)`` is true, then passes on the rest.

        From the first item for which ``pred`` is false, every item passes, whatever ``pred``
        would say of it (it is not called again), as ``itertools.dropwhile`` does. ``pred`` runs
        in the stage's one thread, in input order.

        Args, returns and raises are those of :meth:`take_while`.
        """
        _check_callable("pred", pred, "skip_while")
        return self._operator(SKIP_WHILE, SKIP_WHILE, pred)

    # ------------------------------------------------------------------ facts

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages' names, in order."""
        return tuple(spec.name for spec in self._stages)

    @property
    def output_capacity(self) -> int:
        """The capacity of the buffer the caller reads outputs from.

        ``backpressure(n)`` after the last stage sets it. Otherwise it is ``DEFAULT_BUFFER``, or
        the last stage's ``workers`` when that is more, so that every worker of the stage can hand
        an output on while the caller wakes up. The caller is one thread that takes the outputs a
        batch per wake-up, and once hundreds of threads wait for the interpreter lock, a wake-up
        takes milliseconds: a buffer smaller than the stage that writes it then keeps that stage's
        workers waiting for room, each holding its place, meanwhile.
        """
        return self._capacity_before(1, caller=True)

    def _capacity_before(self, coroutines: int, caller: bool = False) -> int:
        """The capacity of the buffer between the last stage so far and its reader: what
        ``backpressure()`` said, else ``DEFAULT_BUFFER``, or more where a side calls for more.

        The writer's ``workers`` count when the reader is the ``caller`` (see
        ``output_capacity``) or the writer is a coroutine stage; the reader's ``coroutines``
        (1 for a reader that is not a coroutine stage) count too. A coroutine stage's calls end
        together, within one turn of its loop, and start together: a buffer smaller than that has
        its coroutines wait for room or for items one by one, a future and a wake-up each. Between
        thread stages the buffer stays at ``DEFAULT_BUFFER``: sized there too, it measured no
        better (``bench/highc.py``, interleaved) and more than doubled ``buffer_bound()`` at 128
        workers per stage."""
        if self._next_capacity is not None:
            return self._next_capacity
        last = self._stages[-1] if self._stages else None
        writer = 1
        if last is not None and (caller or last.coroutine is not None):
            writer = last.workers
        return max(DEFAULT_BUFFER, writer, coroutines)

    def buffer_bound(self) -> int:
        """The most items a run of this pipeline holds at once between its source and the caller.

        The sum of: what the feeder thread holds (one item, or a buffer's worth when the source is
        a built-in container such as a list or a range, whose items are in memory anyway); for
        each stage, its input buffer's capacity ``C`` plus what its workers hold, at most
        ``ceil(C/1) + ceil(C/2) + ... + ceil(C/workers)`` items (twice that for an ordered stage
        with more than one worker: its reorder buffer), plus, for a ``flat_map`` stage, one
        output buffer's worth per worker while it streams; and the output buffer twice (the
        buffer, and the batch the caller's iterator took from it). Items are counted where they
        are: a ``flat_map`` stage's outputs count as many items as it yields, and a list that
        ``batch(n)`` made (or a group of ``group_by(key, n)``) counts as the ``n`` items in it;
        ``group_by`` also holds its open groups, ``n * max_open`` items. A merged source counts
        the bounds of the pipelines it merges, a concatenated one the largest of them (one runs
        at a time). Each kind of stage declares its share (``held``) next to the
        code that holds the items. Not bounded: what a ``pipe()`` function keeps in its own state,
        and the outputs of one call of an ``async def`` or executor ``flat_map``, which arrive
        together (they count as the one item they came from).

        Returns:
            The bound, an int.
        """
        capacities = [spec.capacity for spec in self._stages] + [self.output_capacity]
        bound = self._source.held(capacities[0])
        weight = 1  # how many source items one item here stands for (a batch of n: n)
        for spec, next_capacity in zip(self._stages, capacities[1:], strict=True):
            runtime = runtime_of(spec)
            out_weight = runtime.weight(spec, weight)
            bound += (spec.capacity + runtime.held(spec, next_capacity)) * weight
            bound += runtime.held_outputs(spec, next_capacity) * out_weight
            weight = out_weight
        return bound + 2 * self.output_capacity * weight

    def _length(self) -> int | None:
        """How many outputs a run will make, when the source's length is known and every stage's
        count follows from it (``map``, ``each``, ``take``); else None."""
        total = source_length(self._source.iterable)
        for spec in self._stages:
            total = count_through(spec, total)
        return total

    def __len__(self) -> int:
        """How many outputs a run of this pipeline makes, so ``tqdm(pipeline)`` shows a total.

        Known when the source has a length (a list, a range) and every stage makes a known number
        of outputs from its inputs: ``map`` and ``each`` (without ``on_error="skip"``), ``take``.

        Raises:
            TypeError: the number is not known (a generator source, a ``filter``, a ``flat_map``).
        """
        total = self._length()
        if total is None:
            raise TypeError(
                "this pipeline's length is not known: its source has no length, or a stage "
                "(filter, flat_map, an operator, on_error='skip') changes the count"
            )
        return total

    def __length_hint__(self) -> int:
        total = self._length()
        return NotImplemented if total is None else total

    def __bool__(self) -> bool:
        """A pipeline is always true (``__len__`` would make an empty or unknown one false)."""
        return True

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
        return wire(
            self._source,
            self._stages,
            self.output_capacity,
            self._next_relief,
            self._length(),
            bar_options,
            trace_cap,
            monitor,
        )

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
            del run  # the traceback of a failure holds this frame: it must not hold the run

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
        del run  # the traceback of a failure holds this frame: it must not hold the run
