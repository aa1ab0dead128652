"""Parent side of a run: start ``child.py`` for one job, guard it, read its result.

A library that raises, crashes or hangs yields an ``Outcome`` with status "error" or
"timeout"; it never stops the benchmark. The stderr of such runs is appended to a log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
from probes import cpu_share

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CHILD = BENCH_DIR / "child.py"


@dataclass(frozen=True)
class Outcome:
    """What one guarded run produced.

    Attributes:
        status: "ok", "error", "timeout" or "n/a".
        data: The child's result fields (or the error's ``type`` and ``message``).
    """

    status: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the run produced a measurement."""
        return self.status == "ok"

    def label(self) -> str:
        """The table cell for a run without a measurement: "error: Type", "timeout", "n/a"."""
        if self.status == "error":
            return f"error: {self.data.get('type', '?')}"
        return self.status


class ErrorLog:
    """Appends the stderr of failed runs to a file, so a table cell can be explained."""

    def __init__(self, path: Path) -> None:
        """Creates (truncates) the log at ``path``."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def add(self, job: dict[str, Any], outcome: Outcome, stderr: str) -> None:
        """Records one failed run with the tail of its stderr."""
        brief = {k: v for k, v in job.items() if k != "stages"}
        with self.path.open("a") as log:
            log.write(
                f"=== {outcome.label()} {json.dumps(brief)}\n{outcome.data}\n{stderr[-4000:]}\n"
            )


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the repo root first on PYTHONPATH, plus ``extra``.

    The root comes first so that the benchmark measures this working tree's threadpipe,
    installed or not.
    """
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


def _parse_result(stdout: str) -> Outcome | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT ") :])
            return Outcome(data.pop("status"), data)
    return None


def _read(stream: IO[str]) -> str:
    stream.seek(0)
    return stream.read()


@contextmanager
def _job_file(job: dict[str, Any]) -> Iterator[IO[str]]:
    """Writes the job to a named temporary file, deleted on exit, for the child to read."""
    with tempfile.NamedTemporaryFile("w+", suffix=".json", prefix="bench-job-") as handle:
        json.dump(job, handle)
        handle.flush()
        yield handle


def _spawn(
    job_file: IO[str], stdout: IO[str] | int, stderr: IO[str], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Starts ``child.py`` on a job file, as the leader of a new process group.

    A library may fork helpers (pyper starts a multiprocessing manager even for threads);
    they inherit the child's stdout and outlive it, so the whole group is killed at the end.
    """
    return subprocess.Popen(
        [sys.executable, str(CHILD), job_file.name],
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=child_env(env),
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kills the child's process group (its own id, made by ``_spawn``) and reaps the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the child and all of its helpers are gone already
    proc.wait()


def run_child(
    job: dict[str, Any], timeout: float, log: ErrorLog, env: dict[str, str] | None = None
) -> Outcome:
    """Runs one job in a fresh interpreter and returns its outcome.

    Args:
        job: The JSON job for ``child.py``.
        timeout: Seconds before the child is killed and the run reported as "timeout".
        log: Where the stderr of failed runs goes.
        env: Extra environment variables for the child.

    Returns:
        The child's result, or an error/timeout outcome.
    """
    # Files, not pipes: a chatty library cannot block on a full pipe, and a helper process
    # that inherited the descriptor cannot keep us waiting for an end of file.
    with (
        _job_file(job) as job_file,
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
    ):
        proc = _spawn(job_file, out, err, env)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            outcome: Outcome | None = Outcome("timeout", {"timeout_s": timeout})
        else:
            outcome = None
        _kill_group(proc)
        outcome = (
            outcome
            or _parse_result(_read(out))
            or Outcome("error", {"type": "ChildDied", "message": f"exit code {proc.returncode}"})
        )
        if outcome.status in ("error", "timeout"):
            log.add(job, outcome, _read(err))
    return outcome


class _LineWatcher:
    """Reads a child's stdout in a thread: READY sets an event, OUT lines are timestamped."""

    def __init__(self, stream: IO[str]) -> None:
        self.ready = threading.Event()
        self.saw_ready = False
        self.ended = False
        self.out_times: list[float] = []
        self.lines: list[str] = []
        self._thread = threading.Thread(
            target=self._read, args=(stream,), name="bench-watch", daemon=True
        )
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if line == "READY":
                self.saw_ready = True
                self.ready.set()
            elif line == "OUT":
                self.out_times.append(time.monotonic())
            else:
                self.lines.append(line)
        self.ended = True
        self.ready.set()  # the child ended: wake the waiter, it checks why

    def join(self) -> None:
        self._thread.join()


def run_idle_child(
    job: dict[str, Any], ready_timeout: float, window: float, log: ErrorLog
) -> Outcome:
    """Starts an idle-mode child, measures its CPU share over ``window`` s, then kills it.

    Args:
        job: The JSON job (mode "idle").
        ready_timeout: Seconds to wait for the pipeline to start pulling from its source.
        window: Seconds of measurement once it has.
        log: Where the stderr of failed runs goes.

    Returns:
        ``cpu_pct`` (percent of one core), ``wall_s`` and ``outputs`` seen in the window.
    """
    with _job_file(job) as job_file, tempfile.TemporaryFile("w+") as err:
        proc = _spawn(job_file, subprocess.PIPE, err)
        assert proc.stdout is not None
        watcher = _LineWatcher(proc.stdout)
        outcome = _measure_idle(proc, watcher, ready_timeout, window)
        _kill_group(proc)
        watcher.join()
        if outcome is None:  # the child ended on its own: it must have reported why
            outcome = _parse_result("\n".join(watcher.lines)) or Outcome(
                "error", {"type": "ChildDied", "message": f"exit code {proc.returncode}"}
            )
        if outcome.status in ("error", "timeout"):
            log.add(job, outcome, _read(err))
    return outcome


def _measure_idle(
    proc: subprocess.Popen[str], watcher: _LineWatcher, ready_timeout: float, window: float
) -> Outcome | None:
    """The measurement proper; None when the child exited instead of idling."""
    if not watcher.ready.wait(ready_timeout):
        return Outcome("timeout", {"timeout_s": ready_timeout})
    if not watcher.saw_ready or watcher.ended:
        return None
    start = time.monotonic()
    try:
        share, wall = cpu_share(proc.pid, window)
    except psutil.NoSuchProcess:  # it died during the window
        return None
    if watcher.ended or proc.poll() is not None:
        return None
    outputs = sum(1 for t in watcher.out_times if t >= start)
    return Outcome("ok", {"cpu_pct": 100.0 * share, "wall_s": wall, "outputs": outputs})
