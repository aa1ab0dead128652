"""The one stop: cancel scopes, segments cut by take(), and the crew that runs a stage's threads."""

from __future__ import annotations

import itertools
import threading

import pytest

from threadpipe import Pipeline
from threadpipe._run import RunState
from threadpipe._scope import Cancelled, Scope
from threadpipe._threads import Crew


class Member:
    def __init__(self, fail: bool = False) -> None:
        self.aborted = 0
        self.fail = fail

    def abort(self) -> None:
        self.aborted += 1
        if self.fail:
            raise RuntimeError("abort failed")


def test_cancelling_a_scope_aborts_its_members_and_children_and_sets_its_event() -> None:
    root = Scope()
    child = Scope(root)
    failing, first, second = Member(fail=True), Member(), Member()
    root.add(failing)
    root.add(first)
    child.add(second)
    root.cancel()
    assert root.cancelled[0] and child.cancelled[0]
    assert root.event.is_set() and child.event.is_set()
    # One member failing to abort does not leave the others blocked.
    assert (failing.aborted, first.aborted, second.aborted) == (1, 1, 1)
    late = Member()
    root.add(late)  # added after the cancel: aborted at once
    assert late.aborted == 1


def test_cancelling_a_child_leaves_the_parent_running() -> None:
    root = Scope()
    child = Scope(root)
    child.cancel()
    assert child.cancelled[0] and not root.cancelled[0]


def test_cancelled_is_not_an_exception_a_user_handler_catches() -> None:
    assert not issubclass(Cancelled, Exception)


def test_a_crew_sends_the_end_once_when_its_last_thread_exits_having_seen_it() -> None:
    from threadpipe._channel import END, Channel

    state = RunState()
    out = Channel(4)
    crew = Crew("t", state, state.segments[0], out)
    release = threading.Event()
    names: list[str] = []

    def body(index: int, saw_end: bool) -> bool:
        names.append(threading.current_thread().name)
        release.wait(10)
        return saw_end

    assert crew.start(body, True)
    assert crew.start(body, False)
    assert not crew.start(body, False, limit=2)  # full
    release.set()
    assert state.done.wait(10)
    assert list(out.queue) == [END]
    assert sorted(names) == ["threadpipe-t-0", "threadpipe-t-1"]


def test_a_cancelled_crews_end_is_not_sent_and_it_starts_nothing_more() -> None:
    from threadpipe._channel import Channel

    state = RunState()
    out = Channel(4)
    scope = state.segments[0]
    crew = Crew("t", state, scope, out)
    assert crew.start(lambda index: True)
    assert state.done.wait(10)
    scope.cancel()
    assert not crew.start(lambda index: True)
    assert list(out.queue)  # the first thread ended before the cancel: its end went on
    state2 = RunState()
    out2 = Channel(4)
    crew2 = Crew("u", state2, state2.segments[0], out2)
    gate = threading.Event()
    crew2.start(lambda index: gate.wait(10))
    state2.segments[0].cancel()
    gate.set()
    assert state2.done.wait(10)
    assert not list(out2.queue)


def test_take_cuts_off_its_segment_only() -> None:
    p = Pipeline.from_iter(itertools.count()).map(lambda x: x, workers=2).take(5).map(lambda x: x + 1)
    run = p.start()
    assert list(run) == [1, 2, 3, 4, 5]
    run.join(timeout=10)
    state = run._state
    first, second = state.segments
    assert first.cancelled[0] and not second.cancelled[0]
    assert not run.cancelled and run.exception is None


def test_a_report_says_when_its_monitor_stopped_early() -> None:
    run = Pipeline.from_iter(range(3)).map(lambda x: x).start(monitor=True)
    assert list(run) == [0, 1, 2]
    run.join(timeout=10)
    assert run._monitor is not None
    run._monitor.failure = OSError("terminal went away")
    assert "the monitor stopped early (OSError: terminal went away)" in run.report()


@pytest.mark.parametrize("stage", ["thread", "pipe"])
def test_a_failure_in_a_cancelled_scope_is_not_the_runs_exception(stage: str) -> None:
    entered = threading.Event()
    release = threading.Event()

    def fn(x: int) -> int:
        entered.set()
        release.wait(10)
        raise ValueError("raised while the run stops")

    def gen(items):  # type: ignore[no-untyped-def]
        for x in items:
            yield fn(x)

    p = Pipeline.from_iter(range(10))
    p = p.map(fn) if stage == "thread" else p.pipe(gen)
    run = p.start()
    assert entered.wait(10)
    run.cancel()
    release.set()
    run.join(timeout=10)  # raises nothing
    assert run.cancelled and run.exception is None
