"""Tracing: every call recorded once, a Chrome trace Perfetto opens, capped memory, a timeline."""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import threadpipe as tp
from threadpipe import Pipeline


def traced_run(p: Pipeline[Any], tmp_path: Path, trace: bool | int = True) -> dict[str, Any]:
    with p.start(trace=trace) as run:
        list(run)
    path = tmp_path / "trace.json"
    run.save_trace(path)
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def test_the_trace_file_has_one_x_event_per_call_with_named_processes_and_threads(
    tmp_path: Path,
) -> None:
    p = (
        Pipeline.from_iter(range(50))
        .map(lambda x: x, workers=3, name="first")
        .filter(lambda x: x % 5 == 0, workers=2, ordered=False, name="keep")
    )
    doc = traced_run(p, tmp_path)
    events = doc["traceEvents"]
    calls = [e for e in events if e["ph"] == "X"]
    meta = [e for e in events if e["ph"] == "M"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert processes == {1: "first", 2: "keep"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    for call in calls:
        assert (call["pid"], call["tid"]) in threads
        assert call["name"] == processes[call["pid"]]
        assert call["ts"] >= 0 and call["dur"] >= 0
    assert all(re.fullmatch(r"threadpipe-(first|keep)-\d", name) for name in threads.values())
    # Every item of each stage's input is called exactly once, numbered in input order.
    for pid in (1, 2):
        items = Counter(c["args"]["item"] for c in calls if c["pid"] == pid)
        assert sorted(items) == list(range(50)) and set(items.values()) == {1}
    assert doc["otherData"]["dropped"] == 0


def test_worker_lanes_match_the_real_threads(tmp_path: Path) -> None:
    # Four calls meet at a barrier: they must be on four different lanes of the same stage.
    barrier = threading.Barrier(4, timeout=10)
    p = Pipeline.from_iter(range(4)).map(lambda x: barrier.wait() and x, workers=4, name="meet")
    calls = [e for e in traced_run(p, tmp_path)["traceEvents"] if e["ph"] == "X"]
    assert len({c["tid"] for c in calls}) == 4
    # They overlapped in time: each started before any of them ended.
    assert max(c["ts"] for c in calls) <= min(c["ts"] + c["dur"] for c in calls)


def test_flat_map_calls_span_their_iteration(tmp_path: Path) -> None:
    p = Pipeline.from_iter(range(3)).flat_map(lambda x: range(x), name="spread")
    calls = [e for e in traced_run(p, tmp_path)["traceEvents"] if e["ph"] == "X"]
    assert sorted(c["args"]["item"] for c in calls) == [0, 1, 2]


def test_the_cap_bounds_what_is_kept_and_counts_the_rest(tmp_path: Path) -> None:
    p = Pipeline.from_iter(range(2000)).map(lambda x: x, workers=2).map(lambda x: x)
    doc = traced_run(p, tmp_path, trace=700)
    calls = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    # Never more than the cap; every call is either kept or counted. (Workers reserve the cap in
    # shrinking pieces: slots may be left unused in one worker while another drops, the more so
    # the more workers ran; a loaded machine was seen to keep 564 of 700.)
    assert 700 // 2 <= len(calls) <= 700
    other = doc["otherData"]
    assert (other["generator"], other["cap"]) == ("threadpipe", 700)
    assert len(calls) + other["dropped"] == 4000
    assert tp.DEFAULT_TRACE_CAP == 100_000


def test_a_failing_call_is_recorded(tmp_path: Path) -> None:
    def bad(x: int) -> int:
        raise OSError(x)

    run = Pipeline.from_iter([7]).map(bad, name="bad").start(trace=True)
    with pytest.raises(OSError):
        list(run)
    path = tmp_path / "t.json"
    run.save_trace(path)
    (call,) = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert call["args"] == {"item": 0} and call["name"] == "bad"


def test_untraced_workers_call_the_function_directly() -> None:
    # Tracing off costs nothing because nothing is wrapped: the caller of fn is the stage's call
    # loop (``_call_all``), which calls the user's function as it is.
    callers: list[str] = []

    def who(x: int) -> int:
        callers.append(sys._getframe(1).f_code.co_name)
        return x

    Pipeline.from_iter([1]).map(who).run()
    with Pipeline.from_iter([1]).map(who).start(trace=True) as run:
        list(run)
    assert callers == ["_call_all", "traced"]


def test_a_run_without_trace_refuses_to_save_one(tmp_path: Path) -> None:
    with Pipeline.from_iter([1]).map(str).start() as run:
        list(run)
    with pytest.raises(tp.RunStateError, match="trace=True"):
        run.save_trace(tmp_path / "x.json")
    with pytest.raises(tp.RunStateError, match="trace=True"):
        run.plot_timeline(tmp_path / "x.png")


def test_start_checks_trace() -> None:
    p = Pipeline.from_iter([1]).map(str)
    with pytest.raises(TypeError, match="trace must be"):
        p.start(trace="on")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="trace must be"):
        p.start(trace=0)


def test_plot_timeline_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    p = Pipeline.from_iter(range(20)).map(lambda x: x, workers=2, name="a").map(str, name="b")
    with p.start(trace=True) as run:
        list(run)
    path = tmp_path / "timeline.png"
    run.plot_timeline(path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_timeline_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Pipeline.from_iter([1]).map(str).start(trace=True) as run:
        list(run)
    # A None entry in sys.modules makes the import fail, as if matplotlib were not installed.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'threadpipe\[plot\]'"):
        run.plot_timeline(tmp_path / "x.png")
