"""Stages on an executor: a caller's thread pool, ``executor="processes"``, a Dask LocalCluster.

Everything runs on real executors: a ``ThreadPoolExecutor`` where the test must gate calls with
events, a real process pool, and a real ``distributed.LocalCluster`` of two worker processes
started once for the module. Calls in other processes are gated with files (see
``remote_calls.gated``), never with sleeps.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from remote_calls import count_to, fail_on_five, gated, is_odd, square, square_and_pid, touch

from threadpipe import Pipeline, Run
from threadpipe._executor import process_context


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def started(directory: Path) -> int:
    """How many gated calls have started in ``directory``."""
    return sum(1 for p in directory.iterdir() if p.name.startswith("started-"))


def threadpipe_threads(stage: str) -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith(f"threadpipe-{stage}-")}


# ---------------------------------------------------------------------------------- building


@pytest.mark.parametrize(
    "executor",
    ["threads", "Processes", 4, object(), ThreadPoolExecutor],
    ids=["unknown-string", "wrong-case", "int", "object", "executor-class"],
)
@pytest.mark.parametrize("kind", ["map", "filter", "flat_map", "each"])
def test_a_bad_executor_is_a_type_error_at_build(kind: str, executor: object) -> None:
    with pytest.raises(TypeError, match=r"executor must be") as info:
        getattr(Pipeline.from_iter([1]), kind)(square, executor=executor)
    message = str(info.value)
    shown = executor.__qualname__ if isinstance(executor, type) else repr(executor)[:20]
    assert shown in message


def test_an_executor_stage_holds_at_most_workers_items() -> None:
    # Its input buffer, plus one item per call in flight; "processes" keeps one more call waiting
    # in its pool, so that a process never idles between two calls.
    source_only = Pipeline.from_iter(range(3)).buffer_bound()
    with ThreadPoolExecutor(1) as pool:
        on_pool = Pipeline.from_iter(range(3)).map(square, workers=5, executor=pool)
        assert on_pool.buffer_bound() == source_only + 32 + 5
    on_processes = Pipeline.from_iter(range(3)).map(square, workers=5, executor="processes")
    assert on_processes.buffer_bound() == source_only + 32 + 6


# ---------------------------------------------------------------------- a caller's thread pool


def test_every_kind_on_a_thread_pool_that_stays_the_callers() -> None:
    with ThreadPoolExecutor(4) as pool:
        p = Pipeline.from_iter(range(50))
        assert p.map(square, workers=3, executor=pool).to_list() == [x * x for x in range(50)]
        assert p.filter(is_odd, workers=3, executor=pool).to_list() == list(range(1, 50, 2))
        assert p.flat_map(count_to, workers=3, executor=pool).to_list() == [
            y for x in range(50) for y in range(x)
        ]
        seen: list[int] = []
        assert p.each(seen.append, workers=3, executor=pool).to_list() == list(range(50))
        assert sorted(seen) == list(range(50))
        unordered = p.map(square, workers=3, executor=pool, ordered=False).to_list()
        assert sorted(unordered) == [x * x for x in range(50)]
        # The run never shuts down an executor it was given.
        assert pool.submit(square, 7).result() == 49


def test_at_most_workers_calls_in_flight_and_two_threads_whatever_workers() -> None:
    lock = threading.Lock()
    running = 0
    peak = 0
    names: set[str] = set()
    # Three calls must be inside fn together to pass: proves the stage does fill its three slots.
    barrier = threading.Barrier(3, timeout=10)

    def fn(x: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.update(threadpipe_threads("capped"))
        try:
            barrier.wait()
        finally:
            with lock:
                running -= 1
        return x

    with ThreadPoolExecutor(8) as pool:
        out = (
            Pipeline.from_iter(range(30)).map(fn, workers=3, executor=pool, name="capped").to_list()
        )
    assert out == list(range(30))
    assert peak == 3
    assert names == {"threadpipe-capped-0", "threadpipe-capped-1"}


def test_unordered_emits_a_call_as_soon_as_it_finishes() -> None:
    one_is_out = threading.Event()

    def fn(x: int) -> int:
        if x == 0:
            assert one_is_out.wait(10), "item 1 was held back behind item 0"
        return x

    def downstream(x: int) -> None:
        if x == 1:
            one_is_out.set()

    with ThreadPoolExecutor(2) as pool:
        p = Pipeline.from_iter([0, 1]).map(fn, workers=2, executor=pool, ordered=False)
        assert p.each(downstream).to_list() == [1, 0]


def test_ordered_output_keeps_input_order_when_calls_finish_in_reverse() -> None:
    # Call i returns only after call i + 1 has: completions come in reverse order.
    n = 8
    returned = [threading.Event() for _ in range(n + 1)]
    returned[n].set()

    def fn(x: int) -> int:
        assert returned[x + 1].wait(10)
        returned[x].set()
        return x

    with ThreadPoolExecutor(n) as pool:
        assert Pipeline.from_iter(range(n)).map(fn, workers=n, executor=pool).to_list() == list(
            range(n)
        )


def test_a_full_output_buffer_holds_the_dispatcher_back() -> None:
    calls = 0
    lock = threading.Lock()

    def fn(x: int) -> int:
        nonlocal calls
        with lock:
            calls += 1
        return x

    with ThreadPoolExecutor(4) as pool:
        run = (
            Pipeline.from_iter(range(100)).map(fn, workers=2, executor=pool).backpressure(1).start()
        )
        try:
            # Nobody reads: at most one output in the buffer and two items held by the stage (as
            # calls in flight, or as outputs waiting for room); two, if both finished at once and
            # are waiting together for the room the first of them took.
            wait_until(lambda: calls >= 2, "the stage to fill up")
            time.sleep(0.2)  # gives a missing bound the time to show; never decides the result
            assert calls <= 3
            assert list(run) == list(range(100))
            run.join(10)
        finally:
            run.cancel()


def test_the_callers_exception_is_raised_as_itself() -> None:
    raised: list[BaseException] = []

    def fn(x: int) -> int:
        if x == 3:
            error = KeyError("three")
            raised.append(error)
            raise error
        return x

    with ThreadPoolExecutor(2) as pool, pytest.raises(KeyError) as info:
        Pipeline.from_iter(range(10)).map(fn, workers=2, executor=pool).run()
    assert info.value is raised[0]
    assert info.value.__notes__ == ["threadpipe: raised in stage 'fn' while processing item 3"]


def test_cancel_cancels_pending_calls_and_does_not_wait_for_running_ones() -> None:
    release = threading.Event()
    first_running = threading.Event()
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        first_running.set()
        release.wait(30)
        return x

    pool = ThreadPoolExecutor(1)  # one call runs, the other three in flight wait in the pool
    try:
        run = Pipeline.from_iter(range(10)).map(fn, workers=4, executor=pool).start()
        assert first_running.wait(10)
        wait_until(lambda: len(run._stages[0]._calls) == 4, "four calls in flight")
        run.cancel()
        run.join(10)  # returns although call 0 is still running: the run does not wait for it
        assert not release.is_set() and run.cancelled and run.done
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert calls == [0]  # the three pending calls were cancelled, never run
    assert list(run) == []


def test_a_failure_elsewhere_cancels_the_pending_calls_without_waiting() -> None:
    release = threading.Event()
    fail_now = threading.Event()
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        release.wait(30)
        return x

    def source() -> Iterator[int]:
        yield from range(5)
        assert fail_now.wait(10)
        raise OSError("the source broke")

    pool = ThreadPoolExecutor(1)  # call 0 runs, calls 1 and 2 wait in the pool
    try:
        run = Pipeline.from_iter(source()).map(fn, workers=3, executor=pool).start()
        wait_until(lambda: len(run._stages[0]._calls) == 3, "three calls in flight")
        fail_now.set()
        with pytest.raises(OSError, match="the source broke"):
            run.join(10)  # raises while call 0 is still running: a failed run does not wait either
        assert not release.is_set()
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert calls == [0]


def test_an_executor_shut_down_under_the_run_fails_it() -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown") as info:
        Pipeline.from_iter(range(3)).map(square, executor=pool).run()
    assert info.value.__notes__ == ["threadpipe: raised in stage 'square' while processing item 0"]


@pytest.mark.skipif(not hasattr(Run, "stats"), reason="statistics have not landed")
def test_statistics_count_an_executor_stage_like_any_other() -> None:
    with ThreadPoolExecutor(2) as pool:
        run = Pipeline.from_iter(range(20)).filter(is_odd, workers=4, executor=pool).start()
        assert list(run) == list(range(1, 20, 2))
        run.join(10)
    (stats,) = run.stats()
    assert (stats.items_in, stats.items_out, stats.errors, stats.in_flight) == (20, 10, 0, 0)
    assert stats.spawned == 2 and stats.workers == 4 and stats.busy_seconds > 0


def bump(x: int) -> int:
    return (3 * x + 1) % 7  # keeps values below 7, so chains of flat_map stay small


# Random chains of thread and executor stages against plain Python.
_OPS: dict[str, tuple[str, Callable[[int], Any], Callable[[list[int]], list[int]]]] = {
    "map": ("map", bump, lambda xs: [bump(x) for x in xs]),
    "filter": ("filter", is_odd, lambda xs: [x for x in xs if x % 2 == 1]),
    "flat_map": ("flat_map", count_to, lambda xs: [y for x in xs for y in range(x)]),
    "each": ("each", str, lambda xs: xs),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(st.integers(0, 6), max_size=40),
    stages=st.lists(
        st.tuples(st.sampled_from(sorted(_OPS)), st.integers(1, 5), st.booleans(), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    pool_size=st.integers(1, 4),
    fail_at=st.one_of(st.none(), st.integers(0, 3)),
)
def test_random_chains_of_thread_and_executor_stages(
    data: list[int],
    stages: list[tuple[str, int, bool, bool]],
    pool_size: int,
    fail_at: int | None,
) -> None:
    expected = list(data)
    with ThreadPoolExecutor(pool_size) as pool:
        p = Pipeline.from_iter(data)
        for i, (op, workers, ordered, on_pool) in enumerate(stages):
            kind, fn, plain = _OPS[op]
            if i == fail_at:

                def fn(x: int, fn: Callable[[int], Any] = fn) -> Any:
                    if x == 5:
                        raise ArithmeticError(x)
                    return fn(x)

                fails = 5 in expected
            else:
                fails = False
            p = getattr(p, kind)(
                fn, workers=workers, ordered=ordered, executor=pool if on_pool else None
            )
            if fails:
                with pytest.raises(ArithmeticError):
                    p.to_list()
                return
            expected = plain(expected)
        out = p.to_list()
    if all(ordered for _, _, ordered, _ in stages):
        assert out == expected
    else:
        assert sorted(out) == sorted(expected)


# ---------------------------------------------------------------------------- processes


@pytest.mark.timeout(60)
def test_processes_run_the_calls_in_other_processes_in_order_and_exit_with_the_run() -> None:
    run = Pipeline.from_iter(range(40)).map(square_and_pid, workers=2, executor="processes").start()
    out = list(run)
    assert [y for y, _ in out] == [x * x for x in range(40)]
    pids = {pid for _, pid in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # The run shuts its pool down before its last thread exits: once joined, no process is left.
    run.join(20)
    for pid in pids:
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass


@pytest.mark.timeout(60)
def test_processes_every_kind(tmp_path: Path) -> None:
    p = Pipeline.from_iter(range(12))
    assert p.filter(is_odd, workers=2, executor="processes").to_list() == list(range(1, 12, 2))
    assert p.flat_map(count_to, workers=2, executor="processes", ordered=False).to_list() != []
    assert sorted(p.flat_map(count_to, workers=2, executor="processes").to_list()) == sorted(
        y for x in range(12) for y in range(x)
    )
    paths = [str(tmp_path / f"f{i}") for i in range(5)]
    assert Pipeline.from_iter(paths).each(touch, workers=2, executor="processes").to_list() == paths
    assert all(Path(path).exists() for path in paths)


@pytest.mark.timeout(60)
def test_processes_raise_the_remote_exception_as_itself() -> None:
    with pytest.raises(ValueError) as info:
        Pipeline.from_iter(range(20)).map(fail_on_five, workers=2, executor="processes").run()
    assert info.value.args == ("five is right out", 5)
    assert info.value.__notes__ == [
        "threadpipe: raised in stage 'fail_on_five' while processing item 5"
    ]
    assert "fail_on_five" in str(info.value.__cause__)  # the remote traceback, as the pool gives it


def test_processes_refuse_an_unpicklable_function_before_any_call() -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for x in range(10):
            pulled.append(x)
            yield x

    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)) as info:
        Pipeline.from_iter(source()).map(lambda x: x, workers=2, executor="processes").run()
    (note,) = info.value.__notes__
    assert note.startswith("threadpipe: stage 'map' runs its calls in other processes")
    assert "cannot be pickled" in note and "module level" in note


@pytest.mark.timeout(60)
def test_processes_fail_on_an_unpicklable_item_naming_it() -> None:
    items: list[Any] = [1, 2, threading.Lock(), 4]
    outputs: list[int] = []
    with pytest.raises(TypeError, match="pickle") as info:
        outputs.extend(Pipeline.from_iter(items).map(square, workers=2, executor="processes"))
    (note,) = info.value.__notes__
    assert note.startswith("threadpipe: stage 'square' sends its items to other processes")
    assert "item <unlocked _thread.lock" in note and "cannot be pickled" in note
    # Some of what came before it, in order, then the error: never a silent gap.
    assert outputs == [1, 4][: len(outputs)]


@pytest.mark.timeout(60)
def test_processes_cancel_returns_without_waiting_for_running_calls(tmp_path: Path) -> None:
    jobs = [(str(tmp_path), x) for x in range(10)]
    run = Pipeline.from_iter(jobs).map(gated, workers=2, executor="processes").start()
    try:
        wait_until(lambda: started(tmp_path) == 2, "two calls to start")
        run.cancel()
        run.join(20)  # returns with both calls still waiting at the gate
        assert run.cancelled and run.done and not (tmp_path / "open").exists()
    finally:
        (tmp_path / "open").touch()  # lets the calls end, and the pool's last thread with them
    assert list(run) == []


@pytest.mark.timeout(60)
def test_a_callers_process_pool_is_shared_by_runs_and_left_running() -> None:
    with ProcessPoolExecutor(2, mp_context=process_context()) as pool:
        p = Pipeline.from_iter(range(10)).map(square, workers=4, executor=pool)
        assert p.to_list() == p.to_list() == [x * x for x in range(10)]
        assert pool.submit(square, 9).result() == 81
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)) as info:
            Pipeline.from_iter(range(3)).map(lambda x: x, executor=pool).run()
        assert "cannot be pickled" in info.value.__notes__[0]


# ------------------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A real LocalCluster of two single-threaded worker processes, and a client of it.

    Module-scoped, so it is set up before the thread snapshot of the first test that uses it and
    its threads never count as that test's leak; a warm-up call starts the client's lazily
    created threads here too.
    """
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    client = distributed.Client(cluster)
    try:
        assert client.get_executor().submit(square, 3).result(timeout=30) == 9
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture
def dask_executor(dask_client: Any) -> Executor:
    return dask_client.get_executor()  # type: ignore[no-any-return]


@pytest.mark.timeout(60)
def test_dask_keeps_order_or_not_as_asked(dask_executor: Executor) -> None:
    p = Pipeline.from_iter(range(40))
    assert p.map(square, workers=4, executor=dask_executor).to_list() == [x * x for x in range(40)]
    unordered = p.map(square, workers=4, executor=dask_executor, ordered=False).to_list()
    assert sorted(unordered) == [x * x for x in range(40)]
    assert p.flat_map(count_to, workers=4, executor=dask_executor).to_list() == [
        y for x in range(40) for y in range(x)
    ]


@pytest.mark.timeout(60)
def test_dask_raises_the_remote_exception_as_itself(dask_executor: Executor) -> None:
    with pytest.raises(ValueError) as info:
        Pipeline.from_iter(range(20)).map(fail_on_five, workers=3, executor=dask_executor).run()
    assert info.value.args == ("five is right out", 5)
    assert info.value.__notes__ == [
        "threadpipe: raised in stage 'fail_on_five' while processing item 5"
    ]


def test_dask_refuses_an_unpicklable_function_before_any_call(dask_executor: Executor) -> None:
    lock = threading.Lock()  # cloudpickle sends a lambda by value, but not the lock it holds

    def holds_a_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(TypeError) as info:
        Pipeline.from_iter(range(5)).map(holds_a_lock, executor=dask_executor).run()
    (note,) = info.value.__notes__
    assert note.startswith("threadpipe: stage 'holds_a_lock' runs its calls in other processes")


@pytest.mark.timeout(60)
def test_dask_fails_on_an_unpicklable_item_naming_it(dask_executor: Executor) -> None:
    items: list[Any] = [1, threading.Lock(), 3]
    with pytest.raises(TypeError) as info:
        Pipeline.from_iter(items).map(square, workers=2, executor=dask_executor).run()
    (note,) = info.value.__notes__
    assert "stage 'square' sends its items to other processes, and item <unlocked" in note
    assert "cannot pickle '_thread.lock' object" in note


@pytest.mark.timeout(60)
def test_dask_cancel_returns_at_once_and_releases_the_tasks(
    dask_client: Any, dask_executor: Executor, tmp_path: Path
) -> None:
    jobs = [(str(tmp_path), x) for x in range(20)]
    # Four in flight on two single-threaded workers: two run, two wait.
    run = Pipeline.from_iter(jobs).map(gated, workers=4, executor=dask_executor).start()
    try:
        wait_until(lambda: started(tmp_path) == 2, "two calls to start")
        run.cancel()
        run.join(20)  # returns with both calls still waiting at the gate
        assert run.cancelled and run.done and not (tmp_path / "open").exists()
    finally:
        (tmp_path / "open").touch()

    def tasks_left(dask_scheduler: Any) -> int:
        return sum(1 for key in dask_scheduler.tasks if str(key).startswith("gated-"))

    # The cancelled futures are released: the cluster forgets every task of the run.
    wait_until(lambda: dask_client.run_on_scheduler(tasks_left) == 0, "the scheduler to forget")
    assert started(tmp_path) <= 4


_START_METHOD_SCRIPT = """
import multiprocessing, os, sys
import threadpipe as tp
from remote_calls import parent_pid

assert multiprocessing.get_start_method(allow_none=True) is None
for run in range(2):
    parents = tp.Pipeline.from_iter(range(4)).map(parent_pid, workers=2, executor="processes").to_list()
    assert os.getpid() not in parents, f"run {run}: a worker was forked from this process"
    method = multiprocessing.get_start_method(allow_none=True)
    assert method is None, f"run {run} left the start method set to {method!r}"
multiprocessing.set_start_method("spawn")  # the program's choice is still its own to make
print("ok")
"""


def test_processes_never_fork_and_leave_the_programs_start_method_alone() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _START_METHOD_SCRIPT],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
