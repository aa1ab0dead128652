"""Statistics and the report: exact counts, snapshots during a run, utilization, the bottleneck."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest

import threadpipe as tp
from threadpipe import Pipeline, StageStats


def flat(report: str) -> str:
    """The report with its line wrapping undone, to look for phrases."""
    return " ".join(report.split())


def by_name(stats: tuple[StageStats, ...]) -> dict[str, StageStats]:
    return {s.name: s for s in stats}


def test_counts_after_a_run_are_exact_for_every_kind() -> None:
    p = (
        Pipeline.from_iter(range(100))
        .map(lambda x: x + 1, workers=3, name="inc")
        .filter(lambda x: x % 2 == 0, name="even")
        .flat_map(lambda x: [x, x], workers=2, ordered=False, name="twice")
        .each(lambda x: None, name="look")
        .backpressure(7)
    )
    with p.start() as run:
        assert len(list(run)) == 100
    stats = by_name(run.stats())
    assert [s.name for s in run.stats()] == ["inc", "even", "twice", "look"]
    assert (stats["inc"].items_in, stats["inc"].items_out) == (100, 100)
    assert (stats["even"].items_in, stats["even"].items_out) == (100, 50)
    assert (stats["twice"].items_in, stats["twice"].items_out) == (50, 100)
    assert (stats["look"].items_in, stats["look"].items_out) == (100, 100)
    for s in stats.values():
        assert s.errors == 0 and s.in_flight == 0 and s.queue_size == 0
        assert 1 <= s.spawned and 1 <= s.concurrency <= s.workers
        assert s.busy_seconds >= 0 and 0.0 <= s.utilization <= 1.0
        assert s.cpu_seconds is not None and s.cpu_seconds >= 0
    assert (stats["inc"].workers, stats["inc"].queue_capacity) == (3, tp.DEFAULT_BUFFER)
    assert stats["look"].queue_capacity == 32 and stats["twice"].kind == "flat_map"


def test_stats_are_frozen_snapshots() -> None:
    run = Pipeline.from_iter(range(3)).map(str).start()
    list(run)
    first = run.stats()[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.items_in = 0  # type: ignore[misc]
    assert isinstance(run.stats(), tuple) and run.stats() is not run.stats()
    run.join(10)


def test_a_snapshot_during_the_run_shows_the_item_in_flight_and_the_buffer() -> None:
    entered, release = threading.Event(), threading.Event()

    def gate(x: int) -> int:
        if x == 0:
            entered.set()
            release.wait(10)
        return x

    # A list source is fed a buffer at a time, so all 10 items are in the buffer when the worker
    # takes its first batch: one item (no call measured yet), leaving nine.
    run = Pipeline.from_iter(list(range(10))).map(gate, name="gate").start()
    try:
        assert entered.wait(10)
        (s,) = run.stats()
        assert (s.items_in, s.items_out, s.in_flight, s.queue_size) == (0, 0, 1, 9)
        assert s.cpu_seconds is None  # known only once the threads have exited
        assert "running" in run.report()
    finally:
        release.set()
    assert list(run) == list(range(10))
    run.join(10)
    (s,) = run.stats()
    assert (s.items_in, s.items_out, s.in_flight) == (10, 10, 0)


def test_errors_are_counted_in_the_failing_stage() -> None:
    def bad(x: int) -> int:
        if x == 3:
            raise KeyError(x)
        return x

    run = Pipeline.from_iter(range(10)).map(lambda x: x, name="ok").map(bad, name="bad").start()
    with pytest.raises(KeyError):
        list(run)
    stats = by_name(run.stats())
    assert stats["bad"].errors == 1 and stats["ok"].errors == 0
    assert "failed (KeyError)" in run.report()


def test_errors_in_flat_map_are_counted() -> None:
    def explode(x: int) -> Iterator[int]:
        yield x
        raise ValueError(x)

    run = Pipeline.from_iter([1]).flat_map(explode, name="fm").start()
    with pytest.raises(ValueError):
        list(run)
    assert run.stats()[0].errors == 1


def test_utilization_is_against_the_configured_workers() -> None:
    # One item, four allowed workers: at most one ever works, so utilization is at most 1/4.
    release = threading.Event()
    run = Pipeline.from_iter([1]).map(lambda x: release.wait(10) and x, workers=4).start()
    release.set()
    assert list(run) == [1]
    run.join(10)
    (s,) = run.stats()
    assert s.workers == 4 and s.spawned == 1
    assert s.utilization <= 0.25 + 1e-9


SLOW_S = 0.01  # a workload, not synchronisation: the stage's calls are slow by construction


def slow(x: int) -> int:
    time.sleep(SLOW_S)
    return x


def test_the_slow_stage_is_the_busiest_and_the_report_names_it() -> None:
    p = (
        Pipeline.from_iter(range(40))
        .map(lambda x: x, name="parse")
        .map(slow, name="store")
        .map(lambda x: x, name="tidy")
    )
    with p.start(monitor=True) as run:
        assert list(run) == list(range(40))
    stats = by_name(run.stats())
    assert stats["store"].utilization > stats["parse"].utilization
    assert stats["store"].utilization > stats["tidy"].utilization
    # The sleeps are the floor of its busy time (wall clock, 5x slack against a loaded machine).
    assert stats["store"].busy_seconds >= 40 * SLOW_S * 0.99
    report = flat(run.report())
    assert "bottleneck: stage 'store'" in report
    assert "more workers" in report  # it sleeps: not CPU-bound
    assert "samples" in report and "memory peak" in report


def test_the_monitor_thread_samples_and_ends_with_the_run() -> None:
    release = threading.Event()
    run = Pipeline.from_iter([1, 2]).map(lambda x: release.wait(10) and x).start(monitor=True)
    names = [t.name for t in threading.enumerate()]
    assert names.count("threadpipe-monitor-0") == 1
    release.set()
    assert list(run) == [1, 2]
    # Iteration's end closed the monitor: the thread is gone already, not in a moment.
    assert "threadpipe-monitor-0" not in [t.name for t in threading.enumerate()]
    run.join(10)


def test_a_plain_run_starts_no_monitor_thread() -> None:
    release = threading.Event()
    run = Pipeline.from_iter([1]).map(lambda x: release.wait(10) and x).start()
    names = {t.name for t in threading.enumerate()}
    assert not {"threadpipe-monitor-0", "threadpipe-progress-0"} & names
    release.set()
    assert list(run) == [1]
    report = run.report()
    assert "not sampled" in report
    run.join(10)


def test_start_checks_monitor() -> None:
    with pytest.raises(TypeError, match="monitor must be a bool"):
        Pipeline.from_iter([1]).map(str).start(monitor="yes")  # type: ignore[arg-type]
