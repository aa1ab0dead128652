"""Stopping early: break, exceptions in the loop body, dropped iterators, Ctrl-C, interpreter exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from threadpipe import Pipeline

from sources import Endless


def wide(p: Pipeline[int]) -> Pipeline[int]:
    return p.map(lambda x: x, workers=3).map(lambda x: x, workers=2, ordered=False).map(lambda x: x)


def test_break_cancels_the_run_and_closes_the_source() -> None:
    src = Endless()
    for x in wide(Pipeline.from_iter(iter(src))):
        if x == 10:
            break
    assert src.closed.wait(10)


def test_exception_in_the_loop_body_cancels_the_run() -> None:
    src = Endless()
    with pytest.raises(ZeroDivisionError):
        for x in wide(Pipeline.from_iter(iter(src))):
            if x == 10:
                1 / 0  # noqa: B018
    assert src.closed.wait(10)


def test_dropping_the_iterator_cancels_the_run() -> None:
    src = Endless()
    it = iter(wide(Pipeline.from_iter(iter(src))))
    assert next(it) >= 0
    del it
    assert src.closed.wait(10)


def test_break_returns_without_waiting_for_a_running_call_and_never_calls_again() -> None:
    inside = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def slow(x: int) -> int:
        calls.append(x)
        if x == 3:
            inside.set()
            release.wait(30)
        return x

    # A safety net: if break waited for the call, the test would otherwise hang until its timeout.
    safety = threading.Timer(20, release.set)
    safety.start()
    try:
        started = time.monotonic()
        for x in Pipeline.from_iter(range(1000)).map(lambda x: x).map(slow, workers=2, ordered=False):
            if inside.is_set():
                break
        else:
            pytest.fail("the loop should have been broken out of")
        assert time.monotonic() - started < 10
        assert not release.is_set()
        count = len(calls)
        release.set()
    finally:
        safety.cancel()
    # The thread that was inside the call exits once the call returns; nothing else is called.
    deadline = time.monotonic() + 10
    while any(t.name.startswith("threadpipe-slow") for t in threading.enumerate()):
        assert time.monotonic() < deadline
        release.wait(0.01)
    assert len(calls) == count


def test_cancel_wakes_every_thread_blocked_on_a_full_or_empty_buffer() -> None:
    gate = threading.Event()
    p = (
        Pipeline.from_iter(Endless())
        .map(lambda x: x, workers=4)
        .backpressure(1)
        .map(lambda x: gate.wait(30) and x, workers=4)
    )
    run = p.start()
    run.cancel()
    gate.set()
    run.join(10)
    assert run.cancelled


def run_script(code: str, *, wait_for: str | None = None, sigint: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; optionally send SIGINT once it prints ``wait_for``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            if wait_for is not None:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert wait_for in line, line + proc.stderr.read()  # type: ignore[union-attr]
                if sigint:
                    proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["iterating", "joining", "with-block"])
def test_ctrl_c_raises_keyboard_interrupt_promptly_and_cancels(where: str) -> None:
    body = {
        "iterating": "for x in run: pass",
        "joining": "run.join()",
        "with-block": "with run: list(run)",
    }[where]
    code = f"""
    import signal, sys, threading, time
    from threadpipe import Pipeline
    # A shell that runs this test in the background starts it with SIGINT ignored; Python then
    # installs no handler of its own. Install the default one, as an interactive script has.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    closed = threading.Event()
    def source():
        try:
            i = 0
            while True:
                i += 1
                yield i
        finally:
            closed.set()
    forever = threading.Event()
    run = Pipeline.from_iter(source()).map(lambda x: x, workers=2).map(lambda x: forever.wait(), workers=2).start()
    main = threading.main_thread().ident

    def announce():
        # Say "ready" only once the main thread waits inside threadpipe, so that the signal
        # lands in the library's wait and not in the script's own lines around it.
        while True:
            frame = sys._current_frames().get(main)
            while frame is not None and "threadpipe" not in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None:
                print("ready", flush=True)
                return
            forever.wait(0.01)

    threading.Thread(target=announce, daemon=True).start()
    started = time.monotonic()
    try:
        {body}
    except KeyboardInterrupt:
        print("interrupted", round(time.monotonic() - started, 2), flush=True)
        print("closed", closed.wait(10), flush=True)
        sys.exit(3)
    """
    result = run_script(code, wait_for="ready", sigint=True)
    assert result.returncode == 3, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0].startswith("interrupted")
    assert float(lines[0].split()[1]) < 5
    assert lines[1] == "closed True"


@pytest.mark.timeout(60)
def test_interpreter_exit_with_a_run_going_does_not_hang() -> None:
    code = """
    import threading
    from threadpipe import Pipeline
    def source():
        i = 0
        while True:
            i += 1
            yield i
    forever = threading.Event()
    run = Pipeline.from_iter(source()).map(lambda x: x, workers=3).map(lambda x: forever.wait()).start()
    it = iter(run)
    print("ready", flush=True)
    """
    started = time.monotonic()
    result = run_script(code, wait_for="ready")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert time.monotonic() - started < 15


@pytest.mark.timeout(60)
def test_interpreter_exit_mid_iteration_of_a_pipeline_does_not_hang() -> None:
    code = """
    import sys
    from threadpipe import Pipeline
    def source():
        i = 0
        while True:
            i += 1
            yield i
    for x in Pipeline.from_iter(source()).map(lambda x: x, workers=2):
        if x == 100:
            print("ready", flush=True)
            sys.exit(0)
    """
    result = run_script(code, wait_for="ready")
    assert result.returncode == 0, result.stderr
