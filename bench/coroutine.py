"""Workload 1, coroutine variant: the headline durations, slept with ``asyncio.sleep`` in coroutines.

Usage::

    python bench/coroutine.py                     # c in 1, 8, 64, 256; every library
    python bench/coroutine.py --c 64,256 --libs threadpipe,asyncio
    python bench/coroutine.py --c 64,256 --reps 5 # interleaved in one process, median of 5
    python bench/coroutine.py --overhead --reps 7 # per-item cost: calls that return at once

N = 1000 items, 3 stages, durations uniform 5-10 ms from the headline's fixed seed, unordered, c
coroutines in flight per stage. Every run happens in a fresh subprocess under a timeout, so an
error or a hang becomes a table cell. Each cell: wall seconds (build to last output consumed), the
ratio to the lower bound LB(c), and the peak number of threads besides the main thread meanwhile.

Besides LB(c) the table shows the *ideal FIFO* time: a zero-overhead simulation of c slots per stage
taking items in arrival order. LB(c) ignores that the last items to enter the first stage still have
three stages to go, so at high c no FIFO pipeline can come near it; the ideal FIFO time is what a
perfect implementation of the pattern would take.

With ``--reps R`` the libraries that cannot hang (threadpipe, asyncio by hand, streamable) run in
one child process, **interleaved** (repeat r runs every library at every c before repeat r + 1, in an order
rotated by one library each repeat),
and each cell is the median of the R runs with the min-max spread and the first run apart; rows
``threadpipe / X`` compare threadpipe with each library interleaved with it repeat by repeat (the
median of the ratios of their times, and in how many repeats threadpipe was the faster). pypeln and
pyper run their R repeats in a child of their own each.

With ``--overhead`` the stages do no waiting at all (``await asyncio.sleep(0)``, one turn of the
loop, then the item), N = 20,000 items, and each cell is the median over the repeats of the
microseconds per item per stage: what the libraries themselves cost per call, which the 5-10 ms
sleeps hide until the loop is busy (at high c). Always interleaved (``--reps``, 7 by default).

``bench/run.py --only coroutine`` runs the same measurements as a section of the full benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import paired, rotated
from workloads import SEED, Table, ideal_fifo, lower_bound, uniform_table

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
N_ITEMS = 1000
CONCURRENCIES = (1, 8, 64, 256)
AsyncStage = Callable[[int], Awaitable[int]]


def async_sleep_stages(table: Table) -> list[AsyncStage]:
    """One ``async def`` stage per row: ``await asyncio.sleep(table[s][item])``, return the item."""

    def make(row: Sequence[float]) -> AsyncStage:
        async def stage(item: int) -> int:
            await asyncio.sleep(row[item])
            return item

        return stage

    return [make(row) for row in table]


OVERHEAD_ITEMS = 20_000


async def step(item: int) -> int:
    """The ``--overhead`` stage: one turn of the loop (an awaited call that returns at once)."""
    await asyncio.sleep(0)
    return item


def workload_stages(work: str, n: int) -> list[AsyncStage]:
    """The three stages of a workload: ``sleep`` (the headline durations) or ``overhead``."""
    if work == "overhead":
        return [step, step, step]
    return async_sleep_stages(uniform_table(n))


# ---------------------------------------------------------------------------------- runners
# Each yields the outputs of the three stages over range(n), c in flight per stage, unordered.


def run_threadpipe(stages: list[AsyncStage], n: int, c: int) -> Iterator[int]:
    """threadpipe: ``map(async_fn, workers=c, ordered=False)`` per stage, consumed synchronously."""
    import threadpipe as tp

    pipeline: Any = tp.Pipeline.from_iter(range(n))
    for index, fn in enumerate(stages):
        pipeline = pipeline.map(fn, workers=c, ordered=False, name=f"s{index + 1}")
    run = pipeline.start()
    with run:
        yield from run


def _drive(agen: AsyncIterator[int]) -> Iterator[int]:
    """Consume an async iterator from synchronous code with one ``asyncio.run`` (no thread)."""
    out: list[int] = []

    async def collect() -> None:
        async for x in agen:
            out.append(x)
            _sample()

    asyncio.run(collect())
    yield from out


async def _asyncio_pattern(stages: list[AsyncStage], n: int, c: int) -> AsyncIterator[int]:
    end = object()
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(c) for _ in range(len(stages) + 1)]

    async def feed() -> None:
        for i in range(n):
            await queues[0].put(i)
        await queues[0].put(end)

    async def worker(
        fn: AsyncStage, inbox: asyncio.Queue[Any], outbox: asyncio.Queue[Any], alive: list[int]
    ) -> None:
        while (item := await inbox.get()) is not end:
            await outbox.put(await fn(item))
        await inbox.put(end)  # for the siblings
        alive[0] -= 1
        if not alive[0]:
            await outbox.put(end)

    tasks = [asyncio.create_task(feed())]
    for s, fn in enumerate(stages):
        alive = [c]
        tasks += [
            asyncio.create_task(worker(fn, queues[s], queues[s + 1], alive)) for _ in range(c)
        ]
    while (item := await queues[-1].get()) is not end:
        yield item
    await asyncio.gather(*tasks)


def run_asyncio(stages: list[AsyncStage], n: int, c: int) -> Iterator[int]:
    """The pattern by hand in asyncio: per stage c worker tasks and an ``asyncio.Queue(c)``."""
    return _drive(_asyncio_pattern(stages, n, c))


def run_pypeln(stages: list[AsyncStage], n: int, c: int) -> Iterator[int]:
    """``pypeln.task.map(async_fn, workers=c)`` per stage (its own loop thread), iterated."""
    import pypeln as pl

    stage: Any = range(n)
    for fn in stages:
        stage = pl.task.map(fn, stage, workers=c)
    yield from stage


def run_streamable(stages: list[AsyncStage], n: int, c: int) -> Iterator[int]:
    """streamable 2.x: ``.map(async_fn, concurrency=c, as_completed=True)``, iterated."""
    from streamable import stream

    chain: Any = stream(range(n))
    for fn in stages:
        chain = chain.map(fn, concurrency=c, as_completed=True)
    yield from chain


def run_pyper(stages: list[AsyncStage], n: int, c: int) -> Iterator[int]:
    """pyper: async ``task(fn, workers=c, throttle=c)`` composed with ``|`` (an AsyncPipeline)."""
    from pyper import task

    async def source(count: int) -> AsyncIterator[int]:
        for i in range(count):
            yield i

    pipeline: Any = task(source, branch=True, throttle=c)
    for fn in stages:
        pipeline = pipeline | task(fn, workers=c, throttle=c)
    return _drive(pipeline(n))


RUNNERS: dict[str, Callable[[list[AsyncStage], int, int], Iterator[int]]] = {
    "threadpipe": run_threadpipe,
    "asyncio": run_asyncio,
    "pypeln": run_pypeln,
    "streamable": run_streamable,
    "pyper": run_pyper,
}

IMPORTS: dict[str, tuple[str, ...]] = {
    "threadpipe": ("threadpipe", "threadpipe._aio"),
    "asyncio": (),
    "pypeln": ("pypeln",),
    "streamable": ("streamable",),
    "pyper": ("pyper",),
}

# bench/run.py's library names (``handwritten`` is the pattern by hand) -> this file's runners.
PEER_NAMES: dict[str, str] = {
    "threadpipe": "threadpipe",
    "handwritten": "asyncio",
    "pypeln": "pypeln",
    "streamable": "streamable",
    "pyper": "pyper",
}

# ---------------------------------------------------------------------------------- child side

_peak = [0]


def _sample() -> None:
    _peak[0] = max(_peak[0], threading.active_count())


def child(lib: str, c: int, n: int) -> dict[str, Any]:
    """One timed run in this process: seconds, peak threads besides the main one; checks outputs."""
    stages = async_sleep_stages(uniform_table(n))
    # Imports are a once-per-process cost, not part of building and running a pipeline: every
    # library is imported before the clock starts (threadpipe's coroutine adapter included, which
    # it otherwise imports on the first run that needs it).
    for module in IMPORTS[lib]:
        importlib.import_module(module)
    start = time.perf_counter()
    count = total = 0
    for item in RUNNERS[lib](stages, n, c):
        count += 1
        total += item
        _sample()
    seconds = time.perf_counter() - start
    if (count, total) != (n, n * (n - 1) // 2):
        raise RuntimeError(f"got {count} outputs summing to {total} for range({n})")
    return {"seconds": seconds, "threads": _peak[0] - 1}


# ---------------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class Cell:
    """The outcome of one guarded run."""

    lib: str
    c: int
    status: str  # ok, error, timeout
    seconds: float | None = None
    threads: int | None = None
    error: str = ""


def measure(lib: str, c: int, n: int = N_ITEMS) -> Cell:
    """Run ``lib`` at concurrency ``c`` in a fresh interpreter, killed after 10 s plus 4 LB."""
    timeout = 10.0 + 4 * lower_bound(uniform_table(n), c)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), str(BENCH_DIR), env.get("PYTHONPATH")])
    )
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", lib, str(c), str(n)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Cell(lib, c, "timeout")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT ") :])
            if data.pop("status") == "ok":
                return Cell(lib, c, "ok", data["seconds"], data["threads"])
            return Cell(lib, c, "error", error=data.get("type", "?"))
    return Cell(lib, c, "error", error=f"exit {proc.returncode}: {proc.stderr.strip()[-200:]}")


# Libraries safe to interleave in one process: none of them can hang or leave threads polling.
INTERLEAVED = ("threadpipe", "asyncio", "streamable")


def child_reps(
    libs: Sequence[str], cs: Sequence[int], n: int, reps: int, work: str = "sleep"
) -> dict[str, Any]:
    """``reps`` rounds in this process, each running every library at every c: the seconds of each."""
    stages = workload_stages(work, n)
    for lib in libs:
        for module in IMPORTS[lib]:
            importlib.import_module(module)
    times: dict[str, list[float]] = {f"{lib} {c}": [] for lib in libs for c in cs}
    for rep in range(reps):
        for c in cs:
            for lib in rotated(libs, rep):
                start = time.perf_counter()
                count = total = 0
                for item in RUNNERS[lib](stages, n, c):
                    count += 1
                    total += item
                seconds = time.perf_counter() - start
                if (count, total) != (n, n * (n - 1) // 2):
                    raise RuntimeError(f"{lib}: got {count} outputs summing to {total}")
                times[f"{lib} {c}"].append(seconds)
    return times


def measure_reps(
    libs: Sequence[str], cs: Sequence[int], reps: int, n: int = N_ITEMS, work: str = "sleep"
) -> dict[tuple[str, int], list[float] | str]:
    """Run ``child_reps`` in a fresh interpreter; a failure or a timeout becomes every cell's text."""
    if work == "overhead":  # 20,000 items at up to 100 us per item and stage, 6 times over
        timeout = 30.0 + 6 * reps * len(libs) * len(cs) * n * 3 * 100e-6
    else:
        table = uniform_table(n)
        timeout = 30.0 + 6 * reps * len(libs) * sum(lower_bound(table, c) for c in cs)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), str(BENCH_DIR), env.get("PYTHONPATH")])
    )
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-reps",
        ",".join(libs),
        ",".join(map(str, cs)),
        str(n),
        str(reps),
        work,
    ]
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {(lib, c): "timeout" for lib in libs for c in cs}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            data = json.loads(line[len("RESULT ") :])
            if data.pop("status") != "ok":
                return {(lib, c): "error: " + data.get("type", "?") for lib in libs for c in cs}
            return {(lib, c): data["times"][f"{lib} {c}"] for lib in libs for c in cs}
    error = f"exit {proc.returncode}"
    return {(lib, c): error for lib in libs for c in cs}


def reps_text(times: list[float] | str | None, ideal: float) -> str:
    """``median (min-max) first`` as ratios to the ideal FIFO schedule, else the status."""
    if times is None:
        return "-"
    if isinstance(times, str):
        return times
    ordered = sorted(times)
    median = (
        ordered[len(ordered) // 2]
        if len(ordered) % 2
        else sum(ordered[len(ordered) // 2 - 1 : len(ordered) // 2 + 1]) / 2
    )
    return f"{median / ideal:.2f} ({ordered[0] / ideal:.2f}-{ordered[-1] / ideal:.2f}) first {times[0] / ideal:.2f}"


def plan(libs: Sequence[str], cs: Sequence[int], c1_libs: Sequence[str]) -> list[tuple[str, int]]:
    """Which (library, c) runs: c = 1 (7.6 s a run) only for ``c1_libs``."""
    return [(lib, c) for lib in libs for c in cs if c != 1 or lib in c1_libs]


def cell_text(cell: Cell | None, lb: float, ideal: float) -> str:
    """``seconds ratio-to-LB|ratio-to-ideal threads`` for a measurement, else its status."""
    if cell is None:
        return "-"
    if cell.status != "ok" or cell.seconds is None:
        return cell.status + (f": {cell.error.split(':')[0]}" if cell.error else "")
    return (
        f"{cell.seconds:.3g}s {cell.seconds / lb:.2f}x|{cell.seconds / ideal:.2f}x {cell.threads}t"
    )


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Print ``rows`` under ``header`` in columns: the first left-aligned, the others right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def main(argv: list[str]) -> int:
    """Runs the sweep and prints the table (or, with ``--child``, one run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--c", default=",".join(map(str, CONCURRENCIES)), help="concurrencies, comma-separated"
    )
    parser.add_argument("--libs", default=",".join(RUNNERS), help=f"from {', '.join(RUNNERS)}")
    parser.add_argument("--c1-libs", default="threadpipe,asyncio", help="libraries also run at c=1")
    parser.add_argument("--reps", type=int, default=0, help="repeats, interleaved in one process")
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="stages that return at once: microseconds per item and stage (interleaved)",
    )
    parser.add_argument("--child", nargs=3, metavar=("LIB", "C", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--child-reps", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_reps:
        libs_, cs_, n_, reps_, work_ = args.child_reps
        try:
            result = {
                "status": "ok",
                "times": child_reps(
                    libs_.split(","), [int(c) for c in cs_.split(",")], int(n_), int(reps_), work_
                ),
            }
        except Exception as exc:  # reported as table cells
            result = {"status": "error", "type": type(exc).__name__, "message": str(exc)}
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.overhead:
        return main_overhead(args)
    if args.reps:
        return main_reps(args)
    if args.child:
        lib, c, n = args.child[0], int(args.child[1]), int(args.child[2])
        try:
            result = {"status": "ok", **child(lib, c, n)}
        except Exception as exc:  # reported as a table cell
            result = {"status": "error", "type": type(exc).__name__, "message": str(exc)}
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    cs = [int(c) for c in args.c.split(",")]
    libs = [lib for lib in args.libs.split(",") if lib]
    table = uniform_table(N_ITEMS)
    cells = {(lib, c): measure(lib, c) for lib, c in plan(libs, cs, args.c1_libs.split(","))}
    print(f"1c. coroutine variant: N={N_ITEMS}, 3 async stages, asyncio.sleep uniform 5-10 ms,")
    print(
        f"    seed {SEED}, unordered; cells: seconds, ratio to LB(c) | to the ideal FIFO schedule,"
    )
    print("    peak threads besides main")
    print(f"    python {sys.version.split()[0]}, {os.cpu_count()} cores")
    rows = [["LB(c)", *(f"{lower_bound(table, c):.3g}s" for c in cs)]]
    rows.append(
        [
            "ideal FIFO",
            *(
                f"{ideal_fifo(table, c):.3g}s {ideal_fifo(table, c) / lower_bound(table, c):.2f}x"
                for c in cs
            ),
        ]
    )
    rows += [
        [
            lib,
            *(
                cell_text(cells.get((lib, c)), lower_bound(table, c), ideal_fifo(table, c))
                for c in cs
            ),
        ]
        for lib in libs
    ]
    header = ["", *(f"c={c}" for c in cs)]
    print_table(header, rows)
    return 0


def measure_interleaved(
    libs: Sequence[str], cs: Sequence[int], reps: int, n: int, work: str
) -> tuple[list[str], dict[tuple[str, int], list[float] | str]]:
    """The libraries that may be interleaved (``INTERLEAVED``) in one child, each other one in a
    child of its own: the libraries interleaved, and every (library, c)'s times (or status)."""
    together = [lib for lib in libs if lib in INTERLEAVED]
    results: dict[tuple[str, int], list[float] | str] = {}
    if together:
        results.update(measure_reps(together, cs, reps, n, work))
    for lib in libs:
        if lib not in INTERLEAVED:
            results.update(measure_reps([lib], cs, reps, n, work))
    return together, results


def paired_rows(
    together: Sequence[str], cs: Sequence[int], results: dict[tuple[str, int], list[float] | str]
) -> list[list[str]]:
    """Rows ``threadpipe / X``, repeat by repeat (``report.paired``), for each library X
    interleaved with threadpipe."""

    def against(lib: str, c: int) -> str:
        ours, theirs = results.get(("threadpipe", c)), results.get((lib, c))
        if isinstance(ours, list) and isinstance(theirs, list):
            return paired(ours, theirs)
        return "-"

    if "threadpipe" not in together:
        return []
    return [
        [f"threadpipe / {lib}", *(against(lib, c) for c in cs)]
        for lib in together
        if lib != "threadpipe"
    ]


def main_reps(args: argparse.Namespace) -> int:
    """The ``--reps`` table: ratios to the ideal FIFO schedule, median of the repeats."""
    cs = [int(c) for c in args.c.split(",")]
    libs = [lib for lib in args.libs.split(",") if lib]
    table = uniform_table(N_ITEMS)
    together, results = measure_interleaved(libs, cs, args.reps, N_ITEMS, "sleep")
    print(
        f"1c. coroutine variant, {args.reps} repeats interleaved in one process ({', '.join(together)};"
    )
    print(
        "    others in a child each): ratio to the ideal FIFO schedule, median (min-max), first run;"
    )
    print(
        "    threadpipe / X: threadpipe's time over X's in the same repeat, median, and in how many"
        " repeats threadpipe was faster"
    )
    print(f"    python {sys.version.split()[0]}, {os.cpu_count()} cores")
    header = ["", *(f"c={c}" for c in cs)]
    rows = [
        [
            "ideal FIFO",
            *(
                f"{ideal_fifo(table, c):.3g}s = {ideal_fifo(table, c) / lower_bound(table, c):.2f}x LB"
                for c in cs
            ),
        ]
    ]
    rows += [
        [lib, *(reps_text(results.get((lib, c)), ideal_fifo(table, c)) for c in cs)] for lib in libs
    ]
    print_table(header, rows + paired_rows(together, cs, results))
    return 0


def main_overhead(args: argparse.Namespace) -> int:
    """The ``--overhead`` table: microseconds per item and stage, median of the repeats."""
    cs = [int(c) for c in args.c.split(",")]
    libs = [lib for lib in args.libs.split(",") if lib]
    reps = args.reps or 7
    n = OVERHEAD_ITEMS
    together, results = measure_interleaved(libs, cs, reps, n, "overhead")
    print(f"1d. coroutine per-item cost: {n:,} items, 3 stages of `await asyncio.sleep(0)`, unordered,")
    print(f"    c per stage; microseconds per item and stage, median of {reps} repeats (min-max);")
    print(f"    interleaved in one process: {', '.join(together)}; others in a child each")
    print(f"    python {sys.version.split()[0]}, {os.cpu_count()} cores")

    def cell(lib: str, c: int) -> str:
        times = results.get((lib, c))
        if not isinstance(times, list):
            return times or "-"
        per = sorted(t / (3 * n) * 1e6 for t in times)
        return f"{statistics.median(per):.2f} ({per[0]:.2f}-{per[-1]:.2f})"

    header = ["", *(f"c={c}" for c in cs)]
    rows = [[lib, *(cell(lib, c) for c in cs)] for lib in libs]
    print_table(header, rows + paired_rows(together, cs, results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
