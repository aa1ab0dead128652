"""How a stage makes one call: retries with backoff, a rate limit, an error policy, a resource.

A stage without any of these calls the user's function directly: :func:`wrap` returns it unchanged,
so the plain path costs nothing. With them, each worker builds its call once, when it starts, as a
closure over its own resource and the stage's shared rate limiter.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from ._errors import describe, label
from ._scope import Cancelled

if TYPE_CHECKING:
    from ._run import RunState
    from ._scope import Scope

__all__ = [
    "SKIPPED",
    "CallOptions",
    "ItemError",
    "RateLimiter",
    "attempts",
    "attempts_async",
    "backoff",
    "handle",
    "check_options",
    "open_resource",
    "open_resource_async",
    "wrap",
    "wrap_iter",
]


class _Skipped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<threadpipe SKIPPED>"


SKIPPED: Final = _Skipped()
"""What a wrapped call returns for an item dropped by ``on_error="skip"``; never reaches a user."""


# ItemError and CallOptions are written out rather than made with ``@dataclass(frozen=True,
# slots=True)``: importing ``dataclasses`` (it imports ``inspect``) and generating the classes is a
# good part of the cost of ``import threadpipe``. They behave as those dataclasses did: the same
# constructor, repr, equality, hash, immutability (``dataclasses.FrozenInstanceError``) and
# pickling; only ``dataclasses.fields()`` and ``replace()`` no longer apply to them.


class _Frozen:
    """Refuses assignment and deletion of attributes, as a frozen dataclass does."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        from dataclasses import FrozenInstanceError  # here: only a misuse pays for the import

        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        from dataclasses import FrozenInstanceError  # here: only a misuse pays for the import

        raise FrozenInstanceError(f"cannot delete field {name!r}")


class ItemError(_Frozen):
    """A failure that an error policy handled: the run went on without the item.

    Attributes:
        stage: the stage's name.
        item: the item whose call failed.
        exception: the exception the last attempt raised, as itself.
    """

    __slots__ = ("stage", "item", "exception")
    __match_args__ = ("stage", "item", "exception")

    stage: str
    item: Any
    exception: BaseException

    def __init__(self, stage: str, item: Any, exception: BaseException) -> None:
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "item", item)
        object.__setattr__(self, "exception", exception)

    def _fields(self) -> tuple[str, Any, BaseException]:
        return (self.stage, self.item, self.exception)

    def __repr__(self) -> str:
        return (
            f"{type(self).__qualname__}(stage={self.stage!r}, item={self.item!r}, "
            f"exception={self.exception!r})"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ItemError) and other.__class__ is self.__class__:
            return self._fields() == other._fields()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._fields())

    def __reduce__(self) -> tuple[type[ItemError], tuple[str, Any, BaseException]]:
        return (type(self), self._fields())


class CallOptions(_Frozen):
    """How a stage calls its function, as built.

    Attributes:
        on_error: ``"raise"``, ``"skip"``, or a callable ``(exc, item) -> replacement``.
        retries: how many times a failing item is tried again before ``on_error`` applies.
        retry_delay: the first retry's delay in seconds; each next one doubles, with jitter.
        retry_on: the exception types that are retried.
        rate: the most calls per second, across all the stage's workers; None for no limit.
        resource: a callable making one resource per worker, passed to ``fn(item, resource)``.
    """

    __slots__ = ("on_error", "retries", "retry_delay", "retry_on", "rate", "resource")
    __match_args__ = ("on_error", "retries", "retry_delay", "retry_on", "rate", "resource")

    on_error: str | Callable[[BaseException, Any], Any]
    retries: int
    retry_delay: float
    retry_on: tuple[type[BaseException], ...]
    rate: float | None
    resource: Callable[[], Any] | None

    def __init__(
        self,
        on_error: str | Callable[[BaseException, Any], Any] = "raise",
        retries: int = 0,
        retry_delay: float = 0.1,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        rate: float | None = None,
        resource: Callable[[], Any] | None = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "on_error", on_error)
        set_(self, "retries", retries)
        set_(self, "retry_delay", retry_delay)
        set_(self, "retry_on", retry_on)
        set_(self, "rate", rate)
        set_(self, "resource", resource)

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.on_error,
            self.retries,
            self.retry_delay,
            self.retry_on,
            self.rate,
            self.resource,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__qualname__}(on_error={self.on_error!r}, retries={self.retries!r}, "
            f"retry_delay={self.retry_delay!r}, retry_on={self.retry_on!r}, "
            f"rate={self.rate!r}, resource={self.resource!r})"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CallOptions) and other.__class__ is self.__class__:
            return self._fields() == other._fields()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._fields())

    def __reduce__(self) -> tuple[type[CallOptions], tuple[Any, ...]]:
        return (type(self), self._fields())

    @property
    def plain(self) -> bool:
        """Whether the function is called as it is, with nothing around it."""
        return (
            self.on_error == "raise"
            and not self.retries
            and self.rate is None
            and self.resource is None
        )


PLAIN: Final = CallOptions()


def check_options(
    on_error: object = "raise",
    retries: object = 0,
    retry_delay: object = 0.1,
    retry_on: object = Exception,
    rate: object = None,
    resource: object = None,
) -> CallOptions:
    """Check the call keyword arguments of a stage and bundle them.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: an argument is out of range.
    """
    if not (on_error in ("raise", "skip") or callable(on_error)):
        raise ValueError(
            f'on_error must be "raise", "skip" or a callable (exc, item) -> value, got {describe(on_error)}'
        )
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int >= 0, got {describe(retries)}")
    if retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries}")
    if isinstance(retry_delay, bool) or not isinstance(retry_delay, int | float):
        raise TypeError(f"retry_delay must be a number of seconds >= 0, got {describe(retry_delay)}")
    if not retry_delay >= 0:
        raise ValueError(f"retry_delay must be a number of seconds >= 0, got {retry_delay}")
    types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise TypeError(
            f"retry_on must be an exception type or a tuple of them, got {describe(retry_on)}"
        )
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise TypeError(f"rate must be a number of calls per second > 0, got {describe(rate)}")
        if not rate > 0:
            raise ValueError(f"rate must be a number of calls per second > 0, got {rate}")
    if resource is not None and not callable(resource):
        raise TypeError(f"resource must be a callable that makes the resource, got {describe(resource)}")
    return CallOptions(
        on_error,
        retries,
        float(retry_delay),
        types,
        None if rate is None else float(rate),
        resource,
    )


class RateLimiter:
    """Keeps the call starts of all a stage's workers at least ``1 / rate`` seconds apart.

    A call may start once ``1 / rate`` has passed since the previous call *started*, measured when
    it did: a start claims its moment under the lock, with the clock read under the lock. (Booking
    slots on a grid ahead of time would let a call that woke late be followed by one right after
    it.) A worker that finds it too early waits, outside the lock, and tries again.

    Args:
        rate: calls per second, > 0.
        cancelled: the stage's scope's event; a waiting thread then raises ``Cancelled``.
    """

    def __init__(self, rate: float, cancelled: threading.Event) -> None:
        self._interval = 1.0 / rate
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self._last: float | None = None

    def claim(self) -> float:
        """Claim the right to start now and return 0, or return how many seconds to wait first."""
        with self._lock:
            now = monotonic()
            last = self._last
            if last is not None and now < last + self._interval:
                return last + self._interval - now
            self._last = now
            return 0.0

    def wait(self) -> float:
        """Return when this call may start (a worker thread's wait), with the seconds it waited.

        Raises:
            Cancelled: the stage's scope was cancelled while waiting.
        """
        started = monotonic()
        while True:
            if self._cancelled.is_set():
                raise Cancelled
            delay = self.claim()
            if delay <= 0:
                return monotonic() - started
            if self._cancelled.wait(delay):
                raise Cancelled


def _entered(made: Any) -> tuple[str, Any]:
    """How a resource is released: ``"async"`` (an async context manager), ``"sync"`` (a context
    manager), ``"aclose"``, ``"close"`` or ``"none"``; and the object it releases through."""
    cls = type(made)
    if hasattr(cls, "__aenter__") and hasattr(cls, "__aexit__"):
        return "async", made
    if hasattr(cls, "__enter__") and hasattr(cls, "__exit__"):
        return "sync", made
    if callable(getattr(made, "aclose", None)):
        return "aclose", made
    if callable(getattr(made, "close", None)):
        return "close", made
    return "none", made


def _exit_args(failure: BaseException | None) -> tuple[Any, Any, Any]:
    if failure is None:
        return None, None, None
    return type(failure), failure, failure.__traceback__


def open_resource(
    options: CallOptions,
) -> tuple[Any, Callable[[BaseException | None], None]]:
    """Make one thread worker's resource; return it and the function that releases it.

    A context manager is entered (the worker gets what ``__enter__`` returns) and exited when the
    worker exits, with the exception of the worker's own failed call if that is what ended it (so
    a database connection rolls back), else with ``(None, None, None)``; any other object with a
    ``close()`` method is closed then.
    """
    assert options.resource is not None
    made = options.resource()
    cls = type(made)
    if hasattr(cls, "__enter__") and hasattr(cls, "__exit__"):
        return _sync_release("sync", made)
    return _sync_release("close" if callable(getattr(made, "close", None)) else "none", made)


async def open_resource_async(
    options: CallOptions,
) -> tuple[Any, Callable[[BaseException | None], Awaitable[None]]]:
    """Make a coroutine stage's resource on the run's loop; return it and its async release.

    As :func:`open_resource`, and an async context manager is entered with ``async with``
    semantics (``aiohttp.ClientSession``), an object with ``aclose()`` is awaited closed.
    """
    assert options.resource is not None
    how, made = _entered(options.resource())
    if how == "async":
        value = await type(made).__aenter__(made)

        async def aexit(failure: BaseException | None) -> None:
            await type(made).__aexit__(made, *_exit_args(failure))

        return value, aexit
    value, release = _sync_release(how, made)

    async def close(failure: BaseException | None) -> None:
        if how == "aclose":
            await made.aclose()
        else:
            release(failure)

    return value, close


def _sync_release(how: str, made: Any) -> tuple[Any, Callable[[BaseException | None], None]]:
    if how == "sync":
        value = type(made).__enter__(made)
        return value, lambda failure: type(made).__exit__(made, *_exit_args(failure))
    if how == "close":
        return made, lambda failure: made.close()
    return made, lambda failure: None


def backoff(options: CallOptions, attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (from 1): exponential, with jitter.

    The nominal delay doubles each time; the jitter, within [0.5, 1.5) of it, keeps workers that
    failed together from all retrying at the same moment.
    """
    import random  # here: only retrying stages need it, and it costs ~5 ms to import

    return float(options.retry_delay * 2 ** (attempt - 1) * (0.5 + random.random()))


def handle(
    failure: Exception,
    item: Any,
    options: CallOptions,
    *,
    stage: str,
    run: RunState,
    counters: Any,
    fallback: Callable[[Any], Any],
) -> Any:
    """Apply the error policy to a failure that retries did not cure; return what the call gives.

    The failure is labelled, counted and kept in ``run.errors``; then the item is skipped (the
    call gives ``fallback(item)``) or the policy's replacement is returned. A policy that raises
    fails the run with what it raised.
    """
    label(failure, stage, item)
    counters.errors += 1
    run.record_error(ItemError(stage, item, failure))
    if options.on_error == "skip":
        return fallback(item)
    return options.on_error(failure, item)  # type: ignore[operator]


def attempts(
    once: Callable[[], Any],
    options: CallOptions,
    limiter: RateLimiter | None,
    stopped: threading.Event,
    counters: Any,
) -> tuple[bool, Any]:
    """Make one call with the stage's rate limit and retries: the sync driver of the call core.

    Each attempt first waits for the rate limit (the wait counted in ``throttled_seconds``). A
    failure of a ``retry_on`` type is tried again after :func:`backoff`, up to ``retries`` times;
    a cancel cuts the wait short.

    Returns:
        ``(True, what once() returned)``, or ``(False, the failure)`` for the error policy.

    Raises:
        BaseException: the failure itself when the policy is ``"raise"`` or it is not an
            ``Exception`` (Ctrl-C, ``SystemExit``): it fails the run.
        Cancelled: the stage's scope was cancelled while waiting.
    """
    attempt = 0
    while True:
        if limiter is not None:
            counters.throttled_seconds += limiter.wait()
        try:
            return True, once()
        except BaseException as error:
            if attempt < options.retries and isinstance(error, options.retry_on):
                attempt += 1
                if stopped.wait(backoff(options, attempt)):
                    raise Cancelled from None
                continue
            if options.on_error == "raise" or not isinstance(error, Exception):
                raise
            return False, error


async def attempts_async(
    once: Callable[[], Awaitable[Any]],
    options: CallOptions,
    limiter: RateLimiter | None,
    counters: Any,
    retryable: Callable[[], bool],
) -> tuple[bool, Any, float]:
    """The async driver of :func:`attempts`, for a coroutine stage: the same rules, waiting with
    ``asyncio.sleep`` so that the loop never blocks; a cancel is never retried or handled.

    Args:
        retryable: whether a failure may still be retried (a ``flat_map`` call that handed
            outputs on may not).

    Returns:
        As :func:`attempts`, and the seconds this call waited for the rate limit.
    """
    import asyncio  # here: only coroutine stages come here, and they imported it already

    attempt = 0
    throttled = 0.0
    while True:
        if limiter is not None:
            # As ``RateLimiter.wait``, sleeping on the loop between claims: what it waits for is
            # a clock, not an event.
            waiting = monotonic()
            while (delay := limiter.claim()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(delay)
            waited = monotonic() - waiting
            counters.throttled_seconds += waited
            throttled += waited
        try:
            return True, await once(), throttled
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            if retryable() and attempt < options.retries and isinstance(error, options.retry_on):
                attempt += 1
                await asyncio.sleep(backoff(options, attempt))
                continue
            if options.on_error == "raise" or not isinstance(error, Exception):
                raise
            return False, error, throttled


def wrap(
    fn: Callable[..., Any],
    options: CallOptions,
    *,
    stage: str,
    run: RunState,
    scope: Scope,
    limiter: RateLimiter | None,
    resource: Any,
    counters: Any,
    fallback: Callable[[Any], Any] | None,
) -> Callable[[Any], Any]:
    """Build one worker's call of ``fn`` with the stage's options around it.

    Args:
        fn: the user's function.
        options: the stage's call options (not plain).
        stage: the stage's name, for notes and :class:`ItemError`.
        run: the run's state: its ``errors`` list.
        scope: the stage's scope: its event cuts a retry's backoff short.
        limiter: the stage's shared rate limiter, if it has a rate.
        resource: the worker's resource, passed as ``fn(item, resource)`` if the stage has one.
        counters: the worker's counters; ``errors`` counts the failures the policy handled.
        fallback: what a skipped item becomes for the stage's kind (``SKIPPED`` for map and each,
            False for filter, an empty tuple for flat_map).

    Returns:
        A function of one item.
    """
    assert fallback is not None
    stopped = scope.event
    has_resource = options.resource is not None
    state = _weak(run)

    def call(item: Any) -> Any:
        def once() -> Any:
            return fn(item, resource) if has_resource else fn(item)

        ok, value = attempts(once, options, limiter, stopped, counters)
        if ok:
            return value
        return handle(value, item, options, stage=stage, run=state(), counters=counters, fallback=fallback)

    return call


def wrap_iter(
    fn: Callable[..., Any],
    options: CallOptions,
    *,
    stage: str,
    run: RunState,
    scope: Scope,
    limiter: RateLimiter | None,
    resource: Any,
    counters: Any,
    fallback: Callable[[Any], Any] | None = None,
) -> Callable[[Any], Iterator[Any]]:
    """Build one worker's call of a ``flat_map`` function: an iterator over the item's outputs.

    The outputs stream one by one, never collected: the caller reads its stop flag between any
    two. The options apply as for :func:`wrap`, with one rule of its own: a failure is retried
    only while the call has yielded nothing (its outputs already passed on cannot be taken
    back); after that, ``on_error`` applies to it as to any failure that retries did not cure,
    and the outputs already yielded stay. ``"skip"`` yields nothing more; a callable's result is
    iterated in place of the rest.

    Args:
        As :func:`wrap`; ``fallback`` is not used (a skipped item yields nothing more).

    Returns:
        A function of one item returning an iterator.
    """
    policy = options.on_error
    stopped = scope.event
    has_resource = options.resource is not None
    state = _weak(run)

    def policy_for(failure: Exception, item: Any) -> Iterator[Any]:
        replacement = handle(
            failure, item, options, stage=stage, run=state(), counters=counters, fallback=_nothing
        )
        return iter(replacement)

    def call(item: Any) -> Iterator[Any]:
        # A plain function, not a generator: the call itself (up to the first output) runs here,
        # so an exception it raises, StopIteration included, leaves as itself (inside a generator,
        # PEP 479 would turn a StopIteration into a RuntimeError of the library's making). It is
        # retried as a whole while it has yielded nothing.
        def once() -> tuple[Iterator[Any], Any]:
            results = iter(fn(item, resource) if has_resource else fn(item))
            return results, next(results, _NOTHING)

        ok, value = attempts(once, options, limiter, stopped, counters)
        if not ok:
            return policy_for(value, item)
        results, first = value
        if first is _NOTHING:
            return iter(())
        return rest(first, results, item)

    def rest(first: Any, results: Iterator[Any], item: Any) -> Iterator[Any]:
        # The outputs after the first: a failure here is final (what was yielded stays).
        try:
            yield first
            del first
            yield from results
        except GeneratorExit:
            raise  # the consumer stopped reading (a cancel): not a failure
        except BaseException as error:
            if policy == "raise" or not isinstance(error, Exception):
                raise
            failure = error
        else:
            return
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # the user's generator's finally blocks run now, in this thread
        yield from policy_for(failure, item)

    return call


_NOTHING: Final = object()


def _weak(run: RunState) -> Callable[[], RunState]:
    """The run, through a weak reference, for a closure that must not hold it.

    A failed call's traceback keeps the closure's frame, and the frame keeps the closure: were it
    to hold the run, which holds the failure, a failed run would be freed only by the garbage
    collector. The worker that calls the closure holds the run while it does.
    """
    ref = weakref.ref(run)

    def get() -> RunState:
        state = ref()
        assert state is not None  # the worker calling this holds the run
        return state

    return get


def _nothing(item: Any) -> tuple[()]:
    return ()
