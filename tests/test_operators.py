"""Stream-shaping operators: batch, flatten, enumerate, take, skip, pipe, relief_valve."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

import threadpipe as tp
from threadpipe import Pipeline

from sources import Endless


@pytest.mark.parametrize(("n", "size", "expected"), [(0, 3, []), (7, 3, [[0, 1, 2], [3, 4, 5], [6]]), (2, 5, [[0, 1]]), (6, 3, [[0, 1, 2], [3, 4, 5]])])
def test_batch_groups_items_and_emits_the_last_partial_batch(n: int, size: int, expected: list[list[int]]) -> None:
    assert Pipeline.from_iter(range(n)).batch(size).to_list() == expected


def test_batch_timeout_emits_a_partial_batch_while_the_source_waits() -> None:
    release = threading.Event()

    def source() -> Iterator[int]:
        yield 1
        yield 2
        release.wait(10)  # the source stalls: only the timeout can move the first batch on
        yield 3

    run = Pipeline.from_iter(source()).batch(10, timeout=0.05).start()
    it = iter(run)
    assert next(it) == [1, 2]
    release.set()
    assert list(it) == [[3]]
    run.join(10)


def test_flatten_is_the_inverse_of_batch() -> None:
    assert Pipeline.from_iter(range(10)).batch(3).flatten().to_list() == list(range(10))


def test_enumerate_numbers_items_in_arrival_order() -> None:
    assert Pipeline.from_iter("abc").enumerate().to_list() == [(0, "a"), (1, "b"), (2, "c")]


@pytest.mark.parametrize(("n", "data"), [(0, 5), (3, 5), (5, 5), (9, 5), (3, 0)])
def test_skip_and_take_on_finite_input(n: int, data: int) -> None:
    assert Pipeline.from_iter(range(data)).skip(n).to_list() == list(range(data))[n:]
    assert Pipeline.from_iter(range(data)).take(n).to_list() == list(range(data))[:n]


def test_take_ends_the_run_and_stops_an_infinite_source() -> None:
    src = Endless()
    p = Pipeline.from_iter(iter(src)).map(lambda x: x * 2, workers=3).take(5).map(lambda x: x + 1)
    run = p.start()
    assert list(run) == [1, 3, 5, 7, 9]
    run.join(10)
    assert src.closed.wait(10)
    assert run.exception is None and not run.cancelled


def test_take_zero_pulls_nothing_it_does_not_need() -> None:
    src = Endless()
    assert Pipeline.from_iter(iter(src)).take(0).to_list() == []
    assert src.closed.wait(10)


def test_upstream_failures_after_take_do_not_fail_the_run() -> None:
    runs: list[tp.Run[int]] = []
    halted = threading.Event()
    started = threading.Event()  # the run object is in ``runs``

    def fn(x: int) -> int:
        # Calls that take a while keep batches at one item, so items 0-2 never wait behind 3+.
        time.sleep(0.002)
        if x >= 3:
            # In flight when take() has its 3 items and cuts upstream off; failing then is moot.
            started.wait(10)
            while not runs[0]._state.segments[0].cancelled[0]:
                halted.wait(0.001)
            raise RuntimeError("nobody needs this item")
        return x

    run = Pipeline.from_iter(range(100)).map(fn, workers=4, ordered=False).take(3).each(lambda x: None).start()
    runs.append(run)
    started.set()
    out = list(run)
    run.join(10)
    assert sorted(out) == [0, 1, 2]
    assert run.exception is None


def test_pipe_runs_a_stateful_generator_over_the_stream() -> None:
    def running_total(items: Iterator[int]) -> Iterator[int]:
        total = 0
        for x in items:
            total += x
            yield total

    assert Pipeline.from_iter(range(5)).map(lambda x: x, workers=3).pipe(running_total).to_list() == [0, 1, 3, 6, 10]


def test_pipe_closes_the_generator_on_cancel_and_fails_as_itself() -> None:
    closed = threading.Event()

    def gen(items: Iterator[int]) -> Iterator[int]:
        try:
            for x in items:
                if x == 3:
                    raise KeyError(x)
                yield x
        finally:
            closed.set()

    with pytest.raises(KeyError) as info:
        Pipeline.from_iter(range(10)).pipe(gen, name="stateful").to_list()
    assert "stateful" in info.value.__notes__[0]
    assert closed.is_set()


def test_pipe_that_returns_early_ends_the_run_and_stops_the_source() -> None:
    src = Endless()
    assert Pipeline.from_iter(iter(src)).pipe(lambda items: itertools.islice(items, 2)).to_list() == [0, 1]
    assert src.closed.wait(10)


def test_relief_valve_never_blocks_upstream_and_drops_the_oldest() -> None:
    release = threading.Event()
    produced = threading.Event()

    def source() -> Iterator[int]:
        yield from range(100)
        produced.set()

    seen: list[int] = []

    def slow(x: int) -> int:
        release.wait(10)
        seen.append(x)
        return x

    run = Pipeline.from_iter(source()).relief_valve(5).map(slow).start()
    # The consumer stage is stuck, yet the source runs to its end: the valve never blocks it.
    assert produced.wait(10)
    release.set()
    out = list(run)
    run.join(10)
    stats = {s.name: s for s in run.stats()}
    dropped = stats["slow"].dropped
    assert dropped > 0 and len(out) + dropped == 100
    assert out[-5:] == list(range(95, 100))  # what the valve held at the end is delivered
    assert out == sorted(out)


def test_relief_valve_at_the_end_of_input_delivers_what_it_holds() -> None:
    assert Pipeline.from_iter(range(3)).relief_valve(10).to_list() == [0, 1, 2]


@pytest.mark.parametrize(
    ("call", "exc", "word"),
    [
        (lambda p: p.batch(0), ValueError, "n"),
        (lambda p: p.batch(2, timeout=0), ValueError, "timeout"),
        (lambda p: p.batch(2, timeout="1"), TypeError, "timeout"),
        (lambda p: p.take(-1), ValueError, "n"),
        (lambda p: p.skip(1.5), TypeError, "n"),
        (lambda p: p.relief_valve(0), ValueError, "n"),
        (lambda p: p.pipe(3), TypeError, "fn"),
    ],
)
def test_operators_check_their_arguments(call, exc, word) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=word):
        call(Pipeline.from_iter([1]))


def test_a_failure_downstream_of_a_batch_stops_everything() -> None:
    src = Endless()

    def fail(batch: list[int]) -> list[int]:
        if batch[0] >= 20:
            raise ValueError(batch)
        return batch

    with pytest.raises(ValueError) as info:
        Pipeline.from_iter(iter(src)).batch(4).map(fail, workers=2).run()
    assert info.value.args[0][0] >= 20
    assert src.closed.wait(10)
