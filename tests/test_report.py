"""The report: the verdict on made-up numbers (the statistics it reads: test_stats.py)."""

from __future__ import annotations

import dataclasses

import pytest

from threadpipe import StageStats
from threadpipe._channel import Channel
from threadpipe._report import render_report
from threadpipe._run import RunState
from threadpipe._stats import BufferFill, ResourceUse, Samples


def flat(report: str) -> str:
    """The report with its line wrapping undone, to look for phrases."""
    return " ".join(report.split())


# ---------------------------------------------------------------- the verdict, on made-up numbers


def made(name: str, util: float, busy: float, cpu: float | None, workers: int = 2) -> StageStats:
    return StageStats(
        name=name,
        kind="map",
        workers=workers,
        spawned=workers,
        items_in=100,
        items_out=100,
        errors=0,
        in_flight=0,
        busy_seconds=busy,
        cpu_seconds=cpu,
        utilization=util,
        queue_size=0,
        queue_capacity=32,
    )


def finished_state(elapsed: float, cpu: float) -> RunState:
    state = RunState()
    clock = state.clock
    clock.started, clock.ended = 0.0, elapsed
    clock.cpu_started, clock.cpu_ended = 0.0, cpu
    state.done.set()
    return state


def fills(*pairs: tuple[float, float]) -> tuple[BufferFill, ...]:
    return tuple(BufferFill(mean=full, full=full, empty=empty) for full, empty in pairs)


def test_verdict_cpu_bound_stage_gets_an_executor() -> None:
    stats = (made("fetch", 0.3, 6.0, 0.1, workers=10), made("crunch", 0.97, 9.7, 9.5, workers=1))
    report = flat(render_report(stats, finished_state(10.0, 9.8), Channel(4), None))
    assert "bottleneck: stage 'crunch'" in report
    assert "CPU-bound" in report and "executor" in report


def test_verdict_waiting_stage_gets_more_workers_and_a_note_on_the_gil() -> None:
    stats = (made("crunch", 0.5, 9.0, 9.0, workers=2), made("upload", 0.99, 19.8, 0.2))
    report = flat(render_report(stats, finished_state(10.0, 9.5), Channel(4), None))
    assert "bottleneck: stage 'upload'" in report and "more workers for it (now 2)" in report
    assert "'crunch' used the most CPU" in report


def test_verdict_ties_are_broken_by_the_buffers() -> None:
    # Two stages equally busy; the second has the full buffer in front and the empty one after.
    stats = (made("a", 0.98, 9.8, 0.1), made("b", 0.99, 9.9, 0.1))
    samples = Samples(
        50, fills((0.0, 0.9), (0.9, 0.0)), fills((0.0, 1.0))[0], ResourceUse(50.0, 1e7, 2e7)
    )
    report = flat(render_report(stats, finished_state(5.0, 0.3), Channel(4), samples))
    assert "bottleneck: stage 'b'" in report and "full in 90% of samples" in report
    assert "memory peak 19.1 MB" in report


def test_verdict_bursty_input_suggests_a_larger_buffer() -> None:
    stats = (made("a", 0.2, 1.0, 0.1), made("b", 0.8, 8.0, 0.1))
    samples = Samples(50, fills((0.1, 0.5), (0.4, 0.4)), fills((0.0, 1.0))[0], None)
    report = flat(render_report(stats, finished_state(5.0, 0.3), Channel(4), samples))
    assert "bottleneck: stage 'b'" in report and "larger buffer in front of it" in report


def test_verdict_a_slow_consumer_or_source_is_outside_the_stages() -> None:
    stats = (made("a", 0.1, 1.0, 0.1),)
    consumer = Samples(50, fills((0.2, 0.1)), fills((0.95, 0.0))[0], None)
    report = flat(render_report(stats, finished_state(5.0, 0.3), Channel(4), consumer))
    assert "bottleneck: outside the stages" in report and "caller reading the outputs" in report
    source = Samples(50, fills((0.0, 0.97)), fills((0.0, 1.0))[0], None)
    report = flat(render_report(stats, finished_state(5.0, 0.3), Channel(4), source))
    assert "the source yields items slower" in report


def test_verdict_a_stage_waiting_for_its_rate_limit_is_limited_by_rate_not_workers() -> None:
    limited = dataclasses.replace(
        made("upload", util=0.02, busy=0.4, cpu=0.1, workers=4),
        throttled_seconds=38.0,
        rate=20.0,
    )
    report = flat(render_report([limited], finished_state(10.0, 0.5), Channel(4), None))
    assert "bottleneck: stage 'upload' (map, 4 workers), limited by rate=20" in report
    assert "more workers cannot help" in report
    assert "try: more workers" not in report


@pytest.mark.parametrize("waiting_workers", [1.0, 2.0, 3.5])
def test_verdict_a_stage_at_its_rate_is_limited_by_rate_however_many_workers_waited_their_turn(
    waiting_workers: float,
) -> None:
    # 100 calls in 5 s at rate=20: the stage made every call its rate allowed. How many of its 4
    # workers spent the run waiting for their turn, rather than for input, is timing: the verdict
    # was "outside the pipeline" when fewer than about 2.4 of them did (CI failed on it once).
    limited = dataclasses.replace(
        made("send", util=0.01, busy=0.05, cpu=0.05, workers=4),
        throttled_seconds=5.0 * waiting_workers,
        rate=20.0,
    )
    report = flat(render_report([limited], finished_state(5.0, 0.1), Channel(4), None))
    assert "bottleneck: stage 'send' (map, 4 workers), limited by rate=20" in report, report


def test_verdict_a_short_run_of_a_rate_limited_stage_that_never_waited_is_not_its_rate() -> None:
    # One call, at once: as many as rate=30 allows in that time, but the limit held nobody back.
    quick = dataclasses.replace(
        made("send", util=0.01, busy=0.00002, cpu=0.00002, workers=4),
        items_in=1,
        items_out=1,
        rate=30.0,
    )
    report = flat(render_report([quick], finished_state(0.001, 0.001), Channel(4), None))
    assert "limited by rate" not in report and "bottleneck: stage" not in report, report


def test_the_reported_cpu_peak_is_never_below_the_mean() -> None:
    samples = Samples(
        count=3,
        inputs=fills((0.0, 1.0)),
        output=BufferFill(0.0, 0.0, 1.0),
        resources=ResourceUse(cpu_peak=3.0, rss_mean=1e6, rss_peak=2_000_000),
    )
    stats = [made("parse", util=0.5, busy=1.0, cpu=0.1)]
    report = flat(render_report(stats, finished_state(1.0, 0.08), Channel(4), samples))
    assert "process CPU 0.08 s = 8% of one core (peak 8%)" in report, report


def test_a_real_rate_limited_run_reports_the_rate_and_keeps_waits_out_of_busy_time() -> None:
    from threadpipe import Pipeline

    run = Pipeline.from_iter(range(30)).map(lambda x: x, workers=4, rate=30, name="send").start()
    assert list(run) == list(range(30))
    run.join(timeout=30)
    (stats,) = run.stats()
    assert stats.rate == 30.0
    assert stats.throttled_seconds > 0.5  # 30 calls at 30/s: about a second of waiting
    assert stats.busy_seconds < 0.2 < stats.throttled_seconds
    assert "limited by rate=30" in flat(run.report())
