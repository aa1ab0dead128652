"""Carry-through between thread stages (``Stage.carry``): a worker runs the next stage's calls itself.

What must hold however the batches travel: each stage's ``workers`` bounds its calls in flight,
every item passes every stage once, statistics count the carried calls in the stage they belong
to, a carried call's exception is raised as itself, a cancel or an early break never hangs, and a
run holds no more items than ``buffer_bound()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from threadpipe import Pipeline, Run

from tracked import Tracked, Tracker, check_bound


class InFlight:
    """Counts the calls of one stage in flight, the most at once, and the threads that made them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.threads: set[str] = set()

    def wrap(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def call(item: Any) -> Any:
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
                self.threads.add(threading.current_thread().name)
            try:
                return fn(item)
            finally:
                with self.lock:
                    self.now -= 1

        return call


def _yield(item: Any) -> Any:
    # Lets other threads run between the counts, so that calls overlap: no timing is asserted.
    threading.Event().wait(0.0005)
    return item


def test_a_finished_item_is_carried_into_the_next_stage_by_its_thread() -> None:
    first, second = InFlight(), InFlight()
    # The first call ends once the run has started every stage: a stage is carried into only
    # once its first worker runs.
    started = threading.Event()
    pipeline = (
        Pipeline.from_iter([1])
        .map(first.wrap(lambda x: started.wait(10) and x + 1), workers=2, ordered=False, name="a")
        .map(second.wrap(lambda x: x * 10), workers=2, ordered=False, name="b")
    )
    with pipeline.start() as run:
        started.set()
        assert list(run) == [20]
        run.join()
    # The second stage had a place free (its first worker idle) and nothing queued: the thread
    # that made the item ran the second call too.
    assert second.threads == first.threads
    assert all(name.startswith("threadpipe-a-") for name in second.threads)
    a, b = run.stats()
    assert (a.items_in, a.items_out, b.items_in, b.items_out) == (1, 1, 1, 1)
    assert b.in_flight == 0
    assert b.cpu_seconds is not None and a.cpu_seconds is not None


@pytest.mark.parametrize("workers", [(2, 2, 2), (8, 3, 5), (16, 16, 16), (3, 12, 1)])
@pytest.mark.parametrize("buffer", [None, 1, 4])
def test_carried_calls_count_against_each_stages_workers(
    workers: tuple[int, int, int], buffer: int | None
) -> None:
    counts = [InFlight() for _ in workers]
    n = 300
    pipeline = Pipeline.from_iter(range(n))
    for index, (count, w) in enumerate(zip(counts, workers, strict=True)):
        if buffer is not None:
            pipeline = pipeline.backpressure(buffer)
        kind = pipeline.filter if index == 1 else pipeline.map
        pipeline = kind(count.wrap(_yield if index != 1 else lambda x: True), workers=w, ordered=False)
    with pipeline.start() as run:
        assert sorted(run) == list(range(n))
        run.join()
    for count, w, stat in zip(counts, workers, run.stats(), strict=True):
        assert count.most <= w
        assert stat.concurrency <= w
        assert stat.items_in == n and stat.items_out == n and stat.in_flight == 0
        assert stat.cpu_seconds is not None


class Boom(Exception):
    pass


@pytest.mark.parametrize("at", [0, 57, 299])
def test_an_exception_in_a_carried_call_is_raised_as_itself(at: int) -> None:
    def second(item: int) -> int:
        if item == at:
            raise Boom(item)
        return item

    pipeline = (
        Pipeline.from_iter(range(300))
        .map(_yield, workers=8, ordered=False)
        .map(second, workers=8, ordered=False, name="second")
        .map(_yield, workers=8, ordered=False)
    )
    with pytest.raises(Boom) as info:
        list(pipeline)
    assert info.value.args == (at,)


def test_an_early_break_while_calls_are_carried_does_not_hang() -> None:
    gate = threading.Event()

    def held(item: int) -> int:
        if item >= 20:
            gate.wait(10)
        # Not a cheap call: a stage of calls measured cheap shrinks to one worker taking batches,
        # and a batch holding a gated item holds the early items in it back with it (seen: the
        # first five outputs waited for the gate, a 10 s call after another).
        return _yield(item)

    pipeline = (
        Pipeline.from_iter(range(1000))
        .map(_yield, workers=16, ordered=False)
        .map(held, workers=16, ordered=False)
        .map(_yield, workers=16, ordered=False)
    )
    run = pipeline.start()
    seen = 0
    for _ in run:
        seen += 1
        if seen == 5:
            break
    run.cancel()
    gate.set()
    run.join(timeout=10)  # raises TimeoutError if a thread hangs


def _keep(item: Tracked) -> Tracked:
    threading.Event().wait(0.0002)
    return item


@pytest.mark.parametrize(
    "shape",
    [
        # (workers, buffer before the stage) per stage: wide stages after narrow ones with big
        # buffers, and the other way round, so carried batches of every size meet every place.
        ((2, 32), (8, 1), (4, 2)),
        ((8, 8), (32, 1), (2, 16)),
        ((16, 4), (16, 4), (16, 4)),
        ((1, 32), (4, 32), (64, 1)),
        ((64, 2), (64, 2), (64, 2)),
    ],
)
def test_a_run_with_carried_batches_holds_no_more_than_buffer_bound(
    shape: tuple[tuple[int, int], ...],
) -> None:
    tracker = Tracker()
    source = (Tracked(tracker, i) for i in range(400))
    pipeline: Pipeline[Any] = Pipeline.from_iter(source)
    for workers, buffer in shape:
        pipeline = pipeline.backpressure(buffer).map(_keep, workers=workers, ordered=False)
    pipeline = pipeline.backpressure(2)
    problem = check_bound(pipeline, tracker)
    assert problem is None, problem


class _Run:
    def thread_started(self) -> None:
        pass

    def thread_exited(self) -> None:
        pass


class _Scope:
    def __init__(self) -> None:
        self.cancelled = [False]


def test_a_crew_counts_borrowed_and_away_places_and_a_thread_back_waits_for_one() -> None:
    from threadpipe._threads import Crew

    crew = Crew("t", _Run(), _Scope(), None)  # type: ignore[arg-type]
    assert crew._reserve(2, 2) == 0  # two threads of its own: full
    assert crew.full(2) and not crew.borrow(2)
    crew.go_away()  # one of them runs the next stage's calls: its place is free
    assert not crew.full(2) and crew.borrow(2)  # and a thread of the stage before takes it
    assert crew.busy == 2 and crew.most == 2
    back = threading.Event()

    def come_back() -> None:
        crew.come_back(2)
        back.set()

    assert not crew.awaited
    thread = threading.Thread(target=come_back)
    thread.start()
    assert not back.wait(0.05)  # no place: it waits (nothing is decided by the wait's length)
    pause = threading.Event()  # never set: a bounded poll, 10 s at most
    for _ in range(10_000):  # its wait shows, for the next carry to see
        if crew.awaited:
            break
        pause.wait(0.001)
    assert crew.awaited and crew.full(2)
    crew.give_back()  # the borrowed place is given back: the waiting thread takes it
    assert back.wait(10)
    thread.join(10)
    assert (crew.busy, crew.away, crew.borrowed, crew.most) == (2, 0, 0, 2)
    assert not crew.awaited


def test_a_thread_waiting_for_its_place_back_goes_on_when_the_stage_is_cancelled() -> None:
    from threadpipe._threads import Crew

    scope = _Scope()
    crew = Crew("t", _Run(), scope, None)  # type: ignore[arg-type]
    assert crew._reserve(1, 1) == 0
    crew.go_away()
    assert crew.borrow(1)
    back = threading.Event()
    thread = threading.Thread(target=lambda: (crew.come_back(1), back.set()))
    thread.start()
    assert not back.wait(0.05)
    scope.cancelled[0] = True
    crew._exit(False)  # a thread leaving wakes it; the cancel lets it go on
    assert back.wait(10)
    thread.join(10)


_WAIT = 10.0  # what must happen does so in milliseconds: this long only bounds a defect


def _outputs_or_hang(run: Run[Any]) -> list[Any]:
    """The run's outputs; the test fails if they have not ended within ``_WAIT`` (a hang).

    Read, not joined: a run whose end no thread passes on has every thread exited, so ``join()``
    returns; only its reader waits.
    """
    read = threading.Event()
    hung: list[bool] = []

    def watchdog() -> None:
        if not read.wait(_WAIT):
            hung.append(True)
            run.cancel()  # the reader's wait ends quietly
            # Unless every thread has exited (no thread was left to pass the end on): cancel()
            # does nothing to a run that is done, and the reader is let go by its stop flag.
            run._state.scope.cancel()

    watcher = threading.Thread(target=watchdog, name="test-watchdog")
    watcher.start()
    try:
        outputs = list(run)
    finally:
        read.set()
        watcher.join()
    if hung:
        pytest.fail(f"hang: no end of the outputs within {_WAIT} s, after {outputs}: {run.stats()}")
    return outputs


@pytest.mark.parametrize("kind", ["map", "filter", "each"])
def test_batches_carried_in_before_a_stage_starts_leave_it_a_thread_for_the_end(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage whose start() runs while the stage before has finished its batches still ends.

    The race of a defect seen once in CI: the workers of the stage before carried batches into a
    thread stage before its ``start()`` ran; with every place borrowed, ``start()`` started no
    worker, and nobody was left to read the end of input: the run hung. Here ``b``'s start is held
    until two of its calls are in flight, its two places, and the calls are held until the start
    is done, so the carried batches (if any are carried) take every place when it runs.
    """
    from threadpipe._stage import Stage

    tracker = Tracker()
    lock = threading.Lock()
    callers: list[str] = []  # the threads that made b's calls
    both_in = threading.Event()  # two calls of b in flight: every place of b taken
    started = threading.Event()  # b's start() has returned
    # Items 0 and 1 are in a's calls at once, so that a's two threads finish a batch each.
    together = threading.Barrier(2)

    def first(x: int) -> Tracked:
        together.wait(_WAIT)
        return Tracked(tracker, x)  # one live object per item from here on

    def second(item: Tracked) -> Any:
        with lock:
            callers.append(threading.current_thread().name)
            if len(callers) == 2:
                both_in.set()
        started.wait(_WAIT)
        return True if kind == "filter" else item

    original = Stage.start

    def held_start(self: Stage) -> None:
        if self.spec.name == "b":
            # Carried in, the calls are the stage before's threads'; otherwise b's own workers,
            # which items piling up in its input start before start() does.
            try:
                assert both_in.wait(_WAIT), f"b's calls in flight before its start: {callers}"
                original(self)
            finally:
                started.set()
        else:
            original(self)

    monkeypatch.setattr(Stage, "start", held_start)
    # a has a third place, left free: a stage at its limit with the end waiting in its input
    # hands its outputs on instead of carrying them. Two items make a's second thread start (the
    # first worker takes one and leaves one) and none is left waiting behind them.
    pipeline = getattr(
        Pipeline.from_iter([0, 1]).map(first, workers=3, ordered=False, name="a"), kind
    )(second, workers=2, ordered=False, name="b")
    bound = pipeline.buffer_bound()
    run = pipeline.start()
    assert sorted(item.value for item in _outputs_or_hang(run)) == [0, 1]
    run.join(timeout=_WAIT)
    assert tracker.peak <= bound
    # And the fix's way: nothing is carried into a stage before its first worker runs.
    assert all(name.startswith("threadpipe-b-") for name in callers[:2]), callers
    a, b = run.stats()
    assert (a.items_in, a.items_out, b.items_in, b.items_out) == (2, 2, 2, 2)
    assert a.concurrency <= 3 and b.concurrency <= 2
    assert b.in_flight == 0
