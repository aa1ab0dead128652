"""Coroutine stages, async sources and ``async for``: the coroutine adapter (``_aio.py``).

Coroutines on the run's loop are gated with :class:`Gate` (an asyncio event the test thread opens
thread-safely) and report to the test thread through ``threading`` primitives; an ``asyncio.sleep``
below only ever stands for I/O latency, never for synchronisation.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import socketserver
import subprocess
import sys
import textwrap
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadpipe import Pipeline, RunStateError, SourceConsumedError
from threadpipe._aio import LoopThread
from threadpipe._channel import END
from threadpipe._loopchannel import LoopChannel, LoopLink
from threadpipe._run import RunState
from threadpipe._scope import Cancelled

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10  # seconds any single wait may take before the test fails instead of hanging


class Gate:
    """An event that coroutines on a run's loop await and the test thread opens, thread-safely."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def wait(self) -> None:
        with self._lock:
            if self._opened:
                return
            event = asyncio.Event()
            self._waiters.append((asyncio.get_running_loop(), event))
        await event.wait()

    def open(self) -> None:
        with self._lock:
            self._opened = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # that run's loop is gone already


class Counter:
    """Counts events from any thread; the test thread waits until it reaches a number."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.value = 0
        self.peak = 0  # of ``value``, for counters that also go down

    def add(self, n: int = 1) -> None:
        with self._cond:
            self.value += n
            self.peak = max(self.peak, self.value)
            self._cond.notify_all()

    def reach(self, n: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.value >= n, WAIT)


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "threadpipe-loop-0"]


def loop_threads_gone() -> bool:
    """Whether every loop thread has exited. A run's ``join`` returns once its threads are
    counted out; the loop thread then still returns from its last frames (at a tiny switch
    interval the caller may look before it has): give it that long."""
    for thread in loop_threads():
        thread.join(WAIT)
    return not loop_threads()


@pytest.fixture(autouse=True)
def no_unretrieved_task_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail if asyncio logged anything (like "Task exception was never retrieved") in the test."""
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        yield
        gc.collect()  # an abandoned task or coroutine complains when it is collected
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not logged, logged


async def double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


# ---------------------------------------------------------------------------------- what is async


class AsyncCallable:
    async def __call__(self, x: int) -> int:
        return x + 1


class Service:
    async def method(self, x: int) -> int:
        return x + 2


async def add(x: int, y: int) -> int:
    return x + y


@pytest.mark.parametrize(
    "fn",
    [
        functools.partial(add, y=1),
        functools.partial(functools.partial(add), y=1),
        AsyncCallable(),
        functools.partial(AsyncCallable()),
        lambda x: x + 1,
    ],
    ids=["partial", "nested-partial", "async-__call__", "partial-of-async-__call__", "plain"],
)
def test_coroutine_functions_are_recognised_through_partials_and_call(fn: Any) -> None:
    assert Pipeline.from_iter(range(5)).map(fn, workers=3).to_list() == [1, 2, 3, 4, 5]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="inspect.markcoroutinefunction is 3.12+")
def test_a_function_marked_as_a_coroutine_function_makes_a_coroutine_stage() -> None:
    import inspect

    def fetch(x: int) -> Any:  # returns an awaitable, and says so
        return double(x)

    marked = inspect.markcoroutinefunction(fetch)  # type: ignore[attr-defined,unused-ignore]
    assert Pipeline.from_iter([1, 2]).map(marked).to_list() == [2, 4]


def test_a_bound_async_method_makes_a_coroutine_stage() -> None:
    assert Pipeline.from_iter([1]).map(Service().method).to_list() == [3]


def test_only_flat_map_takes_an_async_generator_function() -> None:
    async def gen(x: int) -> AsyncIterator[int]:
        yield x

    for method in ("map", "filter", "each"):
        with pytest.raises(TypeError, match="async generator function.*flat_map"):
            getattr(Pipeline.from_iter([1]), method)(gen)
    assert Pipeline.from_iter([1, 2]).flat_map(gen).to_list() == [1, 2]


# ---------------------------------------------------------------------------------- flow


def test_200_coroutines_in_flight_use_the_same_threads_as_2() -> None:
    def threads_when_all_in_flight(n: int) -> set[str]:
        gate, arrived, names = Gate(), Counter(), set()

        async def hold(x: int) -> int:
            arrived.add()
            await gate.wait()
            return x

        run = Pipeline.from_iter(range(n)).map(hold, workers=n, name="hold").backpressure(n).start()
        assert arrived.reach(n), f"only {arrived.value} of {n} coroutines started"
        names = {t.name for t in threading.enumerate() if t.name.startswith("threadpipe-")}
        gate.open()
        assert sorted(run) == list(range(n))
        assert run.stats()[0].concurrency == n  # the most coroutines that were in flight at once
        assert run.stats()[0].spawned == 0  # the loop takes the list's items, writes the outputs
        return names

    # The loop only: it feeds the list's items to the stage and hands the outputs to the caller.
    assert threads_when_all_in_flight(2) == threads_when_all_in_flight(200) == {"threadpipe-loop-0"}


def test_workers_bounds_the_coroutines_in_flight_and_is_reached() -> None:
    in_flight, all_in = Counter(), Gate()

    async def call(x: int) -> int:
        in_flight.add()
        if x < 5:  # the first five wait for each other: five must be in flight at once
            if in_flight.value == 5:
                all_in.open()
            await all_in.wait()
        await asyncio.sleep(0.001)  # stands for I/O
        in_flight.add(-1)
        return x

    assert sorted(Pipeline.from_iter(range(60)).map(call, workers=5, ordered=False)) == list(
        range(60)
    )
    assert in_flight.peak == 5


def test_ordered_outputs_keep_input_order_when_calls_finish_in_reverse() -> None:
    n = 50
    finished: list[int] = []
    events: dict[int, asyncio.Event] = {}

    async def reverse(x: int) -> int:
        # Item x finishes only after item x + 1 has: the last item finishes first. The events are
        # made on the run's loop, where every call runs.
        event = events.setdefault(x, asyncio.Event())
        if x + 1 < n:
            await events.setdefault(x + 1, asyncio.Event()).wait()
        finished.append(x)
        event.set()
        return x

    assert Pipeline.from_iter(range(n)).map(reverse, workers=n).to_list() == list(range(n))
    assert finished == list(range(n))[::-1]


def test_unordered_outputs_come_as_calls_finish() -> None:
    seen_one = Gate()

    async def call(x: int) -> int:
        if x == 0:
            await seen_one.wait()  # item 0 finishes only once the caller has received item 1
        return x

    out = []
    for x in Pipeline.from_iter([0, 1]).map(call, workers=2, ordered=False):
        out.append(x)
        if x == 1:
            seen_one.open()
    assert out == [1, 0]


def test_a_full_downstream_buffer_does_not_freeze_the_loop() -> None:
    # Items 0-2 finish at once and back up behind a blocked thread stage: one in its worker, one
    # in the buffer before it, and the put of the third waits for room. Item 3 waits for a gate
    # the test opens only after that: it can finish only if that waiting put did not block the
    # loop (as it would if the loop thread put outputs itself).
    done, gate, release = Counter(), Gate(), threading.Event()

    async def call(x: int) -> int:
        if x >= 3:
            await gate.wait()
        done.add()
        return x

    run = (
        Pipeline.from_iter(range(20))
        .map(call, workers=4, ordered=False)
        .backpressure(1)
        .map(lambda x: release.wait(WAIT) and x)
        .start()
    )
    assert done.reach(3)
    gate.open()
    assert done.reach(4), "a call could not finish while a put waited for room: the loop is blocked"
    release.set()
    assert sorted(run) == list(range(20))


@pytest.mark.default_switch_interval
@pytest.mark.parametrize("reader", ["caller", "thread stage", "ordered into the caller"])
@pytest.mark.parametrize("workers", [4, 16, 64])
def test_fast_coroutine_stages_hand_items_to_a_thread_without_a_wait_per_item(
    reader: str, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A busy loop keeps the thread that reads its output from the interpreter lock (it lets go
    # and takes it back on every turn), so the buffer between them filled, and from then on every
    # coroutine waited on a future for room for its item: 0.1 to 0.9 such waits per item here,
    # two to three times the loop's work per item. The loop now lets the reader run once the
    # buffer is full (``LoopChannel._yield_to_reader``). Counted: the writers that waited on a
    # future for room, in the buffers threads read.
    n = 3000
    waits = [0]

    class CountedWaits(deque[Any]):
        def append(self, waiter: Any) -> None:
            waits[0] += 1
            super().append(waiter)

    made = LoopChannel.__init__

    def counted(self: LoopChannel, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        if type(self) is LoopChannel:  # not a LoopLink: its reader is on the loop
            self._room = CountedWaits()

    monkeypatch.setattr(LoopChannel, "__init__", counted)

    async def step(x: int) -> int:
        await asyncio.sleep(0)  # one turn of the loop, as an awaited call that returns at once
        return x

    ordered = reader.startswith("ordered")
    pipeline = (
        Pipeline.from_iter(range(n))
        .map(step, workers=workers, ordered=ordered)
        .map(step, workers=workers, ordered=ordered)
    )
    if reader == "thread stage":
        pipeline = pipeline.map(lambda x: x, workers=4, ordered=False)
    outputs = list(pipeline)
    assert (outputs if ordered else sorted(outputs)) == list(range(n))
    assert waits[0] < n // 10, f"{waits[0]} waits for room for {n} items"


def test_a_reader_thread_slower_than_a_switch_interval_is_waited_for_at_few_fillings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The other side of the test above: a reader thread whose calls take longer than a switch
    # interval (5 ms) and do not need the interpreter lock (I/O) cannot be helped by the loop
    # waiting for it: every wait times out. The fillings after one go by without a wait, more of
    # them each time (1, 2, 4 ...): a few waits for the whole run, not one a filling (one filling
    # per item read here).
    n = 30
    waited = [0]
    yield_to_reader = LoopChannel._yield_to_reader

    def counted(self: LoopChannel) -> bool:
        did = yield_to_reader(self)
        waited[0] += did
        return did

    monkeypatch.setattr(LoopChannel, "_yield_to_reader", counted)
    assert sys.getswitchinterval() <= 0.005

    async def fast(x: int) -> int:
        return x

    def slow(x: int) -> int:
        threading.Event().wait(0.015)  # stands for I/O: the lock is let go meanwhile
        return x

    # One writer: it finds the buffer full at every filling, with no other writer waiting.
    pipeline = Pipeline.from_iter(range(n)).map(fast).backpressure(1).map(slow)
    assert list(pipeline) == list(range(n))
    assert 1 <= waited[0] <= 8, f"the loop waited for its reader at {waited[0]} of ~{n} fillings"


def test_coroutine_and_thread_stages_mix() -> None:
    async def fetch(x: int) -> str:
        await asyncio.sleep(0.001)  # stands for I/O
        return str(x)

    async def repeat(s: str) -> str:
        return s * 2

    pipeline = (
        Pipeline.from_iter(range(100))
        .map(lambda x: x + 1, workers=3)
        .map(fetch, workers=20)
        .filter(lambda s: s.endswith("0"), workers=2)
        .map(repeat, workers=4, ordered=False)
    )
    assert sorted(pipeline.to_list()) == sorted(str(x) * 2 for x in range(1, 101) if x % 10 == 0)


@pytest.mark.parametrize("ordered", [True, False])
def test_filter_flat_map_and_each(ordered: bool) -> None:
    seen: list[int] = []

    async def even(x: int) -> bool:
        return x % 2 == 0

    async def twice(x: int) -> list[int]:
        return [x, x]

    async def countdown(x: int) -> AsyncIterator[int]:
        for i in range(x % 3):
            await asyncio.sleep(0)
            yield 100 * x + i

    async def pairs(x: int) -> AsyncIterator[int]:  # an async def returning an async iterable
        return countdown(x)

    async def record(x: int) -> None:
        seen.append(x)

    def run(p: Pipeline[int]) -> list[int]:
        out = p.to_list()
        return out if ordered else sorted(out)

    src = Pipeline.from_iter(range(12))
    assert run(src.filter(even, workers=4, ordered=ordered)) == [0, 2, 4, 6, 8, 10]
    assert run(src.flat_map(twice, workers=4, ordered=ordered)) == sorted(2 * list(range(12)))
    expected = [100 * x + i for x in range(12) for i in range(x % 3)]
    assert run(src.flat_map(countdown, workers=4, ordered=ordered)) == expected
    assert run(src.flat_map(pairs, workers=4, ordered=ordered)) == expected
    assert run(src.each(record, workers=4, ordered=ordered)) == list(range(12))
    assert sorted(seen) == list(range(12))


def test_buffer_bound_counts_the_coroutines_in_flight() -> None:
    # The output buffer holds as many items as the stage has workers (100), twice counted.
    p = Pipeline.from_iter(iter([1])).backpressure(5).map(double, workers=100, ordered=False)
    assert p.buffer_bound() == 1 + (5 + 100) + 2 * 100
    ordered = Pipeline.from_iter(iter([1])).backpressure(5).map(double, workers=100)
    assert ordered.buffer_bound() == 1 + (5 + 200) + 2 * 100
    sized = ordered.backpressure(7)
    assert sized.output_capacity == 7 and sized.buffer_bound() == 1 + (5 + 200) + 2 * 7


# ---------------------------------------------------------------------------------- errors


def test_a_coroutines_exception_is_raised_as_itself_with_the_note() -> None:
    raised: list[BaseException] = []

    async def fail(x: int) -> int:
        if x == 7:
            exc = KeyError("bad", x)
            raised.append(exc)
            raise exc
        return x

    with pytest.raises(KeyError) as info:
        Pipeline.from_iter(range(20)).map(fail, workers=4, name="fetch").to_list()
    assert info.value is raised[0]
    assert info.value.args == ("bad", 7)
    assert info.value.__notes__ == ["threadpipe: raised in stage 'fetch' while processing item 7"]
    assert any(frame.name == "fail" for frame in _frames(info.value))


def _frames(exc: BaseException) -> list[Any]:
    import traceback

    return list(traceback.extract_tb(exc.__traceback__))


def test_a_failure_cancels_the_other_coroutines_in_flight() -> None:
    arrived, cancelled, all_in = Counter(), Counter(), Gate()

    async def call(x: int) -> int:
        arrived.add()
        if arrived.value == 4:
            all_in.open()
        if x == 0:
            await all_in.wait()  # fail once every other call is waiting
            raise ValueError("boom")
        try:
            await Gate().wait()  # forever
        except asyncio.CancelledError:
            cancelled.add()
            raise
        return x

    run = Pipeline.from_iter(range(4)).map(call, workers=4).start()
    with pytest.raises(ValueError, match="boom"):
        list(run)
    assert cancelled.reach(3)
    with pytest.raises(ValueError, match="boom"):
        run.join(WAIT)  # raises the failure again, once every thread has exited
    assert loop_threads_gone()


def test_base_exceptions_are_carried_too() -> None:
    class Stop(BaseException):
        pass

    async def call(x: int) -> int:
        raise Stop(x)

    with pytest.raises(Stop) as info:
        Pipeline.from_iter([5]).map(call).to_list()
    assert info.value.args == (5,)


def test_a_cancelled_error_the_function_raises_itself_fails_the_run() -> None:
    async def call(x: int) -> int:
        inner = asyncio.get_running_loop().create_future()
        inner.cancel()
        return await inner  # type: ignore[no-any-return]  # raises CancelledError: not ours

    with pytest.raises(asyncio.CancelledError) as info:
        Pipeline.from_iter([1]).map(call, name="inner").to_list()
    assert "stage 'inner'" in info.value.__notes__[0]


# ---------------------------------------------------------------------------------- timeout


def test_a_call_that_overruns_its_timeout_is_cancelled_and_fails_the_run() -> None:
    cancelled = threading.Event()

    async def call(x: int) -> int:
        if x == 3:
            try:
                await Gate().wait()  # forever
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return x

    with pytest.raises(TimeoutError) as info:
        Pipeline.from_iter(range(6)).map(call, workers=6, timeout=0.05, name="slow").to_list()
    assert cancelled.is_set()
    assert str(info.value) == "the call did not finish within timeout=0.05 s and was cancelled"
    assert info.value.__notes__ == ["threadpipe: raised in stage 'slow' while processing item 3"]


def test_calls_within_the_timeout_are_unaffected_and_a_users_timeout_error_is_its_own() -> None:
    assert Pipeline.from_iter(range(10)).map(double, workers=3, timeout=WAIT).to_list() == [
        2 * x for x in range(10)
    ]
    mine = TimeoutError("mine")

    async def call(x: int) -> int:
        raise mine

    with pytest.raises(TimeoutError) as info:
        Pipeline.from_iter([1]).map(call, timeout=WAIT).to_list()
    assert info.value is mine and info.value.args == ("mine",)


def test_timeout_covers_a_whole_flat_map() -> None:
    async def endless(x: int) -> AsyncIterator[int]:
        while True:
            await asyncio.sleep(0)
            yield x

    with pytest.raises(TimeoutError):
        Pipeline.from_iter([1]).flat_map(endless, timeout=0.05).to_list()


@pytest.mark.parametrize(
    ("fn", "timeout", "error", "match"),
    [
        (double, 0, ValueError, "timeout must be a finite number of seconds > 0, got 0"),
        (double, -1.5, ValueError, "got -1.5"),
        (double, float("nan"), ValueError, "got nan"),
        (double, float("inf"), ValueError, "got inf"),
        (double, "1", TypeError, "timeout must be a number"),
        (double, True, TypeError, "timeout must be a number"),
    ],
)
def test_timeout_is_checked_when_the_pipeline_is_built(
    fn: Any, timeout: Any, error: type[Exception], match: str
) -> None:
    for method in ("map", "filter", "flat_map", "each"):
        with pytest.raises(error, match=match):
            getattr(Pipeline.from_iter([1]), method)(fn, timeout=timeout)


# ---------------------------------------------------------------------------------- cancel


def test_cancel_cancels_the_coroutines_in_flight_and_the_loop_thread_exits() -> None:
    arrived, cancelled, calls = Counter(), Counter(), Counter()

    async def forever(x: int) -> int:
        calls.add()
        arrived.add()
        try:
            await Gate().wait()
        except asyncio.CancelledError:
            cancelled.add()
            raise
        return x

    run = Pipeline.from_iter(range(100)).map(forever, workers=8).start()
    assert arrived.reach(8)
    assert [t.name for t in loop_threads()] == ["threadpipe-loop-0"]
    run.cancel()
    assert cancelled.reach(8)
    run.join(WAIT)
    assert run.cancelled and run.exception is None
    assert loop_threads_gone()
    assert calls.value == 8  # nothing was called after the cancel
    assert list(run) == []


def test_break_cancels_in_flight_coroutines_and_closes_the_async_source() -> None:
    closed, blocked, cancelled = threading.Event(), Counter(), Counter()

    async def source() -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    async def call(x: int) -> int:
        if x < 10:
            return x
        blocked.add()
        try:
            await Gate().wait()
        except asyncio.CancelledError:
            cancelled.add()
            raise
        return x

    for x in Pipeline.from_async_iter(source()).map(call, workers=20, ordered=False):
        if x == 9:
            assert blocked.reach(10)  # items 0-9 are out: their permits took 10 more in
            break
    assert closed.wait(WAIT)
    assert cancelled.reach(blocked.value)


def test_dropping_an_unfinished_run_cancels_its_coroutines() -> None:
    arrived, cancelled = Counter(), Counter()

    async def forever(x: int) -> int:
        arrived.add()
        try:
            await Gate().wait()
        except asyncio.CancelledError:
            cancelled.add()
            raise
        return x

    run = Pipeline.from_iter(range(3)).map(forever, workers=3).start()
    assert arrived.reach(3)
    del run
    gc.collect()
    assert cancelled.reach(3)


# ---------------------------------------------------------------------------------- async source


async def numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


class Numbers:
    """A re-iterable async source: every ``__aiter__`` starts afresh."""

    def __aiter__(self) -> AsyncIterator[int]:
        return numbers(5)


def test_from_async_iter_feeds_thread_and_coroutine_stages() -> None:
    assert Pipeline.from_async_iter(numbers(50)).map(lambda x: x + 1).to_list() == list(
        range(1, 51)
    )
    assert Pipeline.from_async_iter(numbers(50)).map(double, workers=7).to_list() == [
        2 * x for x in range(50)
    ]
    assert Pipeline.from_async_iter(numbers(0)).to_list() == []


def test_an_async_generator_feeds_one_run_and_a_re_iterable_feeds_many() -> None:
    once = Pipeline.from_async_iter(numbers(3))
    assert once.to_list() == [0, 1, 2]
    with pytest.raises(SourceConsumedError, match="one-shot async iterator"):
        once.start()
    many = Pipeline.from_async_iter(Numbers()).map(double)
    assert many.to_list() == many.to_list() == [0, 2, 4, 6, 8]


def test_an_async_sources_exception_is_raised_with_the_note() -> None:
    error = OSError("disconnected")

    async def source() -> AsyncIterator[int]:
        yield 1
        raise error

    with pytest.raises(OSError) as info:
        Pipeline.from_async_iter(source()).to_list()
    assert info.value is error
    assert info.value.__notes__ == ["threadpipe: raised by the 'source' iterator"]


def test_from_async_iter_checks_its_argument() -> None:
    with pytest.raises(TypeError, match="call it"):
        Pipeline.from_async_iter(numbers)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Pipeline.from_iter"):
        Pipeline.from_async_iter([1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs an async iterable"):
        Pipeline.from_async_iter(3)  # type: ignore[arg-type]

    class Wrong:
        async def __aiter__(self) -> AsyncIterator[int]:  # a common mistake: it must be a plain def
            return numbers(1)

    with pytest.raises(TypeError, match="plain def"):
        Pipeline.from_async_iter(Wrong()).start()  # type: ignore[arg-type]


def test_a_coroutine_source_is_pulled_one_item_ahead_at_most() -> None:
    pulled, release = Counter(), threading.Event()

    async def source() -> AsyncIterator[int]:
        for i in range(100):
            pulled.add()
            yield i

    run = (
        Pipeline.from_async_iter(source())
        .backpressure(2)
        .map(lambda x: release.wait(WAIT) and x)
        .start()
    )
    # 1 item in the blocked worker, 2 in the buffer, 1 in the feeder thread's hand waiting for
    # room; the next is pulled only once that one is in.
    assert pulled.reach(4)
    assert pulled.value == 4
    release.set()
    assert list(run) == list(range(100))


# ---------------------------------------------------------------------------------- async for


def test_async_for_over_a_pipeline_and_over_a_run() -> None:
    async def main() -> tuple[list[int], list[int]]:
        a = [x async for x in Pipeline.from_iter(range(100)).map(double, workers=10)]
        run = Pipeline.from_iter(range(100)).map(lambda x: x + 1, workers=3).start()
        b = [x async for x in run]
        with pytest.raises(RunStateError):
            run.__aiter__()
        with pytest.raises(RunStateError):
            iter(run)
        return a, b

    a, b = asyncio.run(main())
    assert a == [2 * x for x in range(100)]
    assert b == list(range(1, 101))


def test_the_callers_loop_keeps_ticking_while_async_for_waits() -> None:
    # The stage holds its item until the caller's loop has ticked 5 times. If waiting for the
    # output blocked that loop, the ticker could not run, and the stage would time out.
    release = threading.Event()
    outcome: list[bool] = []

    def held(x: int) -> int:
        outcome.append(release.wait(WAIT))
        return x

    async def main() -> list[int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            for _ in range(5):
                await asyncio.sleep(0.001)
                ticks += 1
            release.set()

        task = asyncio.create_task(ticker())
        out = [x async for x in Pipeline.from_iter([1, 2]).map(held)]
        await task
        assert ticks == 5
        return out

    assert asyncio.run(main()) == [1, 2]
    assert outcome == [True, True]


def test_async_for_raises_a_stage_failure_as_itself() -> None:
    error = ValueError("x")

    async def fail(x: int) -> int:
        raise error

    async def main() -> None:
        with pytest.raises(ValueError) as info:
            async for _ in Pipeline.from_iter([1]).map(fail):
                pass
        assert info.value is error

    asyncio.run(main())


def test_leaving_async_for_early_cancels_the_pipelines_run() -> None:
    closed = threading.Event()

    def source() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    async def main() -> None:
        async for x in Pipeline.from_iter(source()).map(double, workers=4):
            if x == 20:
                break

    asyncio.run(main())
    assert closed.wait(WAIT)


def test_cancelling_the_task_that_waits_loses_no_output() -> None:
    release = threading.Event()

    async def main() -> list[int]:
        run = Pipeline.from_iter(range(3)).map(lambda x: release.wait(WAIT) and x).start()
        it = run.__aiter__()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await it.__anext__()  # waits in the helper thread; cancelled here
        release.set()
        return [x async for x in it]

    assert asyncio.run(main()) == [0, 1, 2]


def test_a_pipeline_called_synchronously_inside_a_running_loop_works() -> None:
    async def main() -> list[int]:
        return Pipeline.from_iter(range(10)).map(double, workers=5).to_list()

    assert asyncio.run(main()) == [2 * x for x in range(10)]


# ---------------------------------------------------------------------------------- the loop's life


def test_a_thread_only_run_starts_no_loop_and_imports_no_asyncio() -> None:
    code = """
        import sys, threading
        from threadpipe import Pipeline
        names = set()
        def f(x):
            names.update(t.name for t in threading.enumerate())
            return x
        assert Pipeline.from_iter(range(10)).map(f, workers=2).to_list() == list(range(10))
        assert "threadpipe-loop-0" not in names, names
        assert "asyncio" not in sys.modules
        print("ok")
    """
    assert run_script(code).stdout == "ok\n"


def test_nothing_is_left_unretrieved_or_unawaited_in_a_subprocess() -> None:
    # Failures, a timeout, a cancel and a break, each with coroutines in flight, then exit: with
    # -W error and asyncio's debug mode, any task left behind or coroutine never awaited would
    # print to stderr.
    code = """
        import asyncio, threading
        from threadpipe import Pipeline
        async def fail(x):
            if x == 5:
                raise ValueError(x)
            await asyncio.sleep(0.2)
            return x
        async def slow(x):
            await asyncio.sleep(0.2)
            return x
        async def spread(x):
            yield x
            await asyncio.sleep(0.2)
            yield x
        async def source():
            i = 0
            while True:
                yield i
                i += 1
        for p in (Pipeline.from_iter(range(50)).map(fail, workers=10),
                  Pipeline.from_iter(range(50)).map(slow, workers=10, timeout=0.01)):
            try:
                p.to_list()
            except (ValueError, TimeoutError):
                pass
        run = Pipeline.from_async_iter(source()).map(slow, workers=10).start()
        run.cancel()
        run.join(10)
        for x in Pipeline.from_async_iter(source()).flat_map(spread, workers=3, ordered=False):
            break
        async def main():
            async for x in Pipeline.from_iter(range(100)).map(slow, workers=3):
                if x == 2:
                    break
        asyncio.run(main())
        print("ok")
    """
    result = run_script(code, env={"PYTHONASYNCIODEBUG": "1"})
    assert (result.stdout, result.stderr) == ("ok\n", "")


def test_interpreter_exit_with_coroutines_in_flight_is_quiet_and_prompt() -> None:
    code = """
        import asyncio
        from threadpipe import Pipeline
        started = __import__("threading").Event()
        async def forever(x):
            started.set()
            await asyncio.Event().wait()
        async def source():
            while True:
                yield 1
        run = Pipeline.from_async_iter(source()).map(forever, workers=50).start()
        started.wait(10)
        print("ready")
    """
    result = run_script(code, timeout=20)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ready\n", "")


def test_ctrl_c_while_iterating_a_coroutine_pipeline_cancels_its_coroutines() -> None:
    code = """
        import asyncio, signal, sys, threading, os, time
        from threadpipe import Pipeline
        # A shell starts background jobs with SIGINT ignored, and Python keeps it so: restore it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        arrived, cancelled = threading.Semaphore(0), threading.Semaphore(0)
        async def forever(x):
            arrived.release()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.release()
                raise
        run = Pipeline.from_iter(range(10)).map(forever, workers=4).start()
        for _ in range(4):
            assert arrived.acquire(timeout=10)
        def interrupt():
            # Once the main thread waits for an output (so that Ctrl-C lands in that wait).
            while not run._output.idle_getters:
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGINT)
        threading.Thread(target=interrupt).start()
        try:
            for x in run:
                pass
        except KeyboardInterrupt:
            print("interrupted", all(cancelled.acquire(timeout=10) for _ in range(4)))
            run.join(10)
            sys.exit(3)
    """
    result = run_script(code)
    assert (result.returncode, result.stdout, result.stderr) == (3, "interrupted True\n", "")


def run_script(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with warnings as errors; capture its output."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------------------------- properties

stage_specs = st.lists(
    st.tuples(
        st.sampled_from(["map", "filter", "flat_map", "each"]),
        st.booleans(),  # async
        st.integers(1, 16),  # workers
        st.booleans(),  # ordered
    ),
    min_size=1,
    max_size=4,
)


async def _a_inc(x: int) -> int:
    await asyncio.sleep(0)
    return x + 1


async def _a_keep(x: int) -> bool:
    await asyncio.sleep(0)
    return x % 3 != 0


async def _a_split(x: int) -> list[int]:
    await asyncio.sleep(0)
    return [x] * (x % 3)


async def _a_touch(x: int) -> None:
    await asyncio.sleep(0)


_SYNC = {
    "map": lambda x: x + 1,
    "filter": lambda x: x % 3 != 0,
    "flat_map": lambda x: [x] * (x % 3),
    "each": lambda x: None,
}
_ASYNC = {"map": _a_inc, "filter": _a_keep, "flat_map": _a_split, "each": _a_touch}


def _model(items: list[int], kind: str) -> list[int]:
    if kind == "map":
        return [x + 1 for x in items]
    if kind == "filter":
        return [x for x in items if x % 3 != 0]
    if kind == "flat_map":
        return [y for x in items for y in [x] * (x % 3)]
    return items


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=stage_specs, n=st.integers(0, 60), async_source=st.booleans())
def test_random_chains_of_thread_and_coroutine_stages_match_a_plain_loop(
    specs: list[tuple[str, bool, int, bool]], n: int, async_source: bool
) -> None:
    pipeline = (
        Pipeline.from_async_iter(numbers(n)) if async_source else Pipeline.from_iter(range(n))
    )
    expected = list(range(n))
    all_ordered = True
    for kind, is_async, workers, ordered in specs:
        fn = (_ASYNC if is_async else _SYNC)[kind]
        pipeline = getattr(pipeline, kind)(fn, workers=workers, ordered=ordered)
        expected = _model(expected, kind)
        all_ordered = all_ordered and ordered
    out = pipeline.to_list()
    assert out == expected if all_ordered else sorted(out) == sorted(expected)


# ---------------------------------------------------------------------------------- on the loop


def _stage_threads() -> set[str]:
    return {
        t.name
        for t in threading.enumerate()
        if t.name.startswith("threadpipe-") and t.name != "threadpipe-loop-0"
    }


def _count_from(n: int) -> Iterator[int]:
    yield from range(n)


_SOURCES = {
    "list": lambda n: Pipeline.from_iter(list(range(n))),
    "generator": lambda n: Pipeline.from_iter(_count_from(n)),
    "async-generator": lambda n: Pipeline.from_async_iter(numbers(n)),
}


@pytest.mark.parametrize("source", sorted(_SOURCES))
def test_adjacent_coroutine_stages_hand_items_on_the_loop_with_no_thread_between(
    source: str,
) -> None:
    # Three coroutine stages: a thread only where items come from a thread (the feeder of a
    # generator, which may block, and the first stage's taker); none between the stages, none to
    # hand the outputs to the caller, none for a list or an async generator feeding them.
    gate, arrived = Gate(), Counter()

    async def last(x: int) -> int:
        arrived.add()
        await gate.wait()
        return x

    run = (
        _SOURCES[source](40)
        .map(double, workers=8, name="a")
        .map(double, workers=8, name="b")
        .map(last, workers=40, name="c")
        .start()
    )
    assert arrived.reach(40)
    names = _stage_threads()
    gate.open()
    assert list(run) == [4 * x for x in range(40)]
    # (The taker of ``a`` and the feeder of a list may be done already: only a subset is sure.)
    threaded = source == "generator"
    assert names <= ({"threadpipe-source-0", "threadpipe-a-0"} if threaded else set()), names
    assert [s.spawned for s in run.stats()] == [int(threaded), 0, 0]


@pytest.mark.parametrize("change", ["abort", "put_end"])
def test_a_buffer_on_the_loop_changed_by_another_thread_while_the_loop_uses_it_stays_whole(
    change: str,
) -> None:
    # A LoopLink is changed by the loop alone, without a lock: what another thread does to it
    # (abort, put_end) is handed to the loop. Here the loop puts and takes (abort) or takes (the
    # end, once every item is put) as fast as it can while the test thread makes the change, at
    # a switch interval of a microsecond, many times over: an abort ends the churn with Cancelled
    # and leaves the buffer empty, and the end arrives behind every item, in order, and stays.
    state = RunState()
    aio = LoopThread(state)
    aio.hold()
    aio.start()
    errors: list[BaseException] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(200):
            link = LoopLink(8, "link", aio)
            busy, over = threading.Event(), threading.Event()
            seen: list[Any] = []

            async def churn(link: LoopLink = link, seen: list[Any] = seen) -> None:
                # On the loop, a turn of the loop every 50 rounds, where what was handed to it
                # is done. Aborting: put three and take them back, until aborted. Ending: put
                # six, then take until the end comes.
                try:
                    if change == "put_end":
                        link.put_now([0, 1, 2])
                        link.put_now([3, 4, 5])
                    while True:
                        for _ in range(50):
                            if change == "abort":
                                link.put_now([0, 1, 2])
                            busy.set()
                            while (got := link.take_one()) is not None:
                                seen.append(got[1])
                                if got[1] is END:
                                    return
                        await asyncio.sleep(0)
                except Cancelled:
                    pass
                except BaseException as exc:  # the failure this test looks for
                    errors.append(exc)
                finally:
                    over.set()

            tasks: list[asyncio.Task[None]] = []  # the loop holds its tasks weakly
            assert aio.call_soon(lambda churn=churn: tasks.append(aio.here().create_task(churn())))
            assert busy.wait(WAIT)
            if change == "abort":
                link.abort()
            else:
                link.put_end()
            assert over.wait(WAIT)
            flushed = threading.Event()
            assert aio.call_soon(flushed.set)  # what the change handed to the loop is done
            assert flushed.wait(WAIT)
            if change == "abort":
                assert link.qsize() == 0
                with pytest.raises(Cancelled):
                    link.put_now([3])
            else:
                assert seen == [0, 1, 2, 3, 4, 5, END]
                assert list(link.queue) == [END]  # it stays, for every reader to see
    finally:
        sys.setswitchinterval(old)
        aio.release()
    assert loop_threads_gone()
    assert not errors, errors


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stages=st.integers(2, 4),
    workers=st.sampled_from([1, 3, 64]),
    ordered=st.booleans(),
    source=st.sampled_from(sorted(_SOURCES)),
    stop_at=st.one_of(st.none(), st.integers(0, 400)),
)
def test_threads_that_read_end_or_cancel_the_buffers_on_the_loop_never_break_it(
    stages: int, workers: int, ordered: bool, source: str, stop_at: int | None
) -> None:
    # The buffers between coroutine stages are changed by the loop alone, without a lock; other
    # threads read their fill (statistics), end them (a writer's last thread) and abort them (a
    # cancel), at any point of the loop's puts and takes. Here another thread reads statistics
    # all along, at a switch interval of a microsecond, and the caller cancels after ``stop_at``
    # outputs: the reads never fail, a cancel loses nothing but what it drops, the buffers are
    # empty once it has, and a run left alone gives every output.
    n = 600
    pipeline = _SOURCES[source](n)
    for index in range(stages):
        pipeline = pipeline.map(double, workers=workers, ordered=ordered, name=f"s{index}")
    errors: list[BaseException] = []
    done = threading.Event()

    def read_stats(run: Any) -> None:
        try:
            while not done.is_set():
                run.stats()
        except BaseException as exc:  # the failure this test looks for
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run = pipeline.start()
        reader = threading.Thread(target=read_stats, args=(run,))
        reader.start()
        try:
            out = []
            for x in run:
                if stop_at is not None and len(out) == stop_at:
                    run.cancel()
                    break
                out.append(x)
            run.join(WAIT)
        finally:
            done.set()
            reader.join(WAIT)
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    factor = 2**stages
    if stop_at is None or stop_at >= n:
        assert run.exception is None and not run.cancelled
        expected = [factor * x for x in range(n)]
        assert out == expected if ordered else sorted(out) == expected
    else:
        assert run.cancelled and run.exception is None
        assert len(out) == stop_at
        assert set(out) <= {factor * x for x in range(n)}
        assert all(channel.qsize() == 0 for channel in run._state.channels)
    assert loop_threads_gone()


@pytest.mark.parametrize("failing", [0, 1, 2])
@pytest.mark.parametrize("source", sorted(_SOURCES))
def test_a_failure_anywhere_in_a_chain_on_the_loop_is_raised_as_itself(
    failing: int, source: str
) -> None:
    # The other stages' coroutines are cancelled, the loop and every thread exit.
    boom = ValueError("boom")
    cancelled = Counter()

    def stage(index: int) -> Any:
        async def call(x: int) -> int:
            if index == failing and x == 7:
                raise boom
            try:
                await asyncio.sleep(0 if x < 7 else 0.001)  # stands for I/O
            except asyncio.CancelledError:
                cancelled.add()
                raise
            return x

        return call

    before = set(threading.enumerate())
    pipeline = (
        _SOURCES[source](10_000).map(stage(0), workers=8).map(stage(1), workers=8).map(stage(2), workers=8)
    )
    with pytest.raises(ValueError) as info:
        pipeline.to_list()
    assert info.value is boom
    for t in set(threading.enumerate()) - before:
        if t.name.startswith("threadpipe-"):
            t.join(WAIT)
            assert not t.is_alive(), t.name


@pytest.mark.parametrize("ordered", [True, False])
def test_backpressure_holds_between_coroutine_stages_on_the_loop(ordered: bool) -> None:
    # The second stage is stuck: the first stops once its output buffer (on the loop) is full
    # and its own permits are used, and starts no call beyond that.
    gate, started, stuck = Gate(), Counter(), Counter()

    async def first(x: int) -> int:
        started.add()
        return x

    async def second(x: int) -> int:
        stuck.add()
        await gate.wait()
        return x

    run = (
        Pipeline.from_iter(range(1_000))
        .map(first, workers=3, ordered=ordered)
        .backpressure(5)
        .map(second, workers=2, ordered=ordered)
        .start()
    )
    assert stuck.reach(2)
    # At most: 2 in the second stage, 5 in the buffer between, 3 held by the first stage
    # (finished, waiting for room), 1 the first stage's taker holds as it waits for a permit.
    assert started.reach(5)
    run_bound = 2 + 5 + 3
    # Let the run settle (nothing decided by time: a run that overshoots only gets more chances).
    pause, last, stable = threading.Event(), -1, 0
    while stable < 5:
        pause.wait(0.002)
        stable = stable + 1 if started.value == last else 0
        last = started.value
    assert started.value <= run_bound + 1, started.value
    gate.open()
    out = list(run)
    assert out == list(range(1_000)) if ordered else sorted(out) == list(range(1_000))


def test_a_resource_in_the_middle_of_a_chain_on_the_loop_is_closed_before_the_last_output() -> None:
    events: list[str] = []

    class Session:
        async def __aenter__(self) -> Session:
            events.append("open")
            return self

        async def __aexit__(self, *exc: object) -> None:
            await asyncio.sleep(0)
            events.append("closed")

    async def use(x: int, session: Session) -> int:
        await asyncio.sleep(0)
        return x

    out = []
    for x in (
        Pipeline.from_async_iter(numbers(30))
        .map(double, workers=4)
        .map(use, workers=4, resource=Session)
        .map(double, workers=4)
    ):
        out.append(x)
    assert out == [4 * x for x in range(30)]
    assert events == ["open", "closed"]


# ------------------------------------------------------------- a busy loop polls for I/O, paced


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="test-echo-server")
    thread.start()
    try:
        yield server.server_address[0], server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.timeout(60)
def test_socket_io_goes_on_while_another_coroutine_keeps_the_loop_busy(
    echo_server: tuple[str, int],
) -> None:
    # Item 0 keeps a callback ready at every turn of the loop until the others have been echoed
    # back by a real server: a loop that skipped its polls for I/O while busy would never see the
    # replies (item 0 gives up after 20 s, so that failure is an assertion, not a hang).
    host, port = echo_server
    echoed = threading.Event()
    replies: list[int] = []
    turns = [0]

    async def stage(item: int) -> int:
        if item == 0:
            deadline = asyncio.get_running_loop().time() + 20
            while not echoed.is_set() and asyncio.get_running_loop().time() < deadline:
                turns[0] += 1
                await asyncio.sleep(0)
            return -1 if echoed.is_set() else -2  # -2: the replies never came while it spun
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(20):  # 20 round trips each, all while item 0 spins
                writer.write(b"%d\n" % item)
                await writer.drain()
                assert int(await reader.readline()) == item
        finally:
            writer.close()
            await writer.wait_closed()
        replies.append(item)
        if len(replies) == 8:
            echoed.set()
        return item

    outputs = sorted(Pipeline.from_iter(range(9)).map(stage, workers=9, ordered=False))
    assert outputs == [-1, *range(1, 9)]
    assert echoed.is_set() and turns[0] > 0
    assert loop_threads_gone()


async def _spinner(done: threading.Event) -> int:
    """Keep a callback ready at every turn of the loop (it never waits in the OS) until ``done``
    is set (0), or 20 s passed (-1: a starved thread fails the test's assertion, no hang)."""
    deadline = asyncio.get_running_loop().time() + 20
    while not done.is_set():
        if asyncio.get_running_loop().time() > deadline:
            return -1
        await asyncio.sleep(0)
    return 0


def _twenty_naps(done: threading.Event) -> None:
    """Sleep 1 ms twenty times, then set ``done``: each wake-up needs the interpreter lock back."""
    for _ in range(20):
        threading.Event().wait(0.001)
    done.set()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("waiter", ["plain_thread", "thread_stage", "caller"])
@pytest.mark.parametrize("workers", [2, 8])
def test_a_busy_loop_lets_the_other_threads_of_the_process_run(waiter: str, workers: int) -> None:
    # A coroutine that keeps the loop busy must not starve the process's other threads of the
    # interpreter lock: a thread that wakes needs the lock to go on, and each time the loop let go
    # of it for an instant and took it back, that thread's claim to it was reset. Item 0 spins
    # until another thread has done work that needs the lock: a plain thread of yours, a thread
    # stage of the same run, or your own thread reading the outputs.
    done = threading.Event()

    async def stage(item: int) -> int:
        if item == 0:
            return await _spinner(done)
        return item

    if waiter == "plain_thread":
        helper = threading.Thread(target=_twenty_naps, args=(done,), name="test-naps")
        helper.start()
        outputs = Pipeline.from_iter(range(workers)).map(stage, workers=workers).to_list()
        helper.join(20)
    elif waiter == "thread_stage":

        def nap_then_pass(x: int) -> int:
            if x == 1:
                _twenty_naps(done)
            return x

        pipeline = Pipeline.from_iter(range(workers)).map(stage, workers=workers, ordered=False)
        outputs = sorted(pipeline.map(nap_then_pass))
    else:
        outputs = []
        for x in Pipeline.from_iter(range(workers)).map(stage, workers=workers, ordered=False):
            outputs.append(x)
            if x:  # your loop got an output while item 0 spins: it had the lock
                _twenty_naps(done)
        outputs.sort()
    assert outputs[0] == 0, f"{waiter}: starved of the interpreter lock for 20 s by a busy loop"
    assert outputs == list(range(workers))
    assert loop_threads_gone()


@pytest.mark.timeout(60)
def test_a_busy_loop_polls_for_io_at_least_every_few_ms_and_less_than_every_turn() -> None:
    # The pacing itself: while a coroutine keeps a callback ready for ~100 ms, the loop asks the
    # OS for I/O events many times (every ``_POLL_EVERY`` s, give or take the machine's noise),
    # but not at every turn, which is what let the interpreter lock change hands every turn.
    from threadpipe import _aio

    turns = [0]
    reached: list[float | None] = []  # the timeouts of the polls that reached the OS
    loop = asyncio.new_event_loop()
    selector_type = type(loop._selector)  # type: ignore[attr-defined]
    real = selector_type.select

    def os_select(self: Any, timeout: float | None = None) -> Any:
        reached.append(timeout)
        return real(self, timeout)

    async def spin() -> None:
        end = loop.time() + 0.1
        while loop.time() < end:
            turns[0] += 1
            await asyncio.sleep(0)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(selector_type, "select", os_select)
            _aio._paced(loop)  # paces the select it finds: the counted one
            loop.run_until_complete(spin())
    finally:
        loop.close()
    busy_polls = [timeout for timeout in reached if timeout is not None and timeout <= 0]
    assert turns[0] > 100
    assert 10 <= len(busy_polls) < turns[0] / 2, (len(busy_polls), turns[0])


# ---------------------------------------------------------------------------------- the example


@pytest.mark.timeout(60)
def test_the_async_fetch_example_fetches_every_page_with_few_threads() -> None:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            str(ROOT / "examples" / "async_fetch.py"),
            "--pages",
            "120",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("page/0 ")
    assert lines[3] == "... 120 pages in input order, 120 distinct digests"
    summary = lines[4].split()
    assert summary[:2] == ["120", "pages"]
    assert int(summary[summary.index("threads;") - 1]) <= 8  # 50 in flight, a handful of threads
