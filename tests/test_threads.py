"""The threads of a run: counted crews, and the process's parked threads that pooled crews reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from threadpipe import Pipeline, _threads
from threadpipe._threads import IDLE_NAME, PREFIX, drain, settle


@pytest.fixture(autouse=True)
def empty_pool() -> Iterator[None]:
    """Each test starts with no parked thread, so what it sees parked is its own."""
    drain(10)
    yield


def _parked() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == IDLE_NAME]


def _wide(
    n: int, workers: int, record: set[int], gate: threading.Barrier | None = None
) -> Pipeline[int]:
    def note(x: int) -> int:
        record.add(threading.get_ident())
        if gate is not None:
            gate.wait(10)  # every worker holds an item at once: the stage grew to ``workers``
        return x

    return Pipeline.from_iter(range(n)).map(note, workers=workers, ordered=False, name="note")


def test_a_run_reuses_the_threads_the_previous_run_parked() -> None:
    first: set[int] = set()
    assert sorted(_wide(4, 4, first, threading.Barrier(4))) == [0, 1, 2, 3]
    parked = {t.ident for t in _parked()}
    assert first <= parked  # the workers (and the feeder) parked when the run was done
    second: set[int] = set()
    assert sorted(_wide(4, 4, second, threading.Barrier(4))) == [0, 1, 2, 3]
    assert second <= parked  # no new thread: the second run's workers are the first one's


def test_a_pooled_thread_bears_its_stage_name_while_it_serves_and_the_idle_name_after() -> None:
    names: list[str] = []
    out = (
        Pipeline.from_iter([1])
        .map(lambda x: names.append(threading.current_thread().name) or x, name="named")
        .to_list()
    )
    assert out == [1]
    assert names == [f"{PREFIX}named-0"]
    # Renamed before the run is counted done: no thread bears a stage's name once it is.
    assert not [t.name for t in threading.enumerate() if t.name.startswith(f"{PREFIX}named")]
    assert _parked()


def test_settle_waits_until_every_pooled_job_has_returned() -> None:
    started, release = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(10)

    _threads._POOL.launch(f"{PREFIX}settle-0", job, ())
    assert started.wait(10)
    assert not settle(0.05)  # the job is still running
    release.set()
    assert settle(10)
    assert _parked()


def test_settle_counts_out_a_job_that_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    raised: list[type[BaseException] | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_type))
    started, release = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        release.wait(10)
        raise ValueError("a job's own failure")

    _threads._POOL.launch(f"{PREFIX}settle-raises", job, ())
    assert started.wait(10)
    (thread,) = [t for t in threading.enumerate() if t.name == f"{PREFIX}settle-raises"]
    release.set()
    assert settle(10)
    thread.join(10)
    assert raised == [ValueError]  # the thread ended with it, reported, and is not parked


def test_drain_retires_every_parked_thread() -> None:
    _wide(8, 4, set()).to_list()
    parked = _parked()
    assert parked
    assert drain(10) == len(parked)
    assert not any(t.is_alive() for t in parked)


def test_a_parked_thread_exits_after_the_idle_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_threads, "IDLE_SECONDS", 0.05)
    _wide(8, 4, set()).to_list()
    parked = _parked()
    assert parked
    for thread in parked:
        thread.join(10)  # nobody wakes them: they leave on their own
    assert not any(t.is_alive() for t in parked)


def test_cpu_seconds_of_a_reused_thread_count_only_its_own_run() -> None:
    def spin(x: int) -> int:
        deadline = time.thread_time() + 0.2
        while time.thread_time() < deadline:
            pass
        return x

    run = Pipeline.from_iter([1]).map(spin).start()
    assert list(run) == [1]
    run.join(10)
    busy = run.stats()[0].cpu_seconds
    assert busy is not None and busy >= 0.15
    run = Pipeline.from_iter([1]).map(lambda x: x).start()
    assert list(run) == [1]
    run.join(10)
    idle = run.stats()[0].cpu_seconds
    # The same parked thread ran both; the second stage did next to nothing.
    assert idle is not None and idle < busy / 2


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_parked_threads_do_not_hold_up_interpreter_exit() -> None:
    started = time.monotonic()
    proc = _python(
        """
        import threading
        from threadpipe import Pipeline
        assert Pipeline.from_iter(range(100)).map(str, workers=8).to_list()[:2] == ["0", "1"]
        assert any(t.name == "threadpipe.idle" for t in threading.enumerate())
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    # Far below the idle time times any count: exit does not wait for parked threads.
    assert time.monotonic() - started < _threads.IDLE_SECONDS * 5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_a_forked_child_starts_its_own_threads() -> None:
    proc = _python(
        """
        import os
        from threadpipe import Pipeline
        p = Pipeline.from_iter(range(50)).map(lambda x: x + 1, workers=4, ordered=False)
        assert sorted(p.to_list()) == list(range(1, 51))  # leaves threads parked
        pid = os.fork()
        if pid == 0:
            # The parent's parked threads are not in this process: the run must start its own.
            ok = sorted(p.to_list()) == list(range(1, 51))
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
