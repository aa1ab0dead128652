"""Progress bars: one per stage, right totals, one refreshing thread, closed however a run ends."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pyte
import pytest
from tqdm import tqdm

from threadpipe import Pipeline

PROGRESS_THREAD = "threadpipe-progress-0"


def progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PROGRESS_THREAD]


def final_lines(text: str) -> dict[str, str]:
    """The last state drawn for each bar, keyed by its label."""
    last: dict[str, str] = {}
    for chunk in re.split(r"[\r\n]|\x1b\[A", text):
        match = re.match(r"\s*(\w+)\s*:", chunk)
        if match:
            last[match[1]] = chunk
    return last


def test_one_bar_per_stage_with_totals_until_a_filter() -> None:
    out = io.StringIO()
    p = (
        Pipeline.from_iter(range(20))
        .map(lambda x: x, name="first")
        .each(lambda x: None, name="look")
        .filter(lambda x: x % 2 == 0, name="even")
        .map(lambda x: x, name="after")
    )
    assert len(p.to_list(progress={"file": out})) == 10
    bars = final_lines(out.getvalue())
    assert set(bars) == {"first", "look", "even", "after"}
    assert "20/20" in bars["first"] and "20/20" in bars["look"]
    # After a filter the count is unknown: a plain count, no total, never a wrong "10/20".
    assert re.match(r"even\s*: 10it \[", bars["even"])
    assert re.match(r"after\s*: 10it \[", bars["after"])
    assert "in flight 0, buffer 0/32" in bars["first"]


def test_a_generator_source_has_no_total() -> None:
    out = io.StringIO()
    assert (
        Pipeline.from_iter(x for x in range(5)).map(str, name="s").run(progress={"file": out}) == 5
    )
    bar = final_lines(out.getvalue())["s"]
    assert re.search(r"\b5it\b", bar) and "/5" not in bar


def test_one_progress_thread_refreshes_and_ends_when_iteration_ends() -> None:
    release = threading.Event()
    run = (
        Pipeline.from_iter(range(4))
        .map(lambda x: release.wait(10) and x, workers=2)
        .map(lambda x: x)
        .start(progress={"file": io.StringIO()})
    )
    assert len(progress_threads()) == 1
    release.set()
    assert sorted(run) == [0, 1, 2, 3]
    # The end of the outputs closes the bars at once, so the caller's next line is not overdrawn.
    assert progress_threads() == []
    run.join(10)


def test_an_idle_run_with_bars_burns_no_cpu() -> None:
    # The progress thread waits on an event between refreshes; a polling loop would show here.
    release = threading.Event()
    run = (
        Pipeline.from_iter([1])
        .map(lambda x: release.wait(10) and x)
        .start(progress={"file": io.StringIO()})
    )
    try:
        cpu = time.process_time()
        release.wait(0.5)  # a window to measure in, not synchronisation
        assert time.process_time() - cpu < 0.25  # 10 refreshes cost milliseconds; 5x+ slack
    finally:
        release.set()
    assert list(run) == [1]


def open_bars() -> int:
    return sum(1 for bar in list(tqdm._instances) if not bar.disable)  # type: ignore[attr-defined]


def test_bars_close_when_a_stage_fails() -> None:
    before = open_bars()
    out = io.StringIO()

    def bad(x: int) -> int:
        if x == 5:
            raise ZeroDivisionError(x)
        return x

    with pytest.raises(ZeroDivisionError):
        Pipeline.from_iter(range(10)).map(bad, name="bad").map(str).to_list(progress={"file": out})
    assert progress_threads() == [] and open_bars() == before
    assert "errors 1" in final_lines(out.getvalue())["bad"]


def test_bars_close_when_the_caller_breaks_out() -> None:
    before = open_bars()
    p = Pipeline.from_iter(range(10**6)).map(lambda x: x)
    run = p.start(progress={"file": io.StringIO()})
    for x in run:
        if x == 10:
            break
    run.cancel()  # closes the bars before it returns
    assert progress_threads() == [] and open_bars() == before


def test_bars_close_when_the_run_is_dropped_mid_iteration() -> None:
    before = open_bars()
    run = Pipeline.from_iter(range(10**6)).map(lambda x: x).start(progress={"file": io.StringIO()})
    next(iter(run))
    del run
    # Dropping the run cancels it; the progress thread sees the stop and closes the bars.
    for thread in progress_threads():
        thread.join(10)
    assert progress_threads() == [] and open_bars() == before


def test_options_apply_to_every_bar_and_position_is_the_first_bars() -> None:
    out = io.StringIO()
    p = Pipeline.from_iter(range(3)).map(str, name="a").map(str, name="b")
    p.run(progress={"file": out, "unit": "photo", "position": 2, "ascii": True})
    bars = final_lines(out.getvalue())
    assert "3/3" in bars["a"] and "photo/s" in bars["a"] and "photo/s" in bars["b"]


def test_leave_false_clears_the_bars_and_leave_true_keeps_them() -> None:
    cleared, kept = io.StringIO(), io.StringIO()
    Pipeline.from_iter(range(3)).map(str, name="a").run(progress={"file": cleared, "leave": False})
    Pipeline.from_iter(range(3)).map(str, name="a").run(progress={"file": kept})
    last = [chunk for chunk in cleared.getvalue().split("\r") if chunk][-1]
    assert last.strip() == ""  # the bar was overwritten with blanks
    assert kept.getvalue().endswith("\n") and "3/3" in kept.getvalue().splitlines()[-1]


def test_bad_progress_arguments_fail_before_anything_starts() -> None:
    source = iter(range(3))
    p = Pipeline.from_iter(source).map(str)
    with pytest.raises(TypeError, match="progress must be"):
        p.start(progress="yes")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="no_such_option"):
        p.start(progress={"no_such_option": 1, "file": io.StringIO()})
    # Nothing was consumed: the one-shot source still runs.
    assert p.to_list() == ["0", "1", "2"]


def test_progress_true_draws_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert Pipeline.from_iter(range(3)).map(str, name="stringify").run(progress=True) == 3
    captured = capsys.readouterr()
    assert "stringify" in captured.err and "3/3" in captured.err and captured.out == ""


class QuietBar(tqdm):  # type: ignore[type-arg]
    """A user's bar that starts no tqdm monitor thread (it would outlive the test)."""

    monitor_interval = 0


@pytest.mark.parametrize("stages, first_line", [(1, 1), (2, 3)])
def test_the_stack_goes_on_the_first_free_lines_it_fits_in(stages: int, first_line: int) -> None:
    # Bars open on lines 0 and 2: one stage bar fits in the gap on line 1, two go below line 2.
    sink = io.StringIO()
    release = threading.Event()
    with (
        QuietBar(total=1, file=sink, position=0, desc="top"),
        QuietBar(total=1, file=sink, position=2, desc="third"),
    ):
        p = Pipeline.from_iter([1]).map(lambda x: release.wait(10) and x, name="s0")
        for i in range(1, stages):
            p = p.map(str, name=f"s{i}")
        run = p.start(progress={"file": sink})
        try:
            lines = {
                bar.desc.strip(): abs(bar.pos)
                for bar in list(tqdm._instances)  # type: ignore[attr-defined]
                if bar.desc.startswith("s")
            }
        finally:
            release.set()
        assert len(list(run)) == 1
    assert lines == {f"s{i}": first_line + i for i in range(stages)}


# --- Bars on a real terminal: a child process under a pseudo-terminal, replayed through pyte ---

ROOT = Path(__file__).resolve().parent.parent
COLUMNS, ROWS = 100, 24

# The child's first call of each run waits until the run's monitor has refreshed the stage bars
# once (their postfix, "in flight ...", reaches the terminal), so that every run shows bars that
# are being refreshed from the monitor thread. An event gates it; nothing waits on time.
GATE = """
import sys, threading
from tqdm import tqdm
import threadpipe as tp

refreshed = threading.Event()

class Watched:
    def __init__(self, stream):
        self._stream = stream
    def write(self, text):
        if "in flight" in text:
            refreshed.set()
        return self._stream.write(text)
    def __getattr__(self, name):
        return getattr(self._stream, name)

sys.stderr = Watched(sys.stderr)

def square(x):
    if x % 1000 == 0:
        assert refreshed.wait(10), "the monitor did not refresh the bars"
    return x * x
"""

# An outer tqdm bar over parts, and a pipeline run with bars for each part: the pattern of
# `for part in tqdm(parts): pipeline.run(progress=True)`.
NESTED_IN_A_LOOP = (
    GATE
    + """
for part in tqdm(range(4), desc="OUTER", mininterval=0):
    refreshed.clear()
    p = (tp.Pipeline.from_iter(range(part * 1000, part * 1000 + 30))
         .map(square, workers=2)
         .filter(lambda x: x % 3 == 0, name="thirds"))
    assert p.run(progress=True) == 10
print("done")
"""
)

# A user's own bar, made before start(), updated from the caller's loop while the stage bars draw.
USER_BAR_FIRST = (
    GATE
    + """
bar = tqdm(total=60, desc="OUTER", mininterval=0)
run = tp.Pipeline.from_iter(range(60)).map(square).map(str, name="thirds").start(progress=True)
for _ in run:
    bar.update()
run.join(10)
bar.close()
print("done")
"""
)


def run_in_a_terminal(script: str, timeout: float = 30) -> bytes:
    """Run ``python -c script`` with its stdin, stdout and stderr on a pseudo-terminal.

    Returns:
        Every byte the child wrote to the terminal, in order.
    """
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONIOENCODING": "utf-8"}
        env.pop("COLUMNS", None)
        env.pop("LINES", None)
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-c", script],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the child did not finish in {timeout} s; it wrote:\n{output!r}"
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: every copy of the terminal's other end is closed
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, bytes(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return bytes(output)


def frames(output: bytes) -> list[list[str]]:
    """The screen after each complete bar drawing: tqdm starts every drawing with a carriage
    return, so the screen just before each ``\\r`` (and at the end) is one frame. Splitting on the
    bytes, not on how the reads happened to arrive, keeps the frames the same from run to run."""
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    shots = []
    start = 0
    for end in [i for i, byte in enumerate(output) if byte == ord("\r")] + [len(output)]:
        stream.feed(output[start:end])
        shots.append([line.rstrip() for line in screen.display])
        start = end
    return shots


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "script", [NESTED_IN_A_LOOP, USER_BAR_FIRST], ids=["run-in-a-tqdm-loop", "user-bar-first"]
)
def test_stage_bars_go_below_open_bars_and_never_hide_them(script: str) -> None:
    shots = frames(run_in_a_terminal(script))
    first = next(i for i, shot in enumerate(shots) if shot[0].startswith("OUTER"))
    hidden = [i for i, shot in enumerate(shots[first:], first) if not shot[0].startswith("OUTER")]
    assert not hidden, (
        f"the outer bar is missing from line 0 in {len(hidden)} of {len(shots) - first} frames; "
        f"the first such frame:\n" + "\n".join(shots[hidden[0]])
    )
    # The stage bars were drawn right below it, refreshed by the monitor, and never on its line.
    assert any(
        shot[1].startswith("square") and shot[2].startswith("thirds") and "in flight" in shot[1]
        for shot in shots
    ), "\n".join(shots[-1])
    assert not any(shot[0].startswith(("square", "thirds")) for shot in shots)
    final = shots[-1]
    assert re.match(r"OUTER: 100%\|.*\| (4/4|60/60) ", final[0]), final[0]
    # Below other bars the stage bars are cleared when their run ends, so the screen ends clean.
    assert final[1] == "done" and not any(final[2:]), "\n".join(final)
