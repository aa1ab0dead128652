"""Regressions for the runtime defects of the issue "One stage, one stop", through the public API.

Each section names its defect. The randomized classes (a reader left behind by ``take``, a stage
raising ``StopIteration``, ``buffer_bound()`` exceeded) also have case generators in
``tests/test_faults.py``. Every wait here is bounded: a defect makes a test fail in seconds, never
hang; threads a defect would leave running are released in ``finally`` blocks, so that the leak
fixture reports the test's own failure and not a cascade.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from tracked import Tracked, Tracker, check_bound, tracked_source

import threadpipe as tp
from threadpipe import Pipeline
from threadpipe._threads import settle

# How long a run gets to end once nothing should hold it (the brief's join(timeout=5)).
_JOIN = 5.0
# How long a test waits for something that a correct runtime does in milliseconds.
_PROMPT = 5.0


def _run_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("threadpipe-")]


def _threads_gone(before: set[threading.Thread] | None = None, timeout: float = _PROMPT) -> list[str]:
    """Wait (bounded) until the threadpipe threads not in ``before`` have exited or parked; the
    names of those still serving a run. A pooled thread parks when its job is done, renamed
    (``threadpipe.idle``), and exits only after its idle time: joining it would wait for that."""
    before = before or set()
    deadline = time.monotonic() + timeout
    for t in _run_threads():
        if t not in before:
            while t.name.startswith("threadpipe-") and time.monotonic() < deadline:
                t.join(min(0.01, max(0.0, deadline - time.monotonic())))
                if not t.is_alive():
                    break
    return [t.name for t in _run_threads() if t not in before and t.is_alive()]


def _threads_released(
    before: set[threading.Thread], executor: ThreadPoolExecutor | None = None
) -> list[str]:
    """``_threads_gone``, and then wait (bounded) until every pooled thread has returned from its
    job: it takes the run's name off and counts itself out before its frames let go of the run
    (``threadpipe._threads.settle``). Before a test checks that a finished run is freed.

    With ``executor``, also until each of its threads has moved past its last work item: the
    caller's ``ThreadPoolExecutor`` sets a call's exception on its future and lets go of the work
    item (and so of the exception) only after that.
    """
    alive = _threads_gone(before)
    if not settle(_PROMPT):
        alive.append("a pooled thread still in its job")
    if executor is not None:
        workers = executor._max_workers  # each takes one of these only once done with the last
        meet = threading.Barrier(workers)
        moved_on = [executor.submit(meet.wait, _PROMPT) for _ in range(workers)]
        try:
            for future in moved_on:
                future.result(_PROMPT)
        except (threading.BrokenBarrierError, TimeoutError):
            alive.append("an executor thread still in its last work item")
    return alive


@contextmanager
def _watchdog(run: tp.Run[Any], seconds: float = 10.0) -> Iterator[None]:
    """Cancel ``run`` if the block takes longer than ``seconds``: a defect fails, never hangs."""
    timer = threading.Timer(seconds, run.cancel)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()


def _wait_for(predicate: Callable[[], bool], timeout: float = _PROMPT) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        pause.wait(0.005)
    return True


# ============================================================================================
# 1. A failed run is never freed
# ============================================================================================

_ITEM_BYTES = 100_000
_FAILED_RUNS = 8
# A failed run that holds its buffers keeps tens of 100 kB items (3.7 MB each in the issue); the
# slack is for the interpreter's own caches, not for even one run's items.
_SLACK_BYTES = 3_000_000


class Boom(Exception):
    """The failure of the memory tests; user-defined, so it can be weakly referenced."""


def _failing_at(n: int) -> Callable[[Any], Any]:
    """A function that passes items through and raises ``Boom`` at its ``n``-th call (from 0)."""
    lock = threading.Lock()
    calls = [0]

    def fail_at(x: Any) -> Any:
        with lock:
            k = calls[0]
            calls[0] += 1
        if k == n:
            raise Boom(f"call {k}")
        return x

    return fail_at


def _big_items() -> Iterator[bytes]:
    return (bytes(_ITEM_BYTES) for _ in range(10_000))


def _kind_thread_map(pool: ThreadPoolExecutor) -> Pipeline[Any]:
    return Pipeline.from_iter(_big_items()).map(_failing_at(100))


def _kind_flat_map(pool: ThreadPoolExecutor) -> Pipeline[Any]:
    fail = _failing_at(100)
    return Pipeline.from_iter(_big_items()).flat_map(lambda x: [fail(x)], workers=2)


def _kind_coroutine_map(pool: ThreadPoolExecutor) -> Pipeline[Any]:
    fail = _failing_at(100)

    async def fetch(x: bytes) -> bytes:
        await asyncio.sleep(0)
        return fail(x)  # type: ignore[no-any-return]

    return Pipeline.from_iter(_big_items()).map(fetch, workers=4)


def _kind_executor_map(pool: ThreadPoolExecutor) -> Pipeline[Any]:
    return Pipeline.from_iter(_big_items()).map(_failing_at(100), executor=pool, workers=2)


def _kind_pipe(pool: ThreadPoolExecutor) -> Pipeline[Any]:
    def fail_at_100(items: Iterator[bytes]) -> Iterator[bytes]:
        for i, x in enumerate(items):
            if i == 100:
                raise Boom("pipe")
            yield x

    return Pipeline.from_iter(_big_items()).pipe(fail_at_100)


def _kind_batch(pool: ThreadPoolExecutor) -> Pipeline[Any]:
    # The batch stage holds a partial batch and its buffers when the stage after it fails.
    return Pipeline.from_iter(_big_items()).batch(8).map(_failing_at(12))


_KINDS = {
    "thread_map": _kind_thread_map,
    "flat_map": _kind_flat_map,
    "coroutine_map": _kind_coroutine_map,
    "executor_map": _kind_executor_map,
    "pipe": _kind_pipe,
    "batch": _kind_batch,
}


def _consume_to_list(pipeline: Pipeline[Any], refs: list[weakref.ref[Any]]) -> None:
    try:
        pipeline.to_list()
    except Boom as exc:
        refs.append(weakref.ref(exc))
        del exc
    else:
        pytest.fail("the run did not fail")


def _consume_iterate_then_join(pipeline: Pipeline[Any], refs: list[weakref.ref[Any]]) -> None:
    run = pipeline.start()
    refs.append(weakref.ref(run))
    try:
        for _ in run:
            pass
    except Boom as exc:
        refs.append(weakref.ref(exc))
        del exc
    else:
        pytest.fail("the run did not fail")
    try:
        run.join(timeout=_JOIN)
    except Boom as exc:
        refs.append(weakref.ref(exc))
        del exc
    else:
        pytest.fail("join() did not raise the run's failure")
    del run


def _consume_with_block(pipeline: Pipeline[Any], refs: list[weakref.ref[Any]]) -> None:
    try:
        with pipeline.start() as run:
            refs.append(weakref.ref(run))
            for _ in run:
                pass
    except Boom as exc:
        refs.append(weakref.ref(exc))
        del exc
    else:
        pytest.fail("the run did not fail")
    del run


_CONSUMERS = {
    "to_list": _consume_to_list,
    "iterate_then_join": _consume_iterate_then_join,
    "with_block": _consume_with_block,
}


@pytest.mark.parametrize("consume", sorted(_CONSUMERS))
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_a_failed_run_and_its_exception_are_freed_by_reference_counting(kind: str, consume: str) -> None:
    """Failed runs over 100 kB items: once the caller drops the run and the exception, nothing
    of them stays allocated, with the cyclic garbage collector off (reference counting alone)."""
    build, consumer = _KINDS[kind], _CONSUMERS[consume]
    before = set(_run_threads())
    with ThreadPoolExecutor(2, thread_name_prefix="memory-executor") as pool:
        gc.collect()
        tracemalloc.start()
        refs: list[weakref.ref[Any]] = []
        try:
            gc.disable()
            # One run first, so that what a first run allocates once (imports, caches) counts as
            # the baseline and not as a leak.
            consumer(build(pool), refs)
            assert not _threads_gone(before), "a failed run's threads did not exit"
            baseline = tracemalloc.get_traced_memory()[0]
            refs.clear()
            for _ in range(_FAILED_RUNS):
                consumer(build(pool), refs)
            alive = _threads_released(before, pool)
            assert not alive, f"a failed run's threads did not exit: {alive}"
            held = tracemalloc.get_traced_memory()[0] - baseline
            kept = [ref() for ref in refs if ref() is not None]
            assert held < _SLACK_BYTES and not kept, (
                f"{_FAILED_RUNS} failed runs ({kind}, {consume}) still hold {held / 1e6:.1f} MB "
                f"({held / _FAILED_RUNS / _ITEM_BYTES:.0f} items of 100 kB per run) after the "
                f"caller dropped them; objects not freed by reference counting: "
                f"{sorted({type(k).__name__ for k in kept})}"
            )
            del kept
        finally:
            gc.enable()
            tracemalloc.stop()
            gc.collect()


def test_a_dropped_failed_run_is_dead_without_gc_collect() -> None:
    """``del run, exc`` frees the Run at once: a weak reference to it is dead, no gc.collect()."""
    before = set(_run_threads())
    gc.collect()
    gc.disable()
    try:
        run = Pipeline.from_iter(_big_items()).map(_failing_at(100)).start()
        ref = weakref.ref(run)
        try:
            for _ in run:
                pass
        except Boom as exc:
            failure = exc
        else:
            pytest.fail("the run did not fail")
        with pytest.raises(Boom):
            run.join(timeout=_JOIN)
        exc_ref = weakref.ref(failure)
        # join() returned once every thread did its accounting; let them return from their frames.
        assert not _threads_released(before)
        del run, failure
        assert ref() is None, "the failed Run is still alive after `del run, exc` (a reference cycle)"
        assert exc_ref() is None, "the run's exception is still alive after `del run, exc`"
    finally:
        gc.enable()
        gc.collect()


# ============================================================================================
# 2. take() or an early-returning pipe() leaves a from_queue reader running
# ============================================================================================

STOP = object()


def _first_two(items: Iterator[Any]) -> Iterator[Any]:
    """An early-returning ``pipe()``: the first two items, then return."""
    for i, x in enumerate(items):
        yield x
        if i == 1:
            return


def _drained(q: queue.Queue[Any]) -> Callable[[Any], Any]:
    """A map function that holds item 2 until the reader has taken every item from ``q``.

    So the cut comes while the reader waits on an empty queue, as in the issue (otherwise the
    reader may still be about to take item 3, and a reader left behind would exit on it).
    """

    def hold_until_drained(x: Any) -> Any:
        if x == 2:
            assert _wait_for(q.empty), "the queue reader never took item 3"
        return x

    return hold_until_drained


_CUTS: dict[str, Callable[[Pipeline[Any], queue.Queue[Any]], Pipeline[Any]]] = {
    "take": lambda p, q: p.map(_drained(q)).take(2),
    "pipe_returns": lambda p, q: p.map(_drained(q)).pipe(_first_two),
    "map_workers_2_then_take": lambda p, q: p.map(_drained(q), workers=2).take(2),
    "take_then_map": lambda p, q: p.map(_drained(q)).take(2).map(lambda x: x),
}

_QUEUE_SOURCES: dict[str, Callable[[queue.Queue[Any]], Pipeline[Any]]] = {
    "from_queue": lambda q: Pipeline.from_queue(q, sentinel=STOP),
    "merge_of_from_queue": lambda q: Pipeline.merge(Pipeline.from_queue(q, sentinel=STOP)),
    "merge_of_two": lambda q: Pipeline.merge(
        Pipeline.from_queue(q, sentinel=STOP), Pipeline.from_iter([])
    ),
}


@pytest.mark.parametrize("cut", sorted(_CUTS))
@pytest.mark.parametrize("source", sorted(_QUEUE_SOURCES))
def test_a_cut_off_queue_reader_stops_and_leaves_the_queue_to_the_next_run(source: str, cut: str) -> None:
    """The issue's regression: after ``take(2)`` (or a ``pipe()`` that returns) over 1, 2, 3 from a
    queue, the run ends (join returns, no thread left) and the next run of a reader of the same
    queue gets every item put after it: [10, 11, 12], not [11, 12]."""
    q: queue.Queue[Any] = queue.Queue()
    before = set(_run_threads())
    for x in (1, 2, 3):
        q.put(x)
    run = _CUTS[cut](_QUEUE_SOURCES[source](q), q).start()
    try:
        with _watchdog(run):
            got = list(run)
        assert sorted(got) == [1, 2], got
        try:
            run.join(timeout=_JOIN)
        except TimeoutError:
            pytest.fail(f"join(timeout={_JOIN}) timed out: the cut-off queue reader is still running")
        alive = _threads_gone(before, 1.0)
        assert not alive, f"threads outlived the joined run: {alive}"
        for later in (10, 11, 12, STOP):
            q.put(later)
        follow = Pipeline.from_queue(q, sentinel=STOP).start()
        with _watchdog(follow, _JOIN):
            assert list(follow) == [10, 11, 12], "the first run's reader took an item it had no use for"
    finally:
        # Release a reader left waiting on the queue, so that a failure does not leak its thread.
        q.put(STOP)
        q.put(STOP)


@pytest.mark.parametrize("source", sorted(_QUEUE_SOURCES))
def test_to_list_of_a_take_on_a_queue_leaves_later_items_to_the_next_run(source: str) -> None:
    """The issue's sequence, through ``to_list()``: ``p.take(2).to_list()`` on 1, 2, 3 (item 2 held
    until the reader has taken 3), then 10, 11, 12 and the sentinel; ``p.to_list()`` returns
    [10, 11, 12] (today [11, 12]), and no thread of either run is left."""
    q: queue.Queue[Any] = queue.Queue()
    before = set(_run_threads())
    p = _QUEUE_SOURCES[source](q)
    for x in (1, 2, 3):
        q.put(x)
    try:
        assert sorted(p.map(_drained(q)).take(2).to_list()) == [1, 2]
        for later in (10, 11, 12, STOP):
            q.put(later)
        again = p.start()
        with _watchdog(again, _JOIN):
            got = sorted(again)
        assert got == [10, 11, 12], "the take run's reader took an item put after it had ended"
        alive = _threads_gone(before)
        assert not alive, f"threads left running after both runs ended: {alive}"
    finally:
        # Release a reader left waiting on the queue, so that a failure does not leak its thread.
        q.put(STOP)
        q.put(STOP)


# ============================================================================================
# 3. A stage raising StopIteration (StopAsyncIteration) silently truncates the output
# ============================================================================================

_STOP_ITEMS = [f"item-{i}" for i in range(10)]
_STOP_AT = "item-3"


def _stopping_kinds(planted: BaseException, pool: ThreadPoolExecutor) -> dict[str, Pipeline[Any]]:
    def fn(x: str) -> str:
        if x == _STOP_AT:
            raise planted
        return x

    async def afn(x: str) -> str:
        await asyncio.sleep(0)
        if x == _STOP_AT:
            raise planted
        return x

    async def aflat(x: str) -> list[str]:
        await asyncio.sleep(0)
        if x == _STOP_AT:
            raise planted
        return [x]

    src = Pipeline.from_iter(_STOP_ITEMS)
    return {
        "map": src.map(fn, name="stopper"),
        "map_workers_3_unordered": src.map(fn, workers=3, ordered=False, name="stopper"),
        "filter": src.filter(fn, name="stopper"),
        "each": src.each(fn, name="stopper"),
        "flat_map": src.flat_map(lambda x: [fn(x)], workers=2, name="stopper"),
        "map_on_error_callable": src.map(fn, on_error=lambda e, x: fn(x), name="stopper"),
        "executor_map": src.map(fn, executor=pool, workers=2, name="stopper"),
        "coroutine_map": src.map(afn, workers=4, name="stopper"),
        "coroutine_flat_map": src.flat_map(aflat, workers=2, name="stopper"),
    }


_ASYNC_STOP_KINDS = {"coroutine_map", "coroutine_flat_map"}


def _stop_iterate_run(p: Pipeline[Any], runs: list[tp.Run[Any]]) -> None:
    run = p.start()
    runs.append(run)
    with _watchdog(run):
        for _ in run:
            pass


def _stop_iterate_pipeline(p: Pipeline[Any], runs: list[tp.Run[Any]]) -> None:
    for _ in p:
        pass


def _stop_to_list(p: Pipeline[Any], runs: list[tp.Run[Any]]) -> None:
    p.to_list()


def _stop_run(p: Pipeline[Any], runs: list[tp.Run[Any]]) -> None:
    p.run()


def _stop_join(p: Pipeline[Any], runs: list[tp.Run[Any]]) -> None:
    run = p.start()  # ten items: they fit in the buffers, so join() alone sees the run end
    runs.append(run)
    run.join(timeout=_JOIN)


def _stop_async_for_run(p: Pipeline[Any], runs: list[tp.Run[Any]]) -> None:
    run = p.start()
    runs.append(run)

    async def main() -> None:
        async for _ in run:
            pass

    with _watchdog(run):
        asyncio.run(main())


def _stop_async_for_pipeline(p: Pipeline[Any], runs: list[tp.Run[Any]]) -> None:
    async def main() -> None:
        async for _ in p:
            pass

    asyncio.run(main())


def _stop_with_block(p: Pipeline[Any], runs: list[tp.Run[Any]]) -> None:
    with p.start() as run, _watchdog(run):
        runs.append(run)
        for _ in run:
            pass


_STOP_PATHS: dict[str, Callable[[Pipeline[Any], list[tp.Run[Any]]], None]] = {
    "iterate_run": _stop_iterate_run,
    "iterate_pipeline": _stop_iterate_pipeline,
    "to_list": _stop_to_list,
    "run": _stop_run,
    "join": _stop_join,
    "async_for_run": _stop_async_for_run,
    "async_for_pipeline": _stop_async_for_pipeline,
    "with_block": _stop_with_block,
}


@pytest.mark.parametrize("path", sorted(_STOP_PATHS))
@pytest.mark.parametrize(
    "kind",
    sorted(_stopping_kinds(StopIteration(), None)),  # type: ignore[arg-type]
)
def test_a_stage_raising_stop_iteration_fails_the_run_on_every_path(kind: str, path: str) -> None:
    """A stage that raises StopIteration (StopAsyncIteration in a coroutine stage) does not end the
    output quietly: every way of consuming the run raises RuntimeError naming the stage and the
    item, with the original as ``__cause__``; ``run.exception`` is the original itself."""
    planted: BaseException = (
        StopAsyncIteration("planted") if kind in _ASYNC_STOP_KINDS else StopIteration("planted")
    )
    with ThreadPoolExecutor(2, thread_name_prefix="stop-executor") as pool:
        pipeline = _stopping_kinds(planted, pool)[kind]
        runs: list[tp.Run[Any]] = []
        try:
            _STOP_PATHS[path](pipeline, runs)
        except RuntimeError as exc:
            message = str(exc)
            assert exc.__cause__ is planted, f"__cause__ is {exc.__cause__!r}, not the stage's exception"
            assert "stopper" in message and _STOP_AT in message, (
                f"the RuntimeError does not name the stage and the item: {message!r}"
            )
        except BaseException as exc:  # noqa: BLE001
            pytest.fail(f"{path} raised {exc!r}, not a RuntimeError from {planted!r}")
        else:
            pytest.fail(f"{path} ended quietly after the stage raised {planted!r}: truncated output")
        for run in runs:
            assert run.exception is planted, f"run.exception is {run.exception!r}"


# ============================================================================================
# 4. Cancel does not stop a flat_map draining an endless per-item generator
# ============================================================================================

# A defect's endless drain ends here by itself (memory stays bounded and the test ends), far above
# the few thousand yields a cancel may let through.
_ENDLESS_CAP = 1_000_000
# If no output reaches the caller after this many yields, the stage is collecting whole iterables:
# the test then cancels from another thread (and fails).
_NO_OUTPUT_YIELDS = 200_000
_YIELDS_AFTER_CANCEL = 10_000


class _YieldCounter:
    """Counts the yields of every endless generator of a test; ``kill`` ends them all."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.kill = threading.Event()
        self.plenty = threading.Event()

    def tick(self) -> bool:
        """Count one yield; whether the generator should go on."""
        with self.lock:
            self.count += 1
            n = self.count
        if n >= _NO_OUTPUT_YIELDS:
            self.plenty.set()
        return n < _ENDLESS_CAP and not self.kill.is_set()


_FLAT_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "on_error": {"on_error": "skip"},
    "retries": {"retries": 2, "retry_delay": 0.001},
    "rate": {"rate": 10_000},
    "resource": {"resource": object},
}


def _check_cancel_stops_the_drain(pipeline: Pipeline[Any], counter: _YieldCounter) -> None:
    run = pipeline.start()

    def fallback() -> None:
        # Only when no output ever comes: then the caller is blocked in next() and cannot cancel.
        if counter.plenty.wait(30) and not counter.kill.is_set():
            run.cancel()

    rescuer = threading.Thread(target=fallback, name="defects-fallback-cancel")
    rescuer.start()
    try:
        it = iter(run)
        seen = 0
        for _ in it:
            seen += 1
            if seen == 3:
                break
        run.cancel()
        at_cancel = counter.count
        try:
            run.join(timeout=_JOIN)
            joined = True
        except TimeoutError:
            joined = False
        after_join = counter.count
        threading.Event().wait(0.05)  # gives a drain that outlived join() time to show; decides nothing
        later = counter.count
        del it
        problems = []
        if seen < 3:
            problems.append(
                f"no output reached the caller in {at_cancel:,} yields (a call collects a whole iterable)"
            )
        if not joined:
            problems.append(f"join(timeout={_JOIN}) timed out after cancel()")
        if after_join - at_cancel >= _YIELDS_AFTER_CANCEL:
            problems.append(f"{after_join - at_cancel:,} yields after cancel() returned")
        if later != after_join:
            problems.append(f"{later - after_join:,} yields after join() returned")
        assert not problems, "; ".join(problems)
    finally:
        counter.kill.set()
        counter.plenty.set()
        rescuer.join()
        run.cancel()


@pytest.mark.parametrize("option", sorted(_FLAT_OPTIONS))
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("ordered", [True, False])
def test_cancel_stops_a_flat_map_draining_an_endless_generator(
    ordered: bool, workers: int, option: str
) -> None:
    """Each item's generator is endless. Once the caller has a few outputs it cancels: join()
    returns, and the generators stop at once (a few yields at most, none after join())."""
    counter = _YieldCounter()
    options = _FLAT_OPTIONS[option]

    def endless(x: int, *resource: Any) -> Iterator[int]:
        while counter.tick():
            yield x

    pipeline = Pipeline.from_iter(range(100)).flat_map(
        endless, workers=workers, ordered=ordered, **options
    )
    _check_cancel_stops_the_drain(pipeline, counter)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("ordered", [True, False])
def test_cancel_stops_an_async_generator_flat_map(ordered: bool, workers: int) -> None:
    """The same with an async generator function: its outputs stream, and cancel stops it."""
    counter = _YieldCounter()

    async def endless(x: int) -> Any:
        n = 0
        while counter.tick():
            n += 1
            if n % 100 == 0:
                await asyncio.sleep(0)  # where a cancel can reach it
            yield x

    pipeline = Pipeline.from_iter(range(100)).flat_map(endless, workers=workers, ordered=ordered)
    _check_cancel_stops_the_drain(pipeline, counter)


# ============================================================================================
# 5. buffer_bound() is exceeded
# ============================================================================================


def _fan(tracker: Tracker, k: int) -> Callable[..., Iterator[Tracked]]:
    """A flat_map function yielding ``k`` new items per item."""

    def fan(x: Tracked, *resource: Any) -> Iterator[Tracked]:
        for _ in range(k):
            yield Tracked(tracker, x.value)

    return fan


def _afan(tracker: Tracker, k: int) -> Callable[[Tracked], Any]:
    """An async generator function yielding ``k`` new items per item."""

    async def afan(x: Tracked) -> Any:
        for _ in range(k):
            await asyncio.sleep(0)
            yield Tracked(tracker, x.value)

    return afan


def _afan_list(tracker: Tracker, k: int) -> Callable[[Tracked], Any]:
    """An ``async def`` flat_map function returning a lazy iterable of ``k`` new items per item.

    Lazy, because a list the function returns is made whole by the function before the library
    sees it (as for a thread ``flat_map``): the bound counts outputs as they are produced (see
    README, Limitations).
    """

    async def afan_list(x: Tracked) -> Iterator[Tracked]:
        await asyncio.sleep(0)
        return (Tracked(tracker, x.value) for _ in range(k))

    return afan_list


def _same(x: Tracked) -> Tracked:
    return x


_BOUND_CASES: dict[str, Callable[[Tracker], Pipeline[Any]]] = {
    "flat_map_on_error": lambda t: Pipeline.from_iter(tracked_source(t, 40)).flat_map(
        _fan(t, 500), on_error="skip"
    ),
    "flat_map_retries": lambda t: Pipeline.from_iter(tracked_source(t, 40)).flat_map(
        _fan(t, 500), retries=1, retry_delay=0.001
    ),
    "flat_map_resource": lambda t: Pipeline.from_iter(tracked_source(t, 40)).flat_map(
        _fan(t, 500), resource=object
    ),
    "flat_map_ordered_workers_2": lambda t: Pipeline.from_iter(tracked_source(t, 200)).flat_map(
        _fan(t, 50), workers=2
    ),
    "async_def_flat_map": lambda t: Pipeline.from_iter(tracked_source(t, 40)).flat_map(
        _afan_list(t, 500)
    ),
    "async_generator_flat_map": lambda t: Pipeline.from_iter(tracked_source(t, 40)).flat_map(
        _afan(t, 500)
    ),
    "merge_of_4": lambda t: Pipeline.merge(
        *[Pipeline.from_iter(tracked_source(t, 300)).map(_same) for _ in range(4)]
    ),
    # A batch of n items holds n items: the bound counts what the run holds, not how it is packed.
    "batch_then_flatten": lambda t: Pipeline.from_iter(tracked_source(t, 1000)).batch(5).flatten(),
}


@pytest.mark.parametrize("case", sorted(_BOUND_CASES))
def test_a_run_holds_no_more_items_than_buffer_bound(case: str) -> None:
    """Items count themselves (one item, one live object; a flat_map's outputs are new objects).
    With the caller holding back until the buffers fill, the most live at once is at most
    ``buffer_bound()``, plus the one in the caller's hand."""
    tracker = Tracker()
    pipeline = _BOUND_CASES[case](tracker)
    problem = check_bound(pipeline, tracker, join_timeout=_JOIN)
    assert problem is None, problem


# ============================================================================================
# 6. take() never cancels upstream coroutines or executor calls
# ============================================================================================


class _Hanging:
    """Calls after the first ``fast`` never return until released; records starts and cancels."""

    def __init__(self, fast: int = 3) -> None:
        self.fast = fast
        self.lock = threading.Lock()
        self.started: set[int] = set()
        self.cancelled: set[int] = set()
        self.released = threading.Event()  # the test's own way out, for a defect's cleanup
        self.started_after_release: list[int] = []

    def note_start(self, x: int) -> None:
        with self.lock:
            self.started.add(x)
            if self.released.is_set():
                self.started_after_release.append(x)

    async def fetch(self, x: int) -> int:
        self.note_start(x)
        if x < self.fast:
            return x
        try:
            while not self.released.is_set():  # noqa: ASYNC110  # a threading.Event, in slices
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            with self.lock:
                self.cancelled.add(x)
            raise
        return x

    def call(self, x: int) -> int:
        self.note_start(x)
        if x >= self.fast:
            self.released.wait(30)
        return x


def _cut_run_cleanup(run: tp.Run[Any], hanging: _Hanging) -> None:
    hanging.released.set()
    run.cancel()
    with contextlib.suppress(BaseException):  # cleanup only: the test reports on its own
        run.join(timeout=10)


@pytest.mark.parametrize("cancel_after_end", [False, True])
def test_take_cancels_the_coroutines_it_cut_off(cancel_after_end: bool) -> None:
    """``map(async_fetch, workers=8).take(3)``, calls after the first three awaiting forever: the
    caller gets the three, the pending coroutines see CancelledError, every thread exits. With
    ``cancel_after_end``, the caller also calls ``run.cancel()`` once it has the end: that must
    still cancel whatever the cut-off segment is running (today a no-op)."""
    hanging = _Hanging()
    before = set(_run_threads())
    run = Pipeline.from_iter(range(1000)).map(hanging.fetch, workers=8).take(3).start()
    try:
        with _watchdog(run):
            got = list(run)
        assert got == [0, 1, 2]
        if cancel_after_end:
            run.cancel()
        alive = _threads_gone(before)
        pending = hanging.started - set(range(3))
        assert not alive, f"threads still running {_PROMPT} s after take(3) ended the run: {alive}"
        assert pending, "no call was in flight when take() cut the stage off"
        with hanging.lock:
            missed = pending - hanging.cancelled
        assert not missed, f"coroutines cut off by take() and never cancelled: {sorted(missed)}"
    finally:
        _cut_run_cleanup(run, hanging)


@pytest.mark.parametrize("cancel_after_end", [False, True])
def test_take_cancels_the_executor_calls_it_cut_off(cancel_after_end: bool) -> None:
    """An executor stage cut off by take(3): its calls not yet started are cancelled, so none
    starts once the running ones are released; the run's threads exit without waiting for them."""
    hanging = _Hanging()
    before = set(_run_threads())
    with ThreadPoolExecutor(4, thread_name_prefix="cut-executor") as pool:
        run = (
            Pipeline.from_iter(range(1000)).map(hanging.call, executor=pool, workers=8).take(3).start()
        )
        try:
            with _watchdog(run):
                got = list(run)
            assert got == [0, 1, 2]
            if cancel_after_end:
                run.cancel()
            alive = _threads_gone(before)
        finally:
            _cut_run_cleanup(run, hanging)
        # Leaving the block waits for the pool: once released, it runs whatever is still queued.
    with hanging.lock:
        late = sorted(hanging.started_after_release)
    problems = []
    if alive:
        problems.append(f"threads still running {_PROMPT} s after take(3) ended the run: {alive}")
    if late:
        problems.append(f"calls started after the run had ended (futures never cancelled): {late}")
    assert not problems, "; ".join(problems)


# ============================================================================================
# 9. take() lets upstream calls start after the caller has the end
# ============================================================================================

# Today about one run in four shows the race (one in fifty for coroutines); a run takes ~3 ms.
_TAKE_REPEATS = 100


@pytest.mark.parametrize("source_kind", ["iterator", "in_memory"])
@pytest.mark.parametrize("upstream", ["thread_map", "coroutine_map"])
def test_no_upstream_call_starts_after_take_delivered_the_end(upstream: str, source_kind: str) -> None:
    """An infinite source, a cheap upstream stage (4 threads, or 8 coroutines), take(5): once the
    caller has the end, no upstream call starts but for one per worker whose check came before the
    cut (repeated, since it is a race). The source is an iterator (fed an item at a time) or a
    range (fed a buffer's worth at a time, so workers hold batches of several items).

    A worker reads the stop flag before each call, so one preempted between its check and the call
    may enter the function after the caller has the end (docs/concepts.md): at most one such call
    per worker, never a second (a worker that went on with the rest of its batch, or took more,
    would make several).
    """
    workers = 4 if upstream == "thread_map" else 8
    late: list[str] = []
    for attempt in range(_TAKE_REPEATS):
        starts: list[tuple[float, int]] = []

        def cheap(x: int, starts: list[tuple[float, int]] = starts) -> int:
            starts.append((time.monotonic(), threading.get_ident()))  # list.append is atomic
            time.sleep(0)  # lets other threads run between calls: widens the race, decides nothing
            return x

        async def acheap(x: int, starts: list[tuple[float, int]] = starts) -> int:
            task = asyncio.current_task()
            starts.append((time.monotonic(), id(task)))
            await asyncio.sleep(0)
            return x

        items = range(10**9)
        source = Pipeline.from_iter(iter(items) if source_kind == "iterator" else items)
        if upstream == "thread_map":
            pipeline = source.map(cheap, workers=workers, ordered=False)
        else:
            pipeline = source.map(acheap, workers=workers, ordered=False)
        run = pipeline.take(5).start()
        with _watchdog(run):
            got = list(run)
            ended = time.monotonic()
        assert len(got) == 5
        run.join(timeout=_JOIN)
        after = collections.Counter(who for t, who in starts if t > ended)
        if after.total() > workers or any(n > 1 for n in after.values()):
            late.append(f"run {attempt}: {after.total()} calls started after the end, {dict(after)} by worker")
    assert not late, "upstream calls started after take(5) delivered the end: " + "; ".join(late)


# ============================================================================================
# 10. Breaking out of a loop over a run you hold does not cancel it
# ============================================================================================


def _held_run() -> tp.Run[int]:
    return Pipeline.from_iter(range(10**6)).map(lambda x: x, workers=2).start()


def _leave_by_break(run: tp.Run[int]) -> None:
    for _ in run:
        break


def _leave_by_exception(run: tp.Run[int]) -> None:
    with pytest.raises(ZeroDivisionError):
        for _ in run:
            1 / 0  # noqa: B018


def _leave_by_dropping_the_iterator(run: tp.Run[int]) -> None:
    it = iter(run)
    next(it)
    del it


def _leave_async_for_by_break(run: tp.Run[int]) -> None:
    async def main() -> None:
        async for _ in run:
            break

    asyncio.run(main())


_LEAVES = {
    "break": _leave_by_break,
    "exception_in_body": _leave_by_exception,
    "drop_iterator": _leave_by_dropping_the_iterator,
    "async_for_break": _leave_async_for_by_break,
}


@pytest.mark.parametrize("leave", sorted(_LEAVES))
def test_leaving_a_loop_over_a_held_run_cancels_it(leave: str) -> None:
    """``run = ...start(); for x in run: break`` (or an exception in the body, a dropped iterator,
    ``async for`` with break): the run is cancelled at once, though the caller still holds it
    (no garbage collection needed), and join() returns."""
    gc.disable()
    run = _held_run()
    try:
        with _watchdog(run):
            _LEAVES[leave](run)
            cancelled = _wait_for(lambda: run.cancelled, _PROMPT)
        assert cancelled, f"the run is not cancelled {_PROMPT} s after the loop was left ({leave})"
        run.join(timeout=_JOIN)
    finally:
        gc.enable()
        run.cancel()


def test_with_block_joins_promptly_after_break() -> None:
    """``with pipeline.start() as run: for x in run: break`` leaves the block promptly."""
    started = time.monotonic()
    with Pipeline.from_iter(range(10**6)).map(lambda x: x, workers=2).start() as run, _watchdog(run):
        for _ in run:
            break
    assert time.monotonic() - started < _PROMPT
    assert run.done


# ============================================================================================
# 7. A failure raised while a cancelled run stops becomes run.exception
# ============================================================================================


class _Late:
    """A call that blocks until released, then raises: a failure that arrives after a cancel."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.error = ValueError("raised after the run was cancelled")

    def call(self, x: int, *resource: Any) -> int:
        if x == 0:
            self.entered.set()
            self.release.wait(30)
            raise self.error
        return x

    async def acall(self, x: int) -> int:
        if x == 0:
            self.entered.set()
            try:
                while not self.release.is_set():  # noqa: ASYNC110  # a threading.Event
                    await asyncio.sleep(0.005)
            except asyncio.CancelledError:
                raise self.error from None  # the coroutine turns its cancel into a failure
            raise self.error
        return x

    def pipe(self, items: Iterator[int]) -> Iterator[int]:
        for x in items:
            yield self.call(x)

    def source(self) -> Iterator[int]:
        yield 1
        self.entered.set()
        self.release.wait(30)
        raise self.error


def _late_kinds(late: _Late, pool: ThreadPoolExecutor) -> dict[str, Pipeline[Any]]:
    src = Pipeline.from_iter(range(100))
    return {
        "thread_map": src.map(late.call),
        "thread_map_workers_3": src.map(late.call, workers=3),
        "flat_map": src.flat_map(lambda x: [late.call(x)]),
        "map_with_retries": src.map(late.call, retries=1, retry_delay=0.001, retry_on=KeyError),
        "map_with_resource": src.map(late.call, resource=object),
        "executor_map": src.map(late.call, executor=pool, workers=2),
        "coroutine_map": src.map(late.acall, workers=4),
        "pipe": src.pipe(late.pipe),
        "source": Pipeline.from_iter(late.source()).map(lambda x: x),
    }


@pytest.mark.parametrize("kind", sorted(_late_kinds(_Late(), None)))  # type: ignore[arg-type]
def test_a_failure_after_cancel_is_not_the_runs_exception(kind: str) -> None:
    """A call blocked on an event; the caller cancels; then the call raises. The run was
    cancelled, not failed: ``run.exception`` is None and join() raises nothing."""
    late = _Late()
    with ThreadPoolExecutor(2, thread_name_prefix="late-executor") as pool:
        run = _late_kinds(late, pool)[kind].start()
        try:
            assert late.entered.wait(_PROMPT)
            run.cancel()
            late.release.set()
            try:
                run.join(timeout=_JOIN)
            except ValueError as exc:
                assert exc is not late.error, "join() raised the failure that came after cancel()"
                raise
            assert run.cancelled
            assert run.exception is None, f"run.exception is {run.exception!r} after a cancel"
        finally:
            late.release.set()
            run.cancel()


class _Wrapping:
    """A user's pipe() that wraps every failure it sees, as careful code does; records them."""

    def __init__(self) -> None:
        self.caught: list[BaseException] = []

    def __call__(self, items: Iterator[int]) -> Iterator[int]:
        try:
            for x in items:  # noqa: UP028  # written as users write it
                yield x
        except Exception as e:
            self.caught.append(e)
            raise RuntimeError("wrapped") from e


def _wait_still(read: Callable[[], int], cap: float = 1.0) -> None:
    """Wait, at most ``cap`` seconds, until ``read()`` stops changing: the run has filled its
    buffers and waits. Only makes the moment likely; nothing is decided by it."""
    deadline = time.monotonic() + cap
    pause = threading.Event()
    last, stable = -1, 0
    while stable < 5 and time.monotonic() < deadline:
        pause.wait(0.002)
        now = read()
        stable = stable + 1 if now == last else 0
        last = now


def _stop_a_wrapping_pipe(shape: str) -> tuple[tp.Run[Any], _Wrapping]:
    pulled = [0]

    def counted() -> Iterator[int]:
        for x in range(10**6):
            pulled[0] += 1
            yield x

    wrapping = _Wrapping()
    source = Pipeline.from_iter(counted()).backpressure(1)  # the pipe waits for input often
    # Room for more than one output after the pipe: it then hands its outputs on from inside its
    # input iterator, that is, inside the user's generator, where a full buffer blocks it.
    if shape == "pipe_then_take":

        def hold_the_fifth(x: int) -> int:
            if x == 4:  # let the pipe fill its output buffer and block, then complete the take
                _wait_still(lambda: pulled[0])
            return x

        run = source.pipe(wrapping).backpressure(2).map(hold_the_fifth).take(5).start()
        with _watchdog(run):
            assert list(run) == [0, 1, 2, 3, 4]
        return run, wrapping
    p = source.pipe(wrapping).backpressure(4)
    if shape == "pipe_map_then_break":
        p = p.map(lambda x: x, workers=2)
    run = p.start()
    with _watchdog(run):
        for x in run:
            if x == 50:
                break
        _wait_still(lambda: pulled[0])  # the pipe is now blocked handing on an output
    run.cancel()  # explicit: leaving a held run's loop is defect 10's business
    return run, wrapping


@pytest.mark.parametrize("shape", ["pipe_then_break", "pipe_map_then_break", "pipe_then_take"])
def test_an_except_exception_in_a_pipe_does_not_turn_a_clean_stop_into_a_failure(shape: str) -> None:
    """The internal stop signal must not be an ``Exception``: a ``pipe()`` generator that wraps
    ``Exception``s must not make a ``break`` (or a take() downstream) a failed run, nor see the
    signal at all. (A few attempts: where the pipe is when it is stopped is a race.)"""
    for _ in range(5):
        run, wrapping = _stop_a_wrapping_pipe(shape)
        try:
            run.join(timeout=_JOIN)
        except RuntimeError as exc:
            pytest.fail(f"a clean stop became a failure: join() raised {exc!r} from {exc.__cause__!r}")
        assert run.exception is None, f"run.exception is {run.exception!r} ({run.exception.__cause__!r})"
        assert not wrapping.caught, f"the user's `except Exception` caught {wrapping.caught!r}"


# ============================================================================================
# 8. os.fork() during a live run: a child that leaves its loop deadlocks
# ============================================================================================

_FORKS = 20

_FORK_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time, warnings

    # Forking a process that has threads: the point of this script (3.12+ warns about it).
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    import threadpipe as tp

    how, leave = sys.argv[1], sys.argv[2]
    CHILDREN = int(sys.argv[3])
    EVERY = 40
    # Threads hand the interpreter lock on constantly, so that at a fork some worker is likely to
    # be inside a lock of the run (a channel's, the run's): the child inherits it held.
    sys.setswitchinterval(1e-6)

    def work(x):
        return x

    pipeline = (tp.Pipeline.from_iter(range(CHILDREN * EVERY + 2000))
                .map(work, workers=4, ordered=False)
                .map(work, workers=2))
    children = []
    is_child = False

    def body(i):
        # Fork now and then; in the child, say how to leave the loop.
        global is_child
        if i % EVERY == 0 and len(children) < CHILDREN:
            pid = os.fork()
            if pid == 0:
                is_child = True
                if leave == "exit":
                    sys.exit(0)  # leaves the loop by SystemExit, then interpreter exit
                return True  # break: leave the loop, then fall off the end of the script
            children.append(pid)
        return False

    if how == "held_run":
        run = pipeline.start()
        for i, x in enumerate(run):
            if body(i):
                break
    elif how == "pipeline":
        for i, x in enumerate(pipeline):
            if body(i):
                break
    else:  # "with_block"
        with pipeline.start() as run:
            for i, x in enumerate(run):
                if body(i):
                    break

    if not is_child:
        # The parent: every child must exit on its own within a few seconds.
        deadline = time.monotonic() + 10
        hung, codes = [], []
        pending = list(children)
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    pending.remove(pid)
                    codes.append(os.waitstatus_to_exitcode(status))
            time.sleep(0.01)
        for pid in pending:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            hung.append(pid)
        print(json.dumps({"children": len(children), "hung": len(hung), "codes": sorted(set(codes))}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.fork in a threaded process: Linux only")
@pytest.mark.parametrize("leave", ["break", "exit"])
@pytest.mark.parametrize("how", ["held_run", "pipeline", "with_block"])
def test_a_child_forked_during_a_run_exits_when_it_leaves_the_loop(
    how: str, leave: str, tmp_path: Any
) -> None:
    """A parent iterating a run (a run it holds, a pipeline, a with-block) forks 20 children in
    its loop body; each leaves the loop (break, or sys.exit) and must exit within seconds, not
    deadlock on a lock that a thread which does not exist in the child held, nor wait for such a
    thread. The parent then finishes its run normally."""
    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_SCRIPT)
    try:
        done = subprocess.run(
            [sys.executable, str(script), how, leave, str(_FORKS)],
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
            cwd=os.getcwd(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the parent process hung (45 s)")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report from the parent: {done.stdout[-500:]} {done.stderr[-2000:]}"
    report = json.loads(lines[-1])
    assert report["children"] == _FORKS
    assert report["hung"] == 0, f"{report['hung']} of {_FORKS} children deadlocked after leaving the loop"
    assert report["codes"] == [0], f"children's exit codes: {report['codes']}"


# ------------------------------------------------------------------ an end that never comes
# Found while testing the carry-through fix: when a defect loses the end of the outputs, every
# thread of the run may have exited already; the caller waited forever, with nothing left to cancel.


@pytest.mark.timeout(30)
@pytest.mark.parametrize("consume", ["for", "async for"])
@pytest.mark.parametrize("last", ["thread", "coroutine", "operator"])
def test_an_end_that_never_comes_fails_the_run_instead_of_hanging(last: str, consume: str) -> None:
    gate = threading.Event()

    def source() -> Iterator[int]:
        yield 1
        gate.wait(_PROMPT)
        yield 2

    async def same(x: int) -> int:
        return x

    chain = Pipeline.from_iter(source())
    if last == "operator":
        chain = chain.map(lambda x: x).take(5)
    else:
        chain = chain.map(same if last == "coroutine" else (lambda x: x))
    run = chain.start()
    run._output.put_end = lambda: None  # type: ignore[method-assign]  # the defect: the end is lost
    gate.set()
    got = []
    started = time.monotonic()


    async def collect() -> None:
        async for x in run:
            got.append(x)

    with pytest.raises(RuntimeError, match="the end of the outputs never came"):
        if consume == "for":
            for x in run:
                got.append(x)
        else:
            asyncio.run(collect())
    assert got == [1, 2]
    assert time.monotonic() - started < _PROMPT
    assert run.done
