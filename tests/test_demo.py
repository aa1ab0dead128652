"""``python -m threadpipe.demo`` runs, draws its bars, and its report names the bottleneck; bad
options, a missing extra and an empty run end in plain words, not tracebacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from threadpipe.demo import main

ROOT = Path(__file__).resolve().parent.parent


def run_demo(*code: str, timeout: float = 50) -> subprocess.CompletedProcess[str]:
    """Run ``python -W error -c CODE`` with this checkout importable, output captured."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", "\n".join(code)],
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(60)
def test_the_demo_shows_bars_and_names_the_upload_stage(tmp_path: Path) -> None:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    trace = tmp_path / "trace.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "threadpipe.demo",
            "--items",
            "40",
            "--latency",
            "0.02",
            "--trace",
            str(trace),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for stage in ("download", "thumbnail", "upload"):
        assert stage in proc.stderr  # the bars
    assert "40/40" in proc.stderr
    assert "uploaded 40 thumbnails" in proc.stdout
    # Uploads take 12 ms on 2 threads, everything else keeps up: the report must say so.
    assert "bottleneck: stage 'upload'" in proc.stdout
    assert "more workers for it (now 2)" in " ".join(proc.stdout.split())
    assert trace.stat().st_size > 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "option, value",
    [
        ("--uploaders", "0"),
        ("--downloaders", "0"),
        ("--uploaders", "-3"),
        ("--uploaders", "two"),
        ("--items", "-1"),
        ("--latency", "-0.5"),
    ],
)
def test_a_bad_count_is_a_usage_error_naming_the_option(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([option, value, "--no-progress"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran: no title, no report
    assert captured.err.startswith("usage: python -m threadpipe.demo")
    assert f"error: argument {option}: " in captured.err and value in captured.err


@pytest.mark.timeout(60)
def test_uploaders_0_exits_2_with_the_usage_and_no_traceback() -> None:
    proc = run_demo(
        "import sys, runpy",
        "sys.argv = ['demo', '--uploaders', '0']",
        "runpy.run_module('threadpipe.demo', run_name='__main__')",
    )
    assert proc.returncode == 2, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "error: argument --uploaders: must be an int >= 1, got 0" in proc.stderr


@pytest.mark.timeout(60)
def test_timeline_without_matplotlib_fails_before_the_run_naming_the_extra(
    tmp_path: Path,
) -> None:
    picture = tmp_path / "timeline.png"
    proc = run_demo(
        "import sys, runpy",
        "sys.modules['matplotlib'] = None  # as if it were not installed: its import fails",
        f"sys.argv = ['demo', '--items', '3', '--latency', '0', '--timeline', {str(picture)!r}]",
        "runpy.run_module('threadpipe.demo', run_name='__main__')",
    )
    assert proc.returncode == 2, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert "--timeline needs matplotlib" in proc.stderr
    assert "pip install 'threadpipe[plot]'" in proc.stderr
    assert proc.stdout == ""  # the run did not start: no title, no report
    assert not picture.exists()


@pytest.mark.timeout(30)
def test_help_is_plain_text_without_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--uploaders" in text and "--timeline" in text
    assert "``" not in text
    assert not re.search(r":[a-z]+:`", text)  # roles such as :class:`Pipeline`
    assert not re.search(r"::\s*$", text, re.MULTILINE)  # a literal-block marker


@pytest.mark.timeout(30)
def test_no_items_says_so_instead_of_a_bottleneck_not_known_yet(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--items", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "uploaded 0 thumbnails" in out
    assert "not known yet" not in out  # the run is over: nothing is still to be known
    assert "no photos, so no stage did any work and there is no bottleneck to report" in out
