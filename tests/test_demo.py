"""``python -m threadpipe.demo`` runs, draws its bars, and its report names the bottleneck."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
