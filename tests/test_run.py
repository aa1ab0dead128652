"""The run object: iterate once, join, cancel, context manager."""

from __future__ import annotations

import threading

import pytest

import threadpipe as tp
from threadpipe import Pipeline

from sources import Endless


def test_a_run_iterates_once() -> None:
    run = Pipeline.from_iter(range(3)).map(lambda x: x).start()
    assert list(run) == [0, 1, 2]
    with pytest.raises(tp.RunStateError, match="already iterated"):
        iter(run)
    run.join(10)
    assert run.done and not run.cancelled and run.exception is None


def test_join_times_out_while_a_call_runs_then_succeeds() -> None:
    release = threading.Event()
    run = Pipeline.from_iter([1]).map(lambda x: release.wait(10) and x).start()
    with pytest.raises(TimeoutError, match="did not finish"):
        run.join(timeout=0.05)
    release.set()
    assert list(run) == [1]
    run.join(10)


def test_cancel_from_another_thread_ends_iteration_quietly() -> None:
    entered = threading.Event()
    release = threading.Event()

    def slow(x: int) -> int:
        if x == 5:
            entered.set()
            release.wait(10)
        return x

    run = Pipeline.from_iter(range(100)).map(slow).start()
    out: list[int] = []
    canceller = threading.Thread(target=lambda: (entered.wait(10), run.cancel(), release.set()))
    canceller.start()
    out = list(run)
    canceller.join(10)
    assert out == list(range(len(out))) and len(out) <= 5
    run.join(10)
    assert run.cancelled and run.exception is None


def test_context_manager_cancels_what_is_unfinished_and_joins() -> None:
    calls: list[int] = []
    with Pipeline.from_iter(range(10**9)).map(calls.append).start() as run:
        assert next(iter(run)) is None
    assert run.done and run.cancelled
    assert len(calls) < 10**9


def test_context_manager_lets_the_block_exception_propagate() -> None:
    with pytest.raises(KeyError):
        with Pipeline.from_iter(range(10)).map(lambda x: x).start() as run:
            raise KeyError("block")
    assert run.done


def test_context_manager_raises_the_stage_exception_on_a_clean_exit() -> None:
    def fail(x: int) -> int:
        raise ArithmeticError(x)

    with pytest.raises(ArithmeticError):
        with Pipeline.from_iter([1]).map(fail).start() as run:
            run.join(10)


def test_block_exception_wins_and_mentions_the_stage_failure() -> None:
    def fail(x: int) -> int:
        raise ArithmeticError(x)

    with pytest.raises(KeyError) as info:
        with Pipeline.from_iter([1]).map(fail).start() as run:
            with pytest.raises(ArithmeticError):
                run.join(10)
            raise KeyError("block")
    assert any("ArithmeticError" in note for note in info.value.__notes__)


def test_complete_run_is_not_marked_cancelled() -> None:
    p = Pipeline.from_iter(range(5)).map(lambda x: x, workers=2)
    with p.start() as run:
        assert sorted(run) == list(range(5))
    assert run.done and not run.cancelled


def test_repr_shows_status() -> None:
    run = Pipeline.from_iter([1]).map(lambda x: x, name="ident").start()
    list(run)
    run.join(10)
    assert "ident" in repr(run) and "done" in repr(run)


def test_dropping_an_unfinished_run_cancels_it() -> None:
    source = Endless()
    run = Pipeline.from_iter(iter(source)).map(lambda x: x).start()
    del run
    assert source.closed.wait(10)
