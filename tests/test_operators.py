"""Stream-shaping operators: batch, flatten, enumerate, take, skip, pipe, relief_valve, take_while,
skip_while, group_by, filter(None); against plain Python where it has an equivalent."""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
        (lambda p: p.take_while(3), TypeError, r"take_while\(\): pred must be callable, got 3"),
        (lambda p: p.skip_while(None), TypeError, r"skip_while\(\): pred must be callable, got None"),
        (lambda p: p.group_by("k", 2), TypeError, r"group_by\(\): key must be callable, got 'k'"),
        (lambda p: p.group_by(str, 0), ValueError, r"group_by\(\): n must be an int >= 1, got 0"),
        (lambda p: p.group_by(str, 2.0), TypeError, r"group_by\(\): n must be an int >= 1, got 2.0"),
        (lambda p: p.group_by(str, 2, max_open=0), ValueError, r"group_by\(\): max_open must be an int >= 1, got 0"),
        (lambda p: p.group_by(str, 2, max_open=True), TypeError, r"group_by\(\): max_open must be an int >= 1, got True"),
        (lambda p: p.group_by(str, 2, timeout=0), ValueError, r"group_by\(\): timeout must be a number of seconds > 0 or None, got 0"),
        (lambda p: p.group_by(str, 2, timeout=float("inf")), ValueError, r"group_by\(\): timeout .* got inf"),
        (lambda p: p.group_by(str, 2, timeout="1"), TypeError, r"group_by\(\): timeout .* got '1'"),
        (lambda p: p.batch(2, timeout=float("nan")), ValueError, r"batch\(\): timeout .* got nan"),
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


# ---------------------------------------------------------------------------------- take_while, skip_while


# Predicates with a threshold, so that hypothesis can put the first false item anywhere.
def below(limit: int) -> Callable[[int], bool]:
    return lambda x: x < limit


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.integers(0, 100), max_size=150),
    limit=st.integers(0, 101),
    workers=st.integers(1, 4),
    buffer=st.integers(1, 8),
)
def test_take_while_and_skip_while_match_itertools(data: list[int], limit: int, workers: int, buffer: int) -> None:
    upstream = Pipeline.from_iter(data).backpressure(buffer).map(lambda x: x, workers=workers)
    assert upstream.take_while(below(limit)).to_list() == list(itertools.takewhile(below(limit), data))
    assert upstream.skip_while(below(limit)).to_list() == list(itertools.dropwhile(below(limit), data))


def test_take_while_ends_the_run_and_stops_an_infinite_source() -> None:
    src = Endless()
    run = Pipeline.from_iter(iter(src)).map(lambda x: x * 2, workers=3).take_while(lambda x: x < 10).map(str).start()
    assert list(run) == ["0", "2", "4", "6", "8"]
    run.join(10)
    assert src.closed.wait(10)
    assert run.exception is None and not run.cancelled


def test_skip_while_calls_pred_up_to_the_first_false_item_only() -> None:
    seen: list[int] = []

    def pred(x: int) -> bool:
        seen.append(x)
        return x < 3

    assert Pipeline.from_iter([0, 1, 5, 2, 1, 7]).skip_while(pred).to_list() == [5, 2, 1, 7]
    assert seen == [0, 1, 5]


def test_take_while_calls_pred_in_input_order_up_to_the_first_false_item() -> None:
    seen: list[int] = []

    def pred(x: int) -> bool:
        seen.append(x)
        return x != 4

    assert Pipeline.from_iter(range(10)).take_while(pred).to_list() == [0, 1, 2, 3]
    assert seen[:5] == [0, 1, 2, 3, 4] and len(seen) == 5


# ---------------------------------------------------------------------------------- group_by


def reference_groups(
    items: list[Any], key: Callable[[Any], Hashable], n: int, max_open: int
) -> list[tuple[Hashable, list[Any]]]:
    """group_by without a timeout, written the obvious way, one item at a time."""
    groups: OrderedDict[Hashable, list[Any]] = OrderedDict()
    out: list[tuple[Hashable, list[Any]]] = []
    for item in items:
        k = key(item)
        groups.setdefault(k, []).append(item)
        if len(groups[k]) == n:
            out.append((k, groups.pop(k)))
        elif len(groups) > max_open:
            out.append(groups.popitem(last=False))
    return out + list(groups.items())


def test_group_by_emits_full_groups_then_every_open_one_oldest_first() -> None:
    words = ["apple", "bee", "avocado", "cat", "banana", "apricot", "cherry", "blue"]
    out = Pipeline.from_iter(words).group_by(lambda w: w[0], 2).to_list()
    assert out == [
        ("a", ["apple", "avocado"]),
        ("b", ["bee", "banana"]),
        ("c", ["cat", "cherry"]),
        ("a", ["apricot"]),  # opened before "blue"'s group: oldest first at the end
        ("b", ["blue"]),
    ]


def test_group_by_sends_the_oldest_group_when_more_than_max_open_are_open() -> None:
    out = Pipeline.from_iter([1, 2, 3, 11, 4]).group_by(lambda x: x % 10, 5, max_open=2).to_list()
    assert out == [(1, [1]), (2, [2]), (3, [3]), (1, [11]), (4, [4])]
    assert out == reference_groups([1, 2, 3, 11, 4], lambda x: x % 10, 5, 2)


@settings(max_examples=80, deadline=None)
@given(
    data=st.lists(st.integers(0, 50), max_size=200),
    keys=st.integers(1, 9),
    n=st.integers(1, 6),
    max_open=st.integers(1, 10),
    workers=st.integers(1, 3),
    buffer=st.integers(1, 8),
)
def test_group_by_matches_plain_grouping(
    data: list[int], keys: int, n: int, max_open: int, workers: int, buffer: int
) -> None:
    def key(x: int) -> int:
        return x % keys

    out = (
        Pipeline.from_iter(data).map(lambda x: x, workers=workers).backpressure(buffer)
        .group_by(key, n, max_open=max_open).to_list()
    )
    assert out == reference_groups(data, key, n, max_open)
    # And what any grouping must be: each item once, each group of one key, in arrival order.
    assert sorted(x for _, group in out for x in group) == sorted(data)
    for k, group in out:
        assert 1 <= len(group) <= n and all(key(x) == k for x in group)
    if max_open >= keys:  # nothing goes out early: the groups are each key's items, n at a time
        chunks = {k: [x for x in data if key(x) == k] for k in range(keys)}
        assert sorted((k, g) for k, g in out) == sorted(
            (k, c[i : i + n]) for k, c in chunks.items() for i in range(0, len(c), n)
        )


def test_group_by_timeout_sends_a_partial_group_while_the_source_waits() -> None:
    release = threading.Event()

    def source() -> Iterator[str]:
        yield "a1"
        yield "b1"
        yield "a2"
        release.wait(10)  # the source stalls: only the timeout can move the groups on
        yield "a3"

    # Long enough that "a2" joins "a1" even on a loaded machine; the stall is what decides.
    run = Pipeline.from_iter(source()).group_by(lambda s: s[0], 10, timeout=0.5).start()
    it = iter(run)
    assert next(it) == ("a", ["a1", "a2"])
    assert next(it) == ("b", ["b1"])
    release.set()
    assert list(it) == [("a", ["a3"])]
    run.join(10)


def test_group_by_timeout_also_applies_while_items_keep_coming() -> None:
    # A steady trickle never leaves the input empty for long: the deadline must still be seen.
    def source() -> Iterator[int]:
        pause = threading.Event()
        for i in range(40):
            pause.wait(0.005)
            yield i

    out = Pipeline.from_iter(source()).group_by(lambda x: 0, 1000, timeout=0.05).to_list()
    assert [x for _, group in out for x in group] == list(range(40))
    assert len(out) > 1  # the one key's group went out on its deadline before the end


def test_group_by_counts_its_groups_in_the_buffer_bound() -> None:
    plain = Pipeline.from_iter(iter(range(5))).buffer_bound()
    grouped = Pipeline.from_iter(iter(range(5))).group_by(str, 4, max_open=10)
    # The source's item, the stage's buffer and what it holds (a buffer's worth taken, the open
    # groups), and the output buffer twice, whose groups stand for 4 items each.
    assert grouped.buffer_bound() == 1 + 32 + (32 + 4 * 10) + 2 * 32 * 4
    assert plain == 1 + 2 * 32


# ---------------------------------------------------------------------------------- filter()


@pytest.mark.parametrize("workers", [1, 3])
def test_filter_without_a_predicate_keeps_truthy_items_like_the_builtin(workers: int) -> None:
    data: list[Any] = [0, 1, "", "a", None, [], [0], 0.0, 2, (), False, True]
    assert Pipeline.from_iter(data).filter(workers=workers).to_list() == list(filter(None, data))
    assert Pipeline.from_iter(data).filter(None).to_list() == list(filter(None, data))
    assert Pipeline.from_iter(data).filter().stage_names == ("filter",)
    assert Pipeline.from_iter(data).filter().filter(None).stage_names == ("filter", "filter2")
