"""timeout= on thread stages: an overrunning call is abandoned, its item fails with TimeoutError.

Every hung call here waits on an Event that the test sets at its end, so the abandoned thread ends
(the autouse fixture checks that no thread outlives a test).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from threadpipe import Pipeline

WAIT = 10.0  # a timeout no healthy call comes near
SHORT = 0.5  # a timeout that a quick call meets even on a loaded machine; hung calls overrun it


class Hang:
    """A stage function whose calls on the chosen items hang until ``release`` is set."""

    def __init__(self, *hung: int) -> None:
        self.hung = set(hung)
        self.release = threading.Event()
        self.returned = threading.Event()  # a hung call has returned (after the release)
        self.lock = threading.Lock()
        self.running = 0  # calls running now, hung ones included
        self.peak_counted = 0  # the most calls running at once, hung ones left out

    def __call__(self, x: int) -> int:
        with self.lock:
            self.running += 1
            self.peak_counted = max(self.peak_counted, self.running - self.stuck())
        try:
            if x in self.hung:
                self.release.wait(30)
                self.returned.set()
            return x
        finally:
            with self.lock:
                self.running -= 1

    def stuck(self) -> int:
        return 0 if self.release.is_set() else sum(1 for t in threading.enumerate() if t.name.endswith("-abandoned"))


def abandoned_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith("-abandoned")]


def test_an_overrunning_call_fails_the_run_with_timeout_error_and_join_does_not_wait_for_it() -> None:
    hang = Hang(3)
    run = Pipeline.from_iter(range(6)).map(hang, workers=2, timeout=SHORT, name="slow").start()
    try:
        with pytest.raises(TimeoutError) as info:
            list(run)
        with pytest.raises(TimeoutError):
            run.join(WAIT)  # returns while the call still hangs: its thread is not the run's
        assert run.done and not hang.returned.is_set()
        assert str(info.value) == (
            "the call did not finish within timeout=0.5 s and was abandoned "
            "(its thread runs on until the call returns; its result is dropped)"
        )
        assert info.value.__notes__ == ["threadpipe: raised in stage 'slow' while processing item 3"]
        assert run.exception is info.value
        assert [s.abandoned for s in run.stats()] == [1]
        assert abandoned_threads() == ["threadpipe-slow-0-call-0-abandoned"] or abandoned_threads() == [
            "threadpipe-slow-1-call-0-abandoned"
        ]
        assert "abandoned: 1 call(s) of 'slow' overran timeout=" in run.report()
    finally:
        hang.release.set()
    assert hang.returned.wait(WAIT)


def test_on_error_skip_drops_the_item_and_the_stage_goes_on_with_a_fresh_thread() -> None:
    hang = Hang(2, 5)
    run = Pipeline.from_iter(range(10)).map(hang, workers=2, timeout=SHORT, on_error="skip").start()
    try:
        assert list(run) == [0, 1, 3, 4, 6, 7, 8, 9]
        run.join(WAIT)
        assert sorted(e.item for e in run.errors) == [2, 5]
        assert all(isinstance(e.exception, TimeoutError) for e in run.errors)
        (stats,) = run.stats()
        assert (stats.abandoned, stats.errors, stats.items_in, stats.items_out) == (2, 2, 10, 8)
        # At most `workers` calls that count ran at once; the abandoned ones ran on beside them.
        assert hang.peak_counted <= 2
    finally:
        hang.release.set()


def test_a_timeout_is_retried_like_any_failure() -> None:
    release = threading.Event()
    attempts: list[int] = []

    def flaky(x: int) -> int:
        attempts.append(x)
        if x == 1 and attempts.count(1) == 1:
            release.wait(30)  # the first attempt hangs; the retry is quick
        return x * 10

    try:
        run = Pipeline.from_iter(range(4)).map(flaky, timeout=SHORT, retries=2, retry_delay=0.001).start()
        assert list(run) == [0, 10, 20, 30]
        run.join(WAIT)
        assert attempts.count(1) == 2
        assert run.stats()[0].abandoned == 1 and run.errors == []
    finally:
        release.set()


def test_calls_within_the_timeout_are_unaffected_and_a_users_timeout_error_is_its_own() -> None:
    for kind in ("map", "filter", "each"):
        p = getattr(Pipeline.from_iter(range(50)), kind)(lambda x: x + 1, workers=3, timeout=WAIT)
        assert p.to_list() == {"map": list(range(1, 51)), "filter": list(range(50)), "each": list(range(50))}[kind]
    mine = TimeoutError("mine")

    def call(x: int) -> int:
        raise mine

    with pytest.raises(TimeoutError) as info:
        Pipeline.from_iter([1]).map(call, timeout=WAIT).to_list()
    assert info.value is mine and info.value.args == ("mine",)


def test_a_flat_map_has_each_step_timed_and_its_generator_closed() -> None:
    release = threading.Event()
    closed: list[int] = []

    def fan(x: int) -> Iterator[int]:
        try:
            yield x
            if x == 2:
                release.wait(30)  # between two outputs: the step overruns
            yield x
        finally:
            closed.append(x)

    try:
        run = Pipeline.from_iter(range(4)).flat_map(fan, timeout=SHORT, on_error="skip").start()
        assert list(run) == [0, 0, 1, 1, 2, 3, 3]  # what item 2 yielded in time stays
        run.join(WAIT)
        assert run.stats()[0].abandoned == 1
        assert sorted(closed) == [0, 1, 3]  # item 2's generator still runs on its abandoned thread
    finally:
        release.set()
    assert Pipeline.from_iter(range(3)).flat_map(lambda x: [x] * x, timeout=WAIT).to_list() == [1, 2, 2]


def test_a_cancel_waits_at_most_the_timeout_for_a_running_call() -> None:
    hang = Hang(0)
    run = Pipeline.from_iter(range(3)).map(hang, timeout=0.2).start()
    try:
        while not hang.running:
            time.sleep(0.001)  # only makes the cancel come during the call likely
        run.cancel()
        run.join(WAIT)  # the worker stops waiting once the timeout passes
        assert not hang.returned.is_set()
    finally:
        hang.release.set()


def test_without_a_timeout_no_caller_thread_is_started() -> None:
    names: set[str] = set()

    def look(x: int) -> int:
        names.update(t.name for t in threading.enumerate())
        return x

    Pipeline.from_iter(range(20)).map(look, workers=2).to_list()
    assert not any("-call-" in name for name in names)
    names.clear()
    Pipeline.from_iter(range(20)).map(look, timeout=WAIT, name="look").to_list()
    assert "threadpipe-look-0-call-0" in names


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": 0}, ValueError, "timeout must be a finite number of seconds > 0, got 0"),
        ({"timeout": float("inf")}, ValueError, "got inf"),
        ({"timeout": "1"}, TypeError, "timeout must be a number"),
        ({"timeout": 1.0, "executor": "processes"}, TypeError, "timeout=1.0 is not available with executor="),
        ({"timeout": 1.0, "resource": object}, TypeError, "timeout= with resource="),
    ],
)
def test_timeout_is_checked_when_the_pipeline_is_built(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    for method in ("map", "filter", "flat_map", "each"):
        with pytest.raises(error, match=match):
            getattr(Pipeline.from_iter([1]), method)(str, **kwargs)
    with ThreadPoolExecutor(1) as pool, pytest.raises(TypeError, match="executor="):
        Pipeline.from_iter([1]).map(str, timeout=1, executor=pool)
