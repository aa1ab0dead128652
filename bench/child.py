"""Runs one library on one workload, in a process of its own.

Usage: ``python child.py job.json``. Every run gets a fresh interpreter, so a hanging
library can be killed, leaked threads or memory cannot bleed into the next library's
figures, and peak RSS belongs to one library only.

Protocol on stdout, one line each: ``READY`` and ``OUT`` (idle mode only), then
``RESULT <json>`` with ``status`` "ok", "error" (with ``type`` and ``message``) or "n/a".
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from peers import PEERS, NotApplicable, StageFn, threadpipe_bound
from workloads import identity, megabyte_items, sleep_stages, slow_identity, ticking_source

_print_lock = threading.Lock()


def emit(line: str) -> None:
    """Writes one protocol line; the source thread and the main thread both write."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class WrongOutput(Exception):
    """Raised when a library delivered other outputs than its inputs."""


class Watchdog:
    """Ends the child with a "timeout" result once it is deadlocked.

    Deadlocked means: for ``stall_s`` seconds no stage call finished, no output was consumed
    and the process used almost no CPU, so every thread is blocked. Counting stage calls as
    well as outputs keeps ``Executor.map``, which yields nothing until its earlier stages are
    done, from looking stuck; counting outputs keeps a slow consumer draining a full buffer
    from looking stuck. A deadlock then costs seconds instead of the parent's whole time
    limit, which stays as the backstop for everything else.
    """

    def __init__(self, stall_s: float) -> None:
        """Creates a watchdog that fires after ``stall_s`` blocked seconds."""
        self.stall_s = stall_s
        # Bumped by many threads without a lock: a lost increment cannot hide liveness,
        # since any change at all counts as progress.
        self.progress = 0
        self._stop = threading.Event()

    def wrap(self, fns: list[StageFn]) -> list[StageFn]:
        """Returns the stage functions, each counting its finished calls as progress."""

        def counted(fn: StageFn) -> StageFn:
            def stage(item: Any) -> Any:
                result = fn(item)
                self.progress += 1
                return result

            return stage

        return [counted(fn) for fn in fns]

    def bump(self) -> None:
        """Counts one consumed output as progress."""
        self.progress += 1

    def start(self) -> None:
        """Starts watching in a daemon thread."""
        threading.Thread(target=self._watch, name="bench-watchdog", daemon=True).start()

    def _watch(self) -> None:
        # Stalled = no call finished AND the process nearly idle for stall_s: every thread is
        # blocked, a deadlock. A slow library (say, hundreds of polling threads starting up)
        # burns CPU meanwhile and is left to the parent's time limit.
        seen, since, cpu_since = self.progress, time.monotonic(), time.process_time()
        while not self._stop.wait(0.25):  # a coarse poll: only the stall threshold matters
            now = time.monotonic()
            if self.progress != seen:
                seen, since, cpu_since = self.progress, now, time.process_time()
            elif now - since > self.stall_s:
                if (time.process_time() - cpu_since) / (now - since) < 0.05:
                    result = {
                        "status": "timeout",
                        "stalled_s": round(now - since, 2),
                        "progress": seen,
                    }
                    emit("RESULT " + json.dumps(result))
                    os._exit(0)
                since, cpu_since = now, time.process_time()  # busy, not blocked: look again


def build_stages(spec: dict[str, Any]) -> list[StageFn]:
    """Rebuilds the stage functions described by a job."""
    if spec["kind"] == "sleep":
        return sleep_stages(spec["table"])
    if spec["kind"] == "identity":
        return [identity] * spec["count"]
    raise ValueError(f"unknown stage kind {spec['kind']!r}")


def drain_and_check(outputs: Iterator[Any], n_items: int, on_output: Callable[[], None]) -> None:
    """Consumes the outputs of ``range(n_items)`` through value-preserving stages.

    Raises:
        WrongOutput: If an item is lost, duplicated or altered.
    """
    count = total = 0
    for item in outputs:
        on_output()
        count += 1
        total += item
    if count != n_items or total != n_items * (n_items - 1) // 2:
        raise WrongOutput(f"got {count} outputs summing to {total} for range({n_items})")


def run_timed(job: dict[str, Any]) -> dict[str, Any]:
    """Wall time of whole runs, build to joined, ``reps`` times in this process."""
    runner = PEERS[job["lib"]].runner
    watchdog = Watchdog(job["stall_s"])
    stages = watchdog.wrap(build_stages(job["stages"]))
    watchdog.start()
    # Import the library (and let it set itself up) before the clock starts: a library's import
    # time is a one-off cost of the script, not of the pipeline this workload times.
    for _ in runner(stages, range(0), job["concurrency"], job["buffer"]):
        pass
    seconds = []
    for _ in range(job["reps"]):
        gc.collect()
        start = time.perf_counter()
        outputs = runner(stages, range(job["n_items"]), job["concurrency"], job["buffer"])
        drain_and_check(outputs, job["n_items"], watchdog.bump)
        seconds.append(time.perf_counter() - start)
    # Threads still alive after the run was joined: leaks, reported alongside the time.
    left = sum(
        1
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith("bench-")
    )
    return {"seconds": seconds, "threads_left": left}


def slow_consumer(outputs: Iterable[Any], delay: float, on_output: Callable[[], None]) -> int:
    """Takes ``delay`` seconds per output and drops it at once; returns the count."""
    count = 0
    for item in outputs:
        del item  # so the sleep below holds no item alive
        on_output()
        count += 1
        time.sleep(delay)  # the workload: a consumer slower than the stages
    return count


def run_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS above the pre-run baseline, sampled and from the kernel's high-water mark."""
    from probes import RssSampler, kernel_peak_bytes, reset_kernel_peak, rss_bytes

    lib, n_items = job["lib"], job["n_items"]
    bound_items = None
    gc.collect()
    baseline = rss_bytes()
    kernel_ok = reset_kernel_peak()
    start = time.perf_counter()
    with RssSampler(job["sample_interval"]) as sampler:
        if lib == "probe:hold":
            # Known answer: holding n_items MB must read as about n_items MB.
            held = list(megabyte_items(n_items))
            sampler.wait_for_sample()  # the sampler must get a look before we let go
            count = len(held)
            del held
        else:
            watchdog = Watchdog(job["stall_s"])
            stages = watchdog.wrap([identity, slow_identity(job["slow_delay"])])
            watchdog.start()
            if lib == "threadpipe":
                bound_items = threadpipe_bound(stages, job["concurrency"], job["buffer"])
            outputs = PEERS[lib].runner(
                stages, megabyte_items(n_items), job["concurrency"], job["buffer"]
            )
            count = slow_consumer(outputs, job["consumer_delay"], watchdog.bump)
    seconds = time.perf_counter() - start
    kernel_peak = kernel_peak_bytes() if kernel_ok else None
    if count != n_items:
        raise WrongOutput(f"got {count} outputs for {n_items} items")
    return {
        "seconds": seconds,
        "baseline_mb": baseline / 2**20,
        "peak_sampled_mb": (sampler.peak - baseline) / 2**20,
        "peak_kernel_mb": None if kernel_peak is None else (kernel_peak - baseline) / 2**20,
        "samples": sampler.samples,
        # The library's own promise, in items of 1 MB (threadpipe only: Pipeline.buffer_bound()).
        "bound_mb": bound_items,
    }


def run_idle(job: dict[str, Any]) -> dict[str, Any]:
    """Runs a pipeline on a source ticking every ``period`` s until the parent kills us."""
    lib = job["lib"]
    if lib == "probe:busy":
        # Known answer ~100% of a core: a consumer that polls instead of blocking.
        import queue

        inbox: queue.Queue[int] = queue.Queue()
        emit("READY")
        while True:
            try:
                inbox.get_nowait()
            except queue.Empty:
                pass
    if lib == "probe:wait":
        # Known answer ~0%: a thread blocked in Event.wait.
        emit("READY")
        threading.Event().wait()
    stages = [identity] * job["n_stages"]
    source = ticking_source(job["period"], lambda: emit("READY"))
    for _ in PEERS[lib].runner(stages, source, job["concurrency"], job["buffer"]):
        emit("OUT")
    raise WrongOutput("an endless source ended")


MODES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "timed": run_timed,
    "memory": run_memory,
    "idle": run_idle,
}


def main() -> None:
    """Reads the job file named on the command line, runs it, reports one RESULT line, exits."""
    with open(sys.argv[1]) as job_file:
        job = json.load(job_file)
    try:
        result = {"status": "ok", **MODES[job["mode"]](job)}
    except NotApplicable as exc:
        result = {"status": "n/a", "message": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - any failure of a library is a row, not a crash
        traceback.print_exc(file=sys.stderr)
        result = {"status": "error", "type": type(exc).__name__, "message": str(exc)[:300]}
    emit("RESULT " + json.dumps(result))
    sys.stderr.flush()
    # Skip interpreter shutdown: a library may have left non-daemon threads behind, and
    # waiting for them would turn a finished measurement into a timeout.
    os._exit(0)


if __name__ == "__main__":
    main()
