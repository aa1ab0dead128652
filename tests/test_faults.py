"""Randomized fault injection: generated pipelines and faults, checked against invariants.

Every case builds a random chain of stages (thread and coroutine stages, ordered or not, with random
worker counts, buffer sizes, error policies and stream operators), feeds it random data, injects
random faults (a stage raising at its k-th call, a source raising at item k, a consumer that breaks,
raises in its loop body, is slow, or a ``cancel()`` from another thread once the consumer has seen k
items), and checks, with a hard time bound:

* the run ends: ``run.join(timeout=...)`` returns;
* no ``threadpipe-`` thread started by the case outlives it;
* without a fault, the output equals plain Python (in order when every stage is ordered, as a
  multiset otherwise); with one, what the caller gets is the injected object itself, and no item
  is delivered twice (the outputs are a sub-multiset of the reference, a prefix when ordered);
* a generator source is closed once the run has ended;
* the items a ``skip`` policy dropped (``run.errors``) are exactly those whose calls failed.

The default run (CI) tries a few hundred cases; ``-m soak`` tries ``THREADPIPE_SOAK_CASES``
(10,000 by default).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadpipe import Pipeline

# A run that has not ended this long after its consumer stopped is hung: no case needs a tenth of it.
_HANG_SECONDS = 10.0
# A thread that finished its run's accounting only has to return from its target function.
_THREAD_EXIT_SECONDS = 5.0

SOAK_CASES = int(os.environ.get("THREADPIPE_SOAK_CASES", "10000"))

# What the cases did, for the soak's figures: written as JSON to $THREADPIPE_SOAK_REPORT, if set.
OUTCOMES: Counter[str] = Counter()


class InjectedError(Exception):
    """An injected fault; each case makes fresh ones, so identity tells them apart."""


# ---------------------------------------------------------------------------------------- the model

# Element-wise operators: (pipeline method, function of one item, reference over a list).
_ELEMENTWISE: dict[str, tuple[str, Callable[[int], Any], Callable[[list[int]], list[int]]]] = {
    "map": ("map", lambda x: x * 3 + 1, lambda xs: [x * 3 + 1 for x in xs]),
    "halve": ("map", lambda x: x // 2, lambda xs: [x // 2 for x in xs]),
    "filter": ("filter", lambda x: x % 3 != 0, lambda xs: [x for x in xs if x % 3 != 0]),
    "flat_map": ("flat_map", lambda x: [x] * (x % 3), lambda xs: [y for x in xs for y in [x] * (x % 3)]),
    "each": ("each", lambda x: None, lambda xs: list(xs)),
}


@dataclass
class StageCase:
    """One generated element-wise stage, and the fault it carries.

    Attributes:
        op: a key of ``_ELEMENTWISE``.
        workers: the stage's workers (or coroutines in flight).
        ordered: whether the stage keeps order.
        buffer: ``backpressure(n)`` before the stage, or None.
        coroutine: run the function as an ``async def`` on the run's loop.
        fail_at: raise ``error`` at the stage's ``fail_at``-th call (from 0), or None.
        skip_mod: ``on_error="skip"``, failing every item ``x`` with ``x % skip_mod == 0``.
        slow: every call yields the interpreter lock for a moment, so workers interleave more.
        executor: run the calls on a shared ``ThreadPoolExecutor`` (``executor=``).
    """

    op: str
    workers: int
    ordered: bool
    buffer: int | None
    coroutine: bool
    fail_at: int | None
    skip_mod: int | None
    slow: bool = False
    executor: bool = False
    error: InjectedError = field(default_factory=lambda: InjectedError("stage fault"))
    fired: bool = False
    calls: int = 0
    failed_items: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, x: int) -> Any:
        """The stage's function: the operator, with this stage's fault injected."""
        with self.lock:
            n = self.calls
            self.calls += 1
            fire = self.fail_at is not None and n == self.fail_at and not self.fired
            if fire:
                self.fired = True
            if self.skip_mod is not None and x % self.skip_mod == 0:
                # Recorded before raising: the policy records the error right after the raise.
                self.failed_items.append(x)
                raise InjectedError(f"skipped {x}")
        if fire:
            raise self.error
        if self.slow:
            time.sleep(0.0001)  # only widens the windows for races; decides nothing
        return _ELEMENTWISE[self.op][1](x)


@dataclass
class OperatorCase:
    """A stream operator: ``batch`` + ``flatten``, ``take``, ``skip``, ``pipe`` or ``relief``."""

    op: str
    n: int
    buffer: int | None


@dataclass
class Case:
    """One generated pipeline, its data and the faults around it."""

    data: list[int]
    generator_source: bool
    source_fail_at: int | None
    stages: list[StageCase | OperatorCase]
    break_at: int | None
    raise_at: int | None
    cancel_at: int | None
    slow: bool
    source_error: InjectedError = field(default_factory=lambda: InjectedError("source fault"))
    body_error: InjectedError = field(default_factory=lambda: InjectedError("body fault"))


def _add_one(items: Iterator[int]) -> Iterator[int]:
    """A ``pipe`` stage: a generator over the whole stream."""
    for x in items:
        yield x + 1


def build(case: Case, closed: list[bool], executor: Executor | None = None) -> Pipeline[Any]:
    """The pipeline a case describes; ``closed`` gets True when a generator source is closed."""

    def source() -> Iterator[int]:
        try:
            for i, x in enumerate(case.data):
                if i == case.source_fail_at:
                    raise case.source_error
                yield x
        finally:
            closed.append(True)

    p: Pipeline[Any] = Pipeline.from_iter(source() if case.generator_source else list(case.data))
    for i, s in enumerate(case.stages):
        if s.buffer is not None:
            p = p.backpressure(s.buffer)
        if isinstance(s, OperatorCase):
            if s.op == "batch":
                p = p.batch(s.n).flatten()
            elif s.op == "take":
                p = p.take(s.n)
            elif s.op == "skip":
                p = p.skip(s.n)
            elif s.op == "pipe":
                p = p.pipe(_add_one)
            else:
                p = p.relief_valve(s.n)
            continue
        method = _ELEMENTWISE[s.op][0]
        fn: Callable[[int], Any] = s.call
        if s.coroutine:
            sync = s.call

            async def fn(x: int, sync: Callable[[int], Any] = sync) -> Any:
                return sync(x)

        kwargs: dict[str, Any] = {"workers": s.workers, "ordered": s.ordered, "name": f"s{i}"}
        if s.skip_mod is not None:
            kwargs["on_error"] = "skip"
        if s.executor:
            kwargs["executor"] = executor
        p = getattr(p, method)(fn, **kwargs)
    return p


@dataclass
class Expected:
    """What plain Python says: ``items``, and how far the run's output is pinned down by it.

    ``exact``: the output is ``items`` in order; ``multiset``: the same items in any order;
    otherwise the output is only a sub-multiset of ``items`` (operators that pick items by
    arrival order, or drop them, follow a stage that reorders).
    """

    items: list[int]
    exact: bool
    multiset: bool


def reference(case: Case) -> Expected:
    """Plain Python's output for the case without its injected faults (skips included)."""
    items = list(case.data)
    exact = multiset = True
    for s in case.stages:
        if isinstance(s, OperatorCase):
            if s.op == "relief":
                exact = multiset = False
            elif s.op == "pipe":
                items = [x + 1 for x in items]
            elif s.op in ("take", "skip"):
                if exact:
                    items = items[: s.n] if s.op == "take" else items[s.n :]
                else:
                    multiset = False  # which items pass depends on arrival order
            continue
        if s.skip_mod is not None:
            items = [x for x in items if x % s.skip_mod != 0]
        items = _ELEMENTWISE[s.op][2](items)
        if not s.ordered:
            exact = False
    return Expected(items, exact, multiset)


# ------------------------------------------------------------------------------------ strategies

stage_st = st.builds(
    StageCase,
    op=st.sampled_from(sorted(_ELEMENTWISE)),
    workers=st.integers(1, 8),
    ordered=st.booleans(),
    buffer=st.one_of(st.none(), st.integers(1, 8)),
    coroutine=st.just(False),  # drawn in case_st, about one stage in five
    fail_at=st.one_of(st.none(), st.just(0)),  # where: drawn in case_st, by size
    skip_mod=st.one_of(st.none(), st.none(), st.none(), st.integers(2, 7)),
)

operator_st = st.builds(
    OperatorCase,
    op=st.sampled_from(["batch", "take", "skip", "pipe", "relief"]),
    n=st.integers(1, 12),
    buffer=st.one_of(st.none(), st.integers(1, 8)),
)


@st.composite
def case_st(draw: st.DrawFn) -> Case:
    """A random pipeline with random faults; about one case in four has none."""
    stages = draw(
        st.lists(
            st.one_of(stage_st, stage_st, stage_st, operator_st),
            max_size=6,
        )
    )
    for s in stages:
        if isinstance(s, StageCase):
            s.slow = draw(st.integers(0, 5)) == 0
            if s.skip_mod is not None:
                s.fail_at = None  # the policy would skip the injected fault too
            else:
                # executor= takes no error policy and no coroutine function.
                s.executor = draw(st.integers(0, 7)) == 0
            s.coroutine = not s.executor and draw(st.integers(0, 4)) == 0
    faulty = draw(st.integers(0, 3)) > 0
    # Sized and seeded rather than drawn item by item: hypothesis favours short lists, and the
    # faults need items to land on.
    size = draw(st.sampled_from([0, 1, 5, 30, 100, 300, 1000]))
    seed = draw(st.integers(0, 2**16))
    data = [(seed + 7919 * k) * 104729 % 1001 for k in range(size)]
    for s in stages:
        if isinstance(s, StageCase) and s.fail_at is not None:
            s.fail_at = draw(st.integers(0, max(1, size)))
    if not faulty:
        for s in stages:
            if isinstance(s, StageCase):
                s.fail_at = None
    optional = st.one_of(st.none(), st.integers(0, max(1, size))) if faulty else st.none()
    return Case(
        data=data,
        generator_source=draw(st.booleans()),
        source_fail_at=draw(st.one_of(st.none(), st.none(), st.integers(0, size)) if faulty else st.none()),
        stages=stages,
        break_at=draw(st.one_of(st.none(), st.none(), optional)),
        raise_at=draw(st.one_of(st.none(), st.none(), optional)),
        cancel_at=draw(st.one_of(st.none(), st.none(), optional)),
        slow=draw(st.integers(0, 9)) == 0,
    )


# ------------------------------------------------------------------------------------ the check


def _run_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("threadpipe-")}


def check(case: Case, executor: Executor) -> None:
    """Run one case and assert every invariant."""
    if not case.generator_source:
        case.source_fail_at = None  # a list cannot fail
    closed: list[bool] = []
    before = _run_threads()
    pipeline = build(case, closed, executor)
    expected = reference(case)
    gate = threading.Event()
    run = pipeline.start()
    canceller: threading.Thread | None = None
    if case.cancel_at is not None:
        # Cancel from another thread once the consumer has seen ``cancel_at`` items: gated by an
        # event, so the moment is chosen by the data, not by a sleep.
        def cancel() -> None:
            if gate.wait(_HANG_SECONDS):
                run.cancel()

        canceller = threading.Thread(target=cancel, name="faults-canceller")
        canceller.start()
        if case.cancel_at == 0:
            gate.set()
    got: list[Any] = []
    raised: BaseException | None = None
    joined: BaseException | None = None
    started = time.monotonic()
    try:
        for x in run:
            got.append(x)
            if case.slow:
                time.sleep(0.0002)  # a slow consumer: makes full buffers likely, decides nothing
            if len(got) == case.cancel_at:
                gate.set()
            if len(got) == case.break_at:
                break
            if len(got) == case.raise_at:
                raise case.body_error
    except BaseException as exc:  # noqa: BLE001  # anything at all must be an injected object
        raised = exc
    finally:
        gate.set()  # the canceller must end even if the consumer never reached its item
        run.cancel()
    try:
        run.join(timeout=_HANG_SECONDS)
    except TimeoutError:
        pytest.fail(f"hang: run not done {_HANG_SECONDS} s after its consumer stopped: {case}")
    except BaseException as exc:  # noqa: BLE001
        joined = exc
    if canceller is not None:
        canceller.join(_HANG_SECONDS)
        assert not canceller.is_alive()
    elapsed = time.monotonic() - started
    assert run.done

    # No thread of the run survives join(): each has done its accounting, so it only has to return.
    for t in _run_threads() - before:
        t.join(_THREAD_EXIT_SECONDS)
        assert not t.is_alive(), f"thread {t.name} outlived its run: {case}"

    if case.generator_source:
        assert closed == [True], f"generator source not closed ({closed}): {case}"

    stage_cases = [s for s in case.stages if isinstance(s, StageCase)]
    source_fired = case.source_fail_at is not None and case.source_fail_at < len(case.data)
    injected = [s.error for s in stage_cases if s.fired]
    if source_fired:
        injected.append(case.source_error)
    consumer_fault = raised is case.body_error
    if consumer_fault:
        injected.append(case.body_error)
    for exc in (raised, joined):
        assert exc is None or any(exc is e for e in injected), (
            f"the caller got {exc!r}, not an injected object ({injected!r}) after {elapsed:.2f} s: {case}"
        )

    # No item twice, none made up; ordered all the way: a prefix of plain Python's output.
    assert not Counter(got) - Counter(expected.items), f"outputs not in the reference: {case}"
    if expected.exact:
        assert got == expected.items[: len(got)], f"order broken: {case}"

    stopped_early = (
        case.cancel_at is not None
        or (case.break_at is not None and len(got) == case.break_at)
        or consumer_fault
    )
    cut = any(isinstance(s, OperatorCase) and s.op == "take" for s in case.stages)
    if injected and not stopped_early and not cut:
        # A failure nobody cut off reaches the caller, from the loop, as the injected object.
        assert raised is not None, f"failure {injected!r} lost: {case}"
    if not injected and not stopped_early:
        assert raised is None and joined is None
        if expected.exact:
            assert got == expected.items, case
        elif expected.multiset:
            assert Counter(got) == Counter(expected.items), case

    OUTCOMES["cases"] += 1
    OUTCOMES["items delivered"] += len(got)
    OUTCOMES["items expected"] += len(expected.items)
    OUTCOMES["stage faults fired"] += sum(s.fired for s in stage_cases)
    OUTCOMES["source faults fired"] += source_fired
    OUTCOMES["body faults raised"] += consumer_fault
    OUTCOMES["cancelled from another thread"] += case.cancel_at is not None
    OUTCOMES["consumer broke"] += case.break_at is not None and len(got) == case.break_at
    OUTCOMES["injected exception reached the caller"] += any(
        exc is e for exc in (raised, joined) if exc is not None for e in injected
    )
    OUTCOMES["no fault, output checked equal"] += not injected and not stopped_early
    OUTCOMES["coroutine stages"] += sum(s.coroutine for s in stage_cases)
    OUTCOMES["executor stages"] += sum(s.executor for s in stage_cases)
    OUTCOMES["skip-policy stages"] += sum(s.skip_mod is not None for s in stage_cases)
    OUTCOMES["operators"] += len(case.stages) - len(stage_cases)
    OUTCOMES["max seconds per case (x1000)"] = max(
        OUTCOMES["max seconds per case (x1000)"], int(elapsed * 1000)
    )

    # The skip policy dropped exactly the items whose calls failed.
    by_stage: dict[str, Counter[Any]] = {}
    for error in run.errors:
        by_stage.setdefault(error.stage, Counter())[error.item] += 1
    for i, s in enumerate(case.stages):
        if not isinstance(s, StageCase):
            continue
        name = f"s{i}"
        if s.skip_mod is not None:
            assert by_stage.get(name, Counter()) == Counter(s.failed_items), case
        else:
            assert name not in by_stage


# ------------------------------------------------------------------------------------ the tests

_EXECUTOR_THREADS = 4


@pytest.fixture(scope="module")
def executor() -> Iterator[Executor]:
    """One thread pool for every executor stage of the module, its threads started up front.

    Started whole before the first test, so that the leak check of each test (which compares the
    threads before and after it) does not count the pool's threads as the test's.
    """
    pool = ThreadPoolExecutor(_EXECUTOR_THREADS, thread_name_prefix="faults-executor")
    barrier = threading.Barrier(_EXECUTOR_THREADS + 1)
    # Each task holds its thread until all are running: the pool has to start every thread.
    warm = [pool.submit(barrier.wait, _HANG_SECONDS) for _ in range(_EXECUTOR_THREADS)]
    barrier.wait(_HANG_SECONDS)
    for future in warm:
        future.result()
    yield pool
    pool.shutdown(wait=True)
    report = os.environ.get("THREADPIPE_SOAK_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as f:
            json.dump(dict(OUTCOMES), f, indent=1)

_CI = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


@pytest.mark.timeout(240)
@_CI
@given(case=case_st())
def test_random_pipelines_with_faults(case: Case, executor: Executor) -> None:
    check(case, executor)


@pytest.mark.soak
@pytest.mark.timeout(0)
@settings(_CI, max_examples=SOAK_CASES)
@given(case=case_st())
def test_soak_random_pipelines_with_faults(case: Case, executor: Executor) -> None:
    check(case, executor)


# ------------------------------------------------------------------------------------ regressions
# Each found by the randomized suite, reduced to a plain test.


def test_coroutine_stage_cut_off_by_take_while_its_taker_waits_for_room() -> None:
    """A take() downstream closes a coroutine stage's output while the stage is at its limit.

    The emitter got Closed from its put and exited without returning its permits, and the taker
    waited for room that nothing would ever make: the run never ended (found by the suite as a
    hang of ``filter(async) | filter | take(2)``).
    """
    third_called = threading.Event()
    release = threading.Event()

    async def fetch(x: int) -> int:
        if x == 2:
            third_called.set()
        return x

    def gate(x: int) -> int:
        # Holds item 0 until the coroutine stage has taken item 2: its output buffer (1 item)
        # then holds item 1, and its one permit is in use, so its taker waits for room.
        if x == 0:
            release.wait(_HANG_SECONDS)
        return x

    pipeline = (
        Pipeline.from_iter(range(10))
        .map(fetch, workers=1)
        .backpressure(1)
        .map(gate)
        .take(1)
    )
    run = pipeline.start()
    assert third_called.wait(_HANG_SECONDS)
    release.set()
    assert list(run) == [0]
    run.join(timeout=_HANG_SECONDS)
    assert run.done


def test_executor_stage_cut_off_by_take_ends() -> None:
    """A take() downstream closes an executor stage's output while its dispatcher waits for permits.

    The collector got Closed from its put and exited without returning its permits or waking the
    dispatcher, which then waited for room forever (about half the runs of this pipeline hung).
    """
    with ThreadPoolExecutor(4) as pool:
        for _ in range(50):
            run = (
                Pipeline.from_iter(range(100))
                .map(lambda x: x // 2, executor=pool, workers=3, ordered=False)
                .take(6)
                .start()
            )
            assert len(list(run)) == 6
            run.join(timeout=_HANG_SECONDS)
