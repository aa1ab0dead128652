"""The benchmarks' own bookkeeping: which run wrote each results file (docs/benchmarks.md says
where to look), the order libraries run in within an interleaved repeat, and the variants
``bench/highc.py`` adds as rows of their own."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


BENCH_MODULES = ("run", "highc", "imports", "harness", "peers", "report", "sysinfo", "workloads")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """bench/ importable as scripts import each other there; its modules forgotten afterwards."""
    monkeypatch.syspath_prepend(str(BENCH))
    yield
    for name in BENCH_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def run_module(bench: None) -> Any:
    import run  # bench/run.py

    return run


def test_a_machine_json_without_a_results_map_vouches_for_every_file_there(
    run_module: Any, tmp_path: Path
) -> None:
    (tmp_path / "headline.csv").write_text("c\n")
    (tmp_path / "headline.png").write_bytes(b"")
    (tmp_path / "errors.log").write_text("")
    machine = tmp_path / "machine.json"
    machine.write_text(
        json.dumps({"date (UTC)": "2026-11-29 17:04", "command": "python bench/run.py"})
    )
    assert run_module.provenance(machine) == {
        "headline.csv": "2026-11-29 17:04: python bench/run.py",
        "headline.png": "2026-11-29 17:04: python bench/run.py",
    }


def test_a_results_map_is_kept_as_it_is_and_nothing_is_made_up_without_one(
    run_module: Any, tmp_path: Path
) -> None:
    machine = tmp_path / "machine.json"
    assert run_module.provenance(machine) == {}
    results = {"coroutine.csv": "2026-11-29 19:30: python bench/run.py --only coroutine"}
    machine.write_text(json.dumps({"date (UTC)": "x", "command": "y", "results": results}))
    (tmp_path / "headline.csv").write_text("c\n")  # not written by a recorded run: not claimed
    assert run_module.provenance(machine) == results


def test_interleaved_repeats_give_every_library_every_place_equally(run_module: Any) -> None:
    # bench/highc.py and bench/coroutine.py --reps run the libraries of a repeat in this order:
    # over any len(libs) repeats in a row, each library runs once in each place.
    from report import rotated

    libs = ["threadpipe", "handwritten", "executor", "streamable"]
    for start in range(3):
        orders = [rotated(libs, turn) for turn in range(start, start + len(libs))]
        assert all(sorted(order) == sorted(libs) for order in orders)
        for place in range(len(libs)):
            assert sorted(order[place] for order in orders) == sorted(libs)
    assert rotated([], 5) == []


def test_highc_runs_a_first_buffer_variant_as_a_row_paired_with_threadpipe(
    bench: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import highc  # bench/highc.py

    monkeypatch.setattr(highc, "N_ITEMS", 40)  # a second, not the minutes of the real size
    args = ["--c", "4", "--reps", "2", "--libs", "threadpipe", "--no-fresh", "--no-floor"]
    assert highc.main([*args, "--first-buffer", "8,64"]) == 0
    rows = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "threadpipe b8" in rows and "threadpipe b64" in rows
    # Each variant's outputs were checked (``library_run``), and it is compared repeat by repeat.
    assert rows["threadpipe b8"].endswith("/2")
    # The variant is the same pipeline with only its first buffer sized.
    import threadpipe as tp
    from peers import build_threadpipe

    stages = [abs, abs, abs]
    by_hand = tp.Pipeline.from_iter([]).backpressure(8)
    for fn in stages:
        by_hand = by_hand.map(fn, workers=4, ordered=False)
    variant = build_threadpipe(stages, [], 4, None, 8).buffer_bound()
    assert variant == by_hand.buffer_bound() < build_threadpipe(stages, [], 4, None).buffer_bound()


def test_highc_runs_a_capped_carried_reference_per_thread_count(
    bench: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import highc  # bench/highc.py

    monkeypatch.setattr(highc, "N_ITEMS", 40)
    args = ["--c", "4", "--reps", "2", "--libs", "threadpipe", "--no-fresh"]
    assert highc.main([*args, "--carried-threads", "2,5"]) == 0
    rows = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "the same with 2 threads" in rows["carried t2"]
    assert "the same with 5 threads" in rows["carried t5"]
    # Each thread carries one item at a time: with 2 threads, 2 calls at most are in flight.
    from workloads import sleep_stages, uniform_table

    in_flight = most = 0
    lock = threading.Lock()

    def counted(fn: Any) -> Any:
        def call(item: Any) -> Any:
            nonlocal in_flight, most
            with lock:
                in_flight += 1
                most = max(most, in_flight)
            try:
                return fn(item)
            finally:
                with lock:
                    in_flight -= 1

        return call

    stages = [counted(fn) for fn in sleep_stages(uniform_table(40))]
    highc.carried_run(stages, 4, 2)
    assert most == 2
    highc.carried_run(stages, 4)
    assert most > 2


@pytest.mark.parametrize(
    ("option", "what"), [("--first-buffer", "sizes"), ("--carried-threads", "counts")]
)
@pytest.mark.parametrize("value", ["0", "-3", "x", "8,,0"])
def test_highc_refuses_a_count_below_one_naming_the_option(
    bench: None, option: str, what: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import highc  # bench/highc.py

    with pytest.raises(SystemExit) as exit:
        highc.main([option, value])
    assert exit.value.code == 2
    assert f"{option} takes {what} >= 1, got {value!r}" in capsys.readouterr().err


def test_highc_refuses_capped_references_when_references_are_skipped(
    bench: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import highc  # bench/highc.py

    with pytest.raises(SystemExit) as exit:
        highc.main(["--carried-threads", "64", "--no-floor"])
    assert exit.value.code == 2
    assert "--carried-threads adds reference rows, which --no-floor skips" in (
        capsys.readouterr().err
    )


def test_imports_times_each_library_in_fresh_interpreters_with_its_bytecode_compiled(
    bench: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs each, with ``PYTHONDONTWRITEBYTECODE`` set here (the children drop it): a row per
    library and one for the timing's floor, in milliseconds, the floor below threadpipe."""
    import imports  # bench/imports.py

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    assert imports.main(["--reps", "2", "--libs", "threadpipe"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"nothing", "threadpipe"}
    median_ms = float(rows["threadpipe"][2])
    assert 0 < median_ms < 5000
    assert float(rows["nothing"][2]) < median_ms  # importing a loaded module costs next to nothing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reps", "0"], "--reps must be at least 1, got 0"),
        (["--libs", "threadpipe,pumps"], "--libs: unknown library 'pumps'"),
    ],
)
def test_imports_refuses_bad_options_naming_them(
    bench: None, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import imports  # bench/imports.py

    with pytest.raises(SystemExit) as exit:
        imports.main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
