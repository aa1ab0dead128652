"""Faults injected around take_while, skip_while, group_by, concat, over and filter(None).

Random chains of the new operators (hypothesis) run with one fault each: a predicate or key that
raises at its k-th call, a consumer that breaks, a loop body that raises, a cancel from another
thread. Whatever happens, the run ends, leaves no thread behind, closes a generator source, delivers
a prefix of what plain Python gives (all of it without a fault), and a failure reaches the caller as
the very exception injected, noted with the stage and the item. Then the same promises one by one:
take after them, cancel while group_by waits on a deadline, the buffer bound, and failed runs freed
by reference counting alone.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from threadpipe import Pipeline, Run
from threadpipe._threads import settle

from sources import Endless
from test_operators import reference_groups
from tracked import Tracked, Tracker, check_bound, tracked_source

JOIN = 10.0


class Injected(Exception):
    """The fault a test injects; each case raises a fresh one and checks it gets that object back."""


def threadpipe_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("threadpipe-")]


def wait_no_threads(before: set[str], cap: float = JOIN) -> list[str]:
    """Wait until no threadpipe thread but those in ``before`` runs; those still running after ``cap``."""
    deadline = time.monotonic() + cap
    while True:
        left = [name for name in threadpipe_threads() if name not in before]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.005)


# ---------------------------------------------------------------------------------- the cases


@dataclass
class Fault:
    """A function of the chain that raises ``error`` at its ``at``-th call (from 0) in a run."""

    at: int
    error: Injected = field(default_factory=lambda: Injected("injected"))
    calls: int = 0
    item: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def faulty(x: Any) -> Any:
            with self.lock:
                k = self.calls
                self.calls += 1
            if k == self.at:
                self.item = x
                raise self.error
            return fn(x)

        return faulty


def _below(limit: int) -> Callable[[int], bool]:
    return lambda x: x < limit


def _mod(arg: int) -> Callable[[int], int]:
    keys = arg % 7 + 1
    return lambda x: x % keys


class Finite:
    """A generator source of ``n`` ints that records when its ``finally`` ran (exhausted or closed)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[int]:
        try:
            yield from range(self.n)
        finally:
            self.closed.set()


def _values(group: tuple[Hashable, list[int]]) -> list[int]:
    return group[1]


# Each operator: how to add it to a pipeline (with its function, maybe faulty) and its plain-Python
# equivalent over a list. The function is the one a fault can be injected into.
Op = tuple[str, int, int]  # (name, parameter, workers)


def add(p: Pipeline[Any], op: Op, fn: Callable[[Any], Any] | None) -> Pipeline[Any]:
    name, arg, workers = op
    if name == "take_while":
        return p.take_while(fn or _below(arg))
    if name == "skip_while":
        return p.skip_while(fn or _below(arg))
    if name == "group_by":
        return p.group_by(fn or _mod(arg), 3, max_open=2).flat_map(_values, workers=workers)
    if name == "filter_none":
        return p.map(fn or _mod(arg), workers=workers).filter()
    if name == "take":
        return p.take(arg)
    assert name == "map_timeout"
    return p.map(fn or (lambda x: x), workers=workers, timeout=JOIN)


def plain(data: list[int], op: Op) -> list[int]:
    name, arg, _ = op
    if name == "take_while":
        return list(itertools.takewhile(_below(arg), data))
    if name == "skip_while":
        return list(itertools.dropwhile(_below(arg), data))
    if name == "group_by":
        return [x for _, group in reference_groups(data, _mod(arg), 3, 2) for x in group]
    if name == "filter_none":
        return list(filter(None, map(_mod(arg), data)))
    if name == "take":
        return data[:arg]
    return list(data)


op_st = st.tuples(
    st.sampled_from(["take_while", "skip_while", "group_by", "filter_none", "take", "map_timeout"]),
    st.integers(0, 60),
    st.integers(1, 4),
)

fault_st = st.one_of(
    st.none(),
    st.tuples(st.just("call"), st.integers(0, 5), st.integers(0, 10)),  # stage index, k-th call
    st.tuples(st.sampled_from(["break", "body", "cancel"]), st.just(0), st.integers(0, 8)),
)


def build(
    source: str, data: list[int], ops: list[Op], faulty: dict[int, Fault], gen: Finite | None
) -> Pipeline[Any]:
    if source == "list":
        p: Pipeline[Any] = Pipeline.from_iter(data)
    elif source == "generator":
        assert gen is not None
        p = Pipeline.from_iter(iter(gen))
    elif source == "concat":
        half = len(data) // 2
        p = Pipeline.concat(Pipeline.from_iter(data[:half]), Pipeline.from_iter(data[half:]).map(lambda x: x, workers=2))
    else:
        p = Pipeline.from_iter([])
    for i, op in enumerate(ops):
        fault = faulty.get(i)
        base: Callable[[Any], Any] | None = None
        if fault is not None:
            name, arg, _ = op
            base = {"take_while": _below(arg), "skip_while": _below(arg), "group_by": _mod(arg),
                    "filter_none": _mod(arg), "map_timeout": lambda x: x}.get(name)
            base = None if base is None else fault.wrap(base)
        p = add(p, op, base)
    return p.over(data) if source == "over" else p


@pytest.mark.timeout(300)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.lists(st.integers(0, 60), max_size=120),
        st.integers(100, 2000).map(lambda n: [i * 7 % 61 for i in range(n)]),  # long runs
    ),
    source=st.sampled_from(["list", "generator", "concat", "over"]),
    ops=st.lists(op_st, min_size=1, max_size=4),
    fault=fault_st,
)
def test_random_chains_of_the_new_operators_under_faults(
    data: list[int], source: str, ops: list[Op], fault: tuple[str, int, int] | None
) -> None:
    before = set(threadpipe_threads())
    gen = Finite(len(data)) if source == "generator" else None
    if gen is not None:
        data = list(range(len(data)))  # what it yields
    faulty: dict[int, Fault] = {}
    if fault is not None and fault[0] == "call" and ops[fault[1] % len(ops)][0] != "take":
        faulty[fault[1] % len(ops)] = Fault(fault[2])
    expected = list(data)
    for op in ops:
        expected = plain(expected, op)

    pipeline = build(source, data, ops, faulty, gen)
    run = pipeline.start()
    out: list[Any] = []
    raised: BaseException | None = None
    body_error = Injected("loop body")
    try:
        for x in run:
            if fault is not None and len(out) == fault[2]:
                if fault[0] == "break":
                    break
                if fault[0] == "body":
                    raise body_error
                if fault[0] == "cancel":
                    threading.Thread(target=run.cancel, name="test-cancel").start()
            out.append(x)
    except BaseException as exc:
        raised = exc
    try:
        run.join(JOIN)
    except Injected:
        pass

    assert run.done, "the run did not end"
    left = wait_no_threads(before)
    assert not left, f"threads left running: {left}"
    assert out == expected[: len(out)], "not a prefix of plain Python's output"
    if gen is not None:  # exhausted, or closed by the feeder when the run stopped early
        assert gen.closed.wait(JOIN), "the generator source was not closed"
    injected = [f for f in faulty.values() if f.calls > f.at]
    event(f"fault {fault and fault[0]}: {type(raised).__name__}, cancelled={run.cancelled}")
    if raised is body_error:
        pass  # the loop's own exception, as itself; the run was cancelled (unless it was over)
    elif raised is not None:
        assert any(raised is f.error for f in injected), f"not the injected exception: {raised!r}"
        fault_of = next(f for f in injected if f.error is raised)
        assert any(f"while processing item {fault_of.item!r}" in note for note in raised.__notes__)
    elif fault is None or fault[0] == "call" or len(expected) <= fault[2]:
        # No fault; a call fault never reached, or ignored after a cut; a consumer's fault that
        # never came: all of the output.
        assert out == expected


# ---------------------------------------------------------------------------------- one by one


@pytest.mark.parametrize(
    "build_op",
    [
        lambda p, fn: p.take_while(fn),
        lambda p, fn: p.skip_while(fn),
        lambda p, fn: p.group_by(fn, 4),
    ],
    ids=["take_while", "skip_while", "group_by"],
)
def test_a_failure_in_pred_or_key_is_raised_as_itself_naming_the_stage_and_the_item(
    build_op: Callable[[Pipeline[int], Callable[[int], Any]], Pipeline[Any]],
) -> None:
    src = Endless()
    err = Injected("broke")

    def fn(x: int) -> bool:
        if x == 7:
            raise err
        return True

    with pytest.raises(Injected) as info:
        build_op(Pipeline.from_iter(iter(src)).map(lambda x: x, workers=3), fn).to_list()
    assert info.value is err
    name = build_op(Pipeline.from_iter([]), fn).stage_names[0]
    assert info.value.__notes__ == [f"threadpipe: raised in stage {name!r} while processing item 7"]
    assert src.closed.wait(JOIN)


def test_an_unhashable_key_fails_the_run_naming_the_item() -> None:
    with pytest.raises(TypeError, match="unhashable") as info:
        Pipeline.from_iter([1, 2]).group_by(lambda x: [x], 2).to_list()
    assert info.value.__notes__ == ["threadpipe: raised in stage 'group_by' while processing item 1"]


@pytest.mark.parametrize(
    "build_op",
    [
        lambda p: p.take_while(lambda x: True),
        lambda p: p.skip_while(lambda x: x < 3),
        lambda p: p.group_by(lambda x: x % 3, 2).flatten(),
        lambda p: p.filter(),
    ],
    ids=["take_while", "skip_while", "group_by", "filter_none"],
)
def test_take_after_the_new_operators_stops_them_and_the_source(
    build_op: Callable[[Pipeline[int]], Pipeline[Any]],
) -> None:
    src = Endless()
    run = build_op(Pipeline.from_iter(iter(src)).map(lambda x: x, workers=2)).take(5).start()
    assert len(list(run)) == 5
    run.join(JOIN)
    assert src.closed.wait(JOIN)
    assert run.exception is None and not run.cancelled


def test_a_cancel_wakes_group_by_waiting_for_a_deadline() -> None:
    gate = threading.Event()

    def source() -> Iterator[int]:
        yield 1
        gate.wait(30)  # stalls, until the test lets it go

    run = Pipeline.from_iter(source()).group_by(lambda x: x, 10, timeout=20).start()
    try:
        time.sleep(0.02)  # only makes the cancel likely to find the stage waiting on its deadline
        run.cancel()
        deadline = time.monotonic() + JOIN
        while "threadpipe-group_by-0" in threadpipe_threads() and time.monotonic() < deadline:
            time.sleep(0.005)
        # It left at once (the deadline is 20 s away), while the source is still stuck.
        assert "threadpipe-group_by-0" not in threadpipe_threads()
        assert not gate.is_set()
    finally:
        gate.set()
    run.join(JOIN)


def test_breaking_out_of_a_loop_over_take_while_from_an_infinite_source() -> None:
    src = Endless()
    for x in Pipeline.from_iter(iter(src)).skip_while(lambda x: x < 10).take_while(lambda x: True):
        if x == 20:
            break
    assert src.closed.wait(JOIN)


# ---------------------------------------------------------------------------------- the bound


def _key(x: Tracked) -> int:
    return x.value % 7


def _members(group: tuple[int, list[Tracked]]) -> list[Tracked]:
    return group[1]


_BOUND_CASES: dict[str, Callable[[Tracker], Pipeline[Any]]] = {
    "group_by": lambda t: Pipeline.from_iter(tracked_source(t, 2000)).group_by(_key, 10, max_open=5).flat_map(_members),
    "group_by_n_1": lambda t: Pipeline.from_iter(tracked_source(t, 500)).group_by(_key, 1).flat_map(_members),
    "group_by_many_open": lambda t: Pipeline.from_iter(tracked_source(t, 2000)).backpressure(4).group_by(_key, 50, max_open=3).flat_map(_members),
    "take_while": lambda t: Pipeline.from_iter(tracked_source(t, 500)).take_while(lambda x: x.value < 400),
    "skip_while": lambda t: Pipeline.from_iter(tracked_source(t, 500)).skip_while(lambda x: x.value < 100),
    "concat": lambda t: Pipeline.concat(
        Pipeline.from_iter(tracked_source(t, 300)).map(lambda x: x, workers=4),
        Pipeline.from_iter(tracked_source(t, 300)),
    ),
}


@pytest.mark.parametrize("case", sorted(_BOUND_CASES))
def test_a_run_holds_no_more_items_than_buffer_bound(case: str) -> None:
    tracker = Tracker()
    pipeline = _BOUND_CASES[case](tracker)
    problem = check_bound(pipeline, tracker, join_timeout=JOIN)
    assert problem is None, problem


def test_group_by_bound_is_reached_and_not_exceeded_when_groups_pile_up() -> None:
    """Many keys, a slow reader: the open groups fill towards n * max_open, never past the bound."""
    tracker = Tracker()
    pipeline = Pipeline.from_iter(tracked_source(tracker, 3000)).group_by(_key, 100, max_open=7).flat_map(_members)
    assert check_bound(pipeline, tracker, join_timeout=JOIN) is None
    assert tracker.peak > 7 * 50  # the groups really held many items: the bound was put to use


# ---------------------------------------------------------------------------------- freed


def _fail_at(k: int) -> Callable[[Any], bool]:
    """True for each call but the k-th, which raises."""
    calls = itertools.count()

    def fn(x: Any) -> bool:
        if next(calls) == k:
            raise Injected(f"call {k}")
        return True

    return fn


_FREED_CASES: dict[str, Callable[[], Pipeline[Any]]] = {
    "take_while": lambda: Pipeline.from_iter(range(500)).take_while(_fail_at(100)),
    "skip_while": lambda: Pipeline.from_iter(range(500)).skip_while(_fail_at(100)),
    "group_by": lambda: Pipeline.from_iter(range(500)).group_by(_fail_at(100), 3),
    "concat": lambda: Pipeline.concat(Pipeline.from_iter(range(50)), Pipeline.from_iter(range(500)).map(_fail_at(100))),
    "timed_map": lambda: Pipeline.from_iter(range(500)).map(_fail_at(100), timeout=JOIN, workers=2),
    "timed_flat_map": lambda: Pipeline.from_iter(range(500)).flat_map(lambda x, f=_fail_at(100): [f(x)], timeout=JOIN),
}


@pytest.mark.parametrize("case", sorted(_FREED_CASES))
def test_a_failed_run_is_freed_by_reference_counting(case: str) -> None:
    before = set(threadpipe_threads())
    gc.collect()
    gc.disable()
    try:
        run: Run[Any] | None = _FREED_CASES[case]().start()
        assert run is not None
        refs = [weakref.ref(run), weakref.ref(run._state)]
        try:
            for _ in run:
                pass
        except Injected as exc:
            refs.append(weakref.ref(exc))
            del exc
        else:
            pytest.fail("the run did not fail")
        try:
            run.join(JOIN)
        except Injected:
            pass
        run = None
        assert not wait_no_threads(before)
        # A pooled thread takes the run's name off before its frames let go of the run.
        assert settle(JOIN), "a pooled thread did not return from its job"
        assert [ref() for ref in refs] == [None] * len(refs)
    finally:
        gc.enable()
