"""The worker pool: real concurrency, eager stages, lazy growth, thread names, ordering."""

from __future__ import annotations

import threading

import pytest

from threadpipe import Pipeline


def test_workers_really_run_at_once() -> None:
    # Four calls must be inside fn together to pass the barrier; a serialised stage breaks it.
    barrier = threading.Barrier(4, timeout=10)
    out = Pipeline.from_iter(range(8)).map(lambda x: barrier.wait() and x, workers=4, ordered=False).run()
    assert out == 8


def test_stages_are_eager_and_independent() -> None:
    # The last stage is stuck on its first item; the first stage must keep working regardless.
    release = threading.Event()
    progressed = threading.Semaphore(0)

    def first(x: int) -> int:
        progressed.release()
        return x

    run = (
        Pipeline.from_iter(range(100))
        .map(first)
        .map(lambda x: x)
        .map(lambda x: release.wait(10) and x)
        .start()
    )
    for _ in range(20):
        assert progressed.acquire(timeout=10), "stage 1 stopped while stage 3 was busy"
    release.set()
    assert list(run) == list(range(100))
    run.join(10)


def test_workers_start_only_as_work_needs_them() -> None:
    names: set[str] = set()
    lock = threading.Lock()

    def record(x: int) -> int:
        with lock:
            names.add(threading.current_thread().name)
        return x

    # One item at a time can never need a second worker.
    assert Pipeline.from_iter([1]).map(record, workers=64, name="lazy").to_list() == [1]
    assert names == {"threadpipe-lazy-0"}


def test_cheap_calls_are_left_to_one_worker() -> None:
    # Four calls held at a barrier grow the stage to four workers; then 3,000 calls of a few
    # microseconds: the extra workers leave them to worker 0, which alone takes whole batches.
    barrier = threading.Barrier(4, timeout=10)
    names: list[str] = []

    def call(x: int) -> int:
        if x < 4:
            barrier.wait()
        names.append(threading.current_thread().name)
        return x

    run = Pipeline.from_iter(range(3004)).map(call, workers=4, ordered=False, name="cheap").start()
    assert sorted(run) == list(range(3004))
    run.join(10)
    assert run.stats()[0].concurrency == 4
    late = names[-1000:]
    # Loose on purpose (a stall on a loaded machine may make a batch look slow for a moment and
    # start a worker again): a stage that kept four workers splits the calls about evenly.
    assert late.count("threadpipe-cheap-0") > 500, sorted(set(late))


def test_a_stage_grows_again_when_its_calls_slow_down() -> None:
    import time

    names: set[str] = set()
    lock = threading.Lock()

    def call(x: int) -> int:
        if x >= 2000:
            time.sleep(0.002)  # slow calls (a timing heuristic decides growth, not correctness)
            with lock:
                names.add(threading.current_thread().name)
        return x

    out = Pipeline.from_iter(range(2200)).map(call, workers=4, ordered=False).to_list()
    assert sorted(out) == list(range(2200))
    assert len(names) > 1, names


def test_threads_are_named_after_the_stage() -> None:
    barrier = threading.Barrier(3, timeout=10)
    names: list[str] = []

    def record(x: int) -> int:
        names.append(threading.current_thread().name)
        barrier.wait()
        return x

    Pipeline.from_iter(range(3)).map(record, workers=3, name="fetch").run()
    assert sorted(names) == ["threadpipe-fetch-0", "threadpipe-fetch-1", "threadpipe-fetch-2"]


def test_unordered_stage_emits_as_soon_as_ready() -> None:
    one_done = threading.Event()

    def fn(x: int) -> int:
        if x == 0:
            one_done.wait(10)
        else:
            one_done.set()
        return x

    assert Pipeline.from_iter([0, 1]).map(fn, workers=2, ordered=False).backpressure(1).to_list() == [1, 0]


@pytest.mark.parametrize("kind", ["map", "filter", "flat_map", "each"])
def test_ordered_stage_keeps_input_order_when_the_head_is_slowest(kind: str) -> None:
    later_done = threading.Event()

    def fn(x: int) -> object:
        if x == 0:
            later_done.wait(10)
        elif x == 5:
            later_done.set()
        return {"map": x, "filter": True, "flat_map": [x, x], "each": None}[kind]

    out = getattr(Pipeline.from_iter(range(30)), kind)(fn, workers=4).to_list()
    expected = [y for x in range(30) for y in ([x, x] if kind == "flat_map" else [x])]
    assert out == expected


def test_reorder_buffer_is_bounded_while_the_head_waits() -> None:
    release = threading.Event()
    lock = threading.Lock()
    calls = [0]

    def fn(x: int) -> int:
        if x == 0:
            release.wait(10)
        with lock:
            calls[0] += 1
        return x

    p = Pipeline.from_iter(range(10_000)).backpressure(4).map(fn, workers=4)
    run = p.start()
    # While item 0 is stuck, the others may run only as far as the reorder window allows.
    window = run._stages[0].reorder.window
    for _ in range(200):
        if calls[0] >= window - 1:
            break
        release.wait(0.01)
    release.wait(0.1)  # let a runaway stage show itself
    assert calls[0] <= window - 1
    release.set()
    assert list(run) == list(range(10_000))
    run.join(10)


def test_end_of_input_cascades_through_wide_stages() -> None:
    p = Pipeline.from_iter(range(2000))
    for i in range(6):
        p = p.map(lambda x: x, workers=1 + i * 3, ordered=bool(i % 2))
    assert sorted(p.to_list()) == list(range(2000))


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_a_stage_keeps_its_workers_while_calls_wait_for_each_other(workers: int) -> None:
    # Round after round, every worker must be inside fn for any to go on: the last to arrive at
    # the barrier has the shortest call, which must not make the stage drop a worker (the rest
    # would then wait for good). Each call also takes a millisecond of its own, as calls that wait
    # for each other do (a request answered by another): calls much cheaper than a batch's
    # 0.2 ms are taken several at a time by one worker and may wait for each other in the same
    # thread (docs/limitations.md), which no stage can keep from deadlocking.
    barrier = threading.Barrier(workers, timeout=10)

    def paired(x: int) -> int:
        threading.Event().wait(0.001)
        barrier.wait()
        return x

    out = Pipeline.from_iter(range(workers * 10)).map(paired, workers=workers, ordered=False).to_list()
    assert sorted(out) == list(range(workers * 10))
