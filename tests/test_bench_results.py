"""The benchmarks' own bookkeeping: which run wrote each results file (docs/benchmarks.md says
where to look), and the order libraries run in within an interleaved repeat."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def run_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(BENCH))
    import run  # bench/run.py

    yield run
    for name in ("run", "harness", "peers", "report", "sysinfo", "workloads"):
        sys.modules.pop(name, None)


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
