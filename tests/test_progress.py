"""Progress bars: one per stage, right totals, one refreshing thread, closed however a run ends."""

from __future__ import annotations

import io
import re
import threading
import time

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
