"""High concurrency, interleaved in one process: the headline workload at c = 16 ... 256.

Usage::

    python bench/highc.py                          # c in 16, 64, 128, 256; 5 repeats; ~2 minutes
    python bench/highc.py --c 256 --reps 9 --libs threadpipe,handwritten
    python bench/highc.py --c 64,128 --libs threadpipe --first-buffer 64,128  # + sized first buffers

``run.py`` times every run in a fresh process, which mixes a library's start-up (threads started
for the first time) into every figure and makes the machine's noise impossible to tell from a
difference between libraries. This script is the comparison the targets of the "high
concurrency" issue are stated in: the same durations (N = 1000, 3 stages, 5-10 ms, the headline's
seed), every library in one process, **interleaved** (repeat r runs every library at every c before
repeat r + 1 starts, in an order rotated by one library each repeat), the **median of the
repeats** as the ratio to the ideal FIFO schedule, with the spread (min-max) beside it. Per run
it also reads the process's CPU time and context switches (``getrusage``), per stage call.

Besides the median over the repeats, which include the first one, the table shows:

* ``fresh``: the first run in a fresh process (a child, as ``run.py`` times it), for the libraries
  run in this process;
* ``threadpipe / it``: threadpipe's time over the row's, repeat by repeat, median, and in how many
  repeats threadpipe was the faster (``report.paired``): the two runs of a repeat ran back to back
  under the same load, so this is the column that says whether threadpipe is *ahead* of a peer
  when the machine's noise moves both medians by more than the gap between them;
* ``floor``: the ideal schedule replayed by 3c threads started in advance, one per slot, that do
  nothing but sleep until the end of each of their calls: one wake-up per call, no queue, no
  hand-off, no thread start. Its ratio to the ideal schedule is what waking that many sleeping threads costs
  on this machine: a floor under the ratio of any thread pipeline here;
* ``carried``: the pattern run to completion by 3c threads started in advance, each carrying one
  item at a time through every stage, with c places per stage: no queue and no hand-off between
  stages, the fewest wake-ups a thread pipeline can have. Not a floor (it serves a stage's waiters
  in no set order), a reference: what a thread design with the fewest hand-offs reaches here;
* ``carried tN`` (``--carried-threads N,...``): the same with N threads in all instead of 3c, so at
  most N calls are in flight across the stages: what capping the calls in flight, without a wait
  of its own, buys a thread design here.

pypeln and pyper run in a child process of their own for all their repeats (pyper deadlocks from
c = 4 and pypeln polls; neither may wedge or slow this process), so they are not interleaved.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness import ErrorLog, Outcome, run_child
from peers import PEERS, run_threadpipe
from report import paired, rotated
from sysinfo import format_info, machine_info
from workloads import SEED, Table, ideal_fifo, lower_bound, sleep_stages, uniform_table

N_ITEMS = 1000
CONCURRENCIES = (16, 64, 128, 256)
IN_PROCESS = ("threadpipe", "handwritten", "executor", "streamable")
IN_CHILD = ("pypeln", "pyper")
RESULTS = Path(__file__).resolve().parent / "results"


class Sample:
    """One run: wall seconds, and CPU seconds and context switches of the whole process."""

    __slots__ = ("cpu", "involuntary", "seconds", "voluntary")

    def __init__(self, seconds: float, cpu: float, voluntary: int, involuntary: int) -> None:
        self.seconds = seconds
        self.cpu = cpu
        self.voluntary = voluntary
        self.involuntary = involuntary


def measured(body: Callable[[], None]) -> Sample:
    """Runs ``body`` once and measures it."""
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    body()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Sample(
        seconds,
        after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
        after.ru_nvcsw - before.ru_nvcsw,
        after.ru_nivcsw - before.ru_nivcsw,
    )


def library_run(
    lib: str, stages: list[Any], c: int, first_buffer: int | None = None
) -> Callable[[], None]:
    """One run of ``lib`` over ``range(N_ITEMS)``, outputs checked; with ``first_buffer``,
    threadpipe with that many items in the buffer before its first stage."""

    def body() -> None:
        total = count = 0
        if first_buffer is None:
            outputs = PEERS[lib].runner(stages, range(N_ITEMS), c, None)
        else:
            outputs = run_threadpipe(stages, range(N_ITEMS), c, None, first_buffer)
        for item in outputs:
            total += item
            count += 1
        if (count, total) != (N_ITEMS, N_ITEMS * (N_ITEMS - 1) // 2):
            raise RuntimeError(f"{lib}: got {count} outputs summing to {total}")

    return body


def fifo_slots(table: Table, c: int) -> list[list[tuple[float, float]]]:
    """The ideal FIFO schedule (``workloads.ideal_fifo``) as each slot's calls: ``(start, seconds)``."""
    ready = [0.0] * len(table[0])
    lanes: list[list[tuple[float, float]]] = []
    for row in table:
        slots = [(0.0, j) for j in range(c)]  # (free at, slot): a min-heap
        calls: list[list[tuple[float, float]]] = [[] for _ in range(c)]
        done = [0.0] * len(row)
        for i in sorted(range(len(row)), key=ready.__getitem__):
            free, j = heapq.heappop(slots)
            start = max(free, ready[i])
            done[i] = start + row[i]
            calls[j].append((start, row[i]))
            heapq.heappush(slots, (done[i], j))
        ready = done
        lanes += calls
    return lanes


def floor_run(table: Table, c: int) -> Sample:
    """The ideal schedule replayed by 3c started threads, one per slot, that only sleep.

    Each thread sleeps once per call of its slot, until the call's end in the ideal schedule: one
    wake-up per call, the fewest a thread pipeline can have, without a queue, a hand-off or a
    thread start, and without waiting for the previous stage (a late wake-up delays nothing
    else). What the replay takes beyond the schedule is what waking that many sleeping threads
    costs here: a floor under any thread pipeline's overhead.

    Returns:
        The measured replay, from the release to the last thread's end.
    """
    gate = threading.Event()
    origin = [0.0]

    def sleeper(calls: list[tuple[float, float]]) -> None:
        gate.wait()
        zero = origin[0]
        for start, seconds in calls:
            time.sleep(max(0.0, zero + start + seconds - time.perf_counter()))

    threads = [
        threading.Thread(target=sleeper, args=(calls,), name=f"bench-floor-{i}")
        for i, calls in enumerate(fifo_slots(table, c))
    ]

    def release() -> None:
        origin[0] = time.perf_counter()
        gate.set()

    return released(threads, release)


def released(threads: list[threading.Thread], release: Callable[[], None]) -> Sample:
    """Start ``threads``, let them reach their gate, then measure ``release()`` and their ends.

    Starting the threads is not what a reference measures, so it happens before the clock starts.
    """
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # let every thread reach the gate

    def body() -> None:
        release()
        for thread in threads:
            thread.join()

    return measured(body)


def carried_run(stages: list[Any], c: int, threads: int | None = None) -> Sample:
    """The pattern run to completion: 3c threads started in advance (one per place), each carrying
    one item at a time through all three stages, with c places per stage (a semaphore each).
    ``threads`` starts that many instead: fewer than 3c caps the calls in flight across the
    stages (at most one per thread) without a wait of its own.

    The other way to give each stage c calls at once with threads: no queue between stages and no
    hand-off, a thread waits only for a place (first stage mostly) or for the next item. It does
    not keep the stages' order of service (a semaphore lets a newcomer in before a waiter), so it
    is a reference, not a floor: what the fewest hand-offs buy on this machine.

    Returns:
        The measured run, from the release to the last thread's end, outputs counted.
    """
    gate = threading.Event()
    source = iter(range(N_ITEMS))
    lock = threading.Lock()
    places = [threading.Semaphore(c) for _ in stages]
    outputs: list[int] = []

    def carrier() -> None:
        gate.wait()
        while True:
            with lock:
                item = next(source, None)
            if item is None:
                return
            for place, fn in zip(places, stages):
                with place:
                    item = fn(item)
            outputs.append(item)

    count = 3 * c if threads is None else threads
    carriers = [threading.Thread(target=carrier, name=f"bench-carried-{i}") for i in range(count)]
    sample = released(carriers, gate.set)
    if sorted(outputs) != list(range(N_ITEMS)):
        raise RuntimeError(f"carried: got {len(outputs)} outputs")
    return sample


def child_runs(lib: str, table: Table, c: int, reps: int, log: ErrorLog) -> Outcome:
    """``reps`` timed runs of ``lib`` in one fresh child process (``child.run_timed``)."""
    job = {
        "mode": "timed",
        "lib": lib,
        "concurrency": c,
        "buffer": None,
        "stages": {"kind": "sleep", "table": table},
        "n_items": N_ITEMS,
        "reps": reps,
        "stall_s": 1.5,
    }
    return run_child(job, 10.0 + reps * (1.0 + 8 * lower_bound(table, c)), log)


def spread(values: Sequence[float]) -> str:
    """``median (min-max)``, as ratios."""
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def counts_option(parser: argparse.ArgumentParser, option: str, what: str, text: str) -> list[int]:
    """The comma-separated whole numbers >= 1 of ``option``; exits naming it on anything else."""
    try:
        counts = [int(part) for part in text.split(",") if part]
    except ValueError:
        counts = [0]
    if any(count < 1 for count in counts):
        parser.error(f"{option} takes {what} >= 1, got {text!r}")
    return counts


def main(argv: list[str]) -> int:
    """Runs the interleaved comparison and prints one table per concurrency."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--c", default=",".join(map(str, CONCURRENCIES)))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--libs", default=",".join(IN_PROCESS + IN_CHILD))
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh-process first runs")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the references (the floor and 'carried')"
    )
    parser.add_argument(
        "--first-buffer",
        default="",
        help="comma-separated sizes: one more threadpipe row per size, with that many items in"
        " the buffer before the first stage (.backpressure(size) there; the default is 32)",
    )
    parser.add_argument(
        "--carried-threads",
        default="",
        help="comma-separated thread counts: one more 'carried' reference row per count, the"
        " same design with that many threads in all instead of 3c (a cap on the calls in flight)",
    )
    args = parser.parse_args(argv)
    cs = [int(c) for c in args.c.split(",")]
    libs = [lib for lib in args.libs.split(",") if lib]
    unknown = [lib for lib in libs if lib not in IN_PROCESS + IN_CHILD]
    if unknown:
        parser.error(f"unknown libraries {unknown}")
    sizes = counts_option(parser, "--first-buffer", "sizes", args.first_buffer)
    thread_counts = counts_option(parser, "--carried-threads", "counts", args.carried_threads)
    if thread_counts and args.no_floor:
        parser.error("--carried-threads adds reference rows, which --no-floor skips")
    # Each variant runs as a library of its own, interleaved with the others.
    variants = {f"threadpipe b{size}": size for size in sizes}
    table = uniform_table(N_ITEMS)
    stages = sleep_stages(table)
    info = machine_info(
        [PEERS[lib].dist for lib in libs],
        Path(__file__).resolve().parent.parent,
        ["bench/highc.py", *argv],
    )
    print(format_info(info) + "\n", flush=True)
    log = ErrorLog(RESULTS / "errors.log")

    local = [lib for lib in libs if lib in IN_PROCESS]
    for lib in local:  # import and set up every library before any clock starts
        library_run(lib, stages, 1)  # builds only: nothing runs until iterated
        for _ in PEERS[lib].runner(stages, range(0), 1, None):
            pass
    samples: dict[tuple[str, int], list[Sample]] = {}
    floors: dict[int, list[Sample]] = {}
    carried: dict[int, list[Sample]] = {}
    capped: dict[tuple[int, int], list[Sample]] = {}
    started = time.monotonic()
    for rep in range(args.reps):
        for c in cs:
            for lib in rotated([*local, *variants], rep):
                if lib in variants:
                    body = library_run("threadpipe", stages, c, variants[lib])
                else:
                    body = library_run(lib, stages, c)
                samples.setdefault((lib, c), []).append(measured(body))
            if not args.no_floor:
                floors.setdefault(c, []).append(floor_run(table, c))
                carried.setdefault(c, []).append(carried_run(stages, c))
                for count in rotated(thread_counts, rep):
                    capped.setdefault((c, count), []).append(carried_run(stages, c, count))
        print(f"repeat {rep + 1}/{args.reps} done ({time.monotonic() - started:.0f} s)", flush=True)
    children = {
        (lib, c): child_runs(lib, table, c, args.reps, log)
        for lib in libs
        if lib in IN_CHILD
        for c in cs
    }
    fresh = (
        {}
        if args.no_fresh
        else {(lib, c): child_runs(lib, table, c, 1, log) for lib in local for c in cs}
    )

    calls = 3 * N_ITEMS
    print(
        f"\nN={N_ITEMS}, 3 stages, sleeps uniform 5-10 ms (seed {SEED}), unordered;"
        f" {args.reps} repeats interleaved in one process."
    )
    print(
        "ratio = wall / ideal FIFO schedule: median (min-max) over the repeats; fresh = first run"
        " in a fresh process;\nCPU and csw (voluntary + involuntary context switches) of the whole"
        " process per stage call, medians;\nthreadpipe / it = threadpipe's wall time over the row's"
        " in the same repeat, median, and in how many repeats threadpipe was faster."
    )
    for c in cs:
        ideal = ideal_fifo(table, c)
        print(
            f"\n== c={c}: LB {lower_bound(table, c) * 1e3:.1f} ms, ideal FIFO {ideal * 1e3:.1f} ms"
            f" ({ideal / lower_bound(table, c):.2f}x LB)"
        )
        print(
            f"{'library':16s} {'ratio to ideal':>22s} {'fresh':>7s} {'CPU us/call':>12s}"
            f" {'csw/call':>9s} {'threadpipe / it':>16s}"
        )
        ours = [s.seconds for s in samples.get(("threadpipe", c), [])]

        def against(runs: Sequence[Sample], name: str) -> str:
            """threadpipe's time over this row's, repeat by repeat (``report.paired``)."""
            if not ours or name == "threadpipe":
                return ""
            return paired(ours, [r.seconds for r in runs])

        for lib in [*libs, *variants]:
            if lib in variants or lib in local:
                runs = samples[(lib, c)]
                ratio = spread([s.seconds / ideal for s in runs])
                first = fresh.get((lib, c))
                first_cell = (
                    f"{first.data['seconds'][0] / ideal:.2f}x"
                    if first and first.ok
                    else first.label()
                    if first
                    else "-"
                )
                cpu = statistics.median(s.cpu for s in runs) / calls * 1e6
                csw = statistics.median(s.voluntary + s.involuntary for s in runs) / calls
                print(
                    f"{lib:16s} {ratio:>22s} {first_cell:>7s} {cpu:12.0f} {csw:9.1f}"
                    f" {against(runs, lib):>16s}"
                )
            else:
                outcome = children[(lib, c)]
                cell = (
                    spread([s / ideal for s in outcome.data["seconds"]])
                    if outcome.ok
                    else outcome.label()
                )
                print(f"{lib:16s} {cell:>22s} {'':>7s} {'(own process)':>12s}")
        for name, runs, what in (
            ("carried", carried.get(c, []), f"{3 * c} threads carrying items through every stage"),
            *(
                (f"carried t{count}", capped[(c, count)], f"the same with {count} threads")
                for count in thread_counts
            ),
            ("floor", floors.get(c, []), f"{3 * c} threads replaying the ideal schedule"),
        ):
            if runs:
                cpu = statistics.median(r.cpu for r in runs) / calls * 1e6
                csw = statistics.median(r.voluntary + r.involuntary for r in runs) / calls
                print(
                    f"{name:16s} {spread([r.seconds / ideal for r in runs]):>22s} {'':>7s}"
                    f" {cpu:12.0f} {csw:9.1f} {against(runs, name):>16s}   ({what})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
