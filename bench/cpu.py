"""CPU-bound stage: threads vs ``executor="processes"`` vs a Dask LocalCluster (issue 7).

Each item is a pure-Python loop of about ``--ms`` milliseconds, which holds the interpreter lock the
whole time, so a thread stage runs at one core's speed however many threads it has. The same stage
on processes should scale with the cores; on Dask it pays the cluster's per-task overhead.

Usage::

    python bench/cpu.py                     # ~1 minute on 2 cores
    python bench/cpu.py --items 100 --reps 1

Every configuration runs ``--reps`` times; the best run is reported (the machine is shared and noise
only ever slows a run down). Wall time covers the whole run: building, starting (a fresh process
pool for "processes"), the last output consumed and the run joined. The Dask cluster is started
once, outside the timings. A second table measures the per-item overhead of each executor with a
function that does nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

try:
    import threadpipe as tp
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import threadpipe as tp


def spin(n: int) -> int:
    """A pure-Python loop of ``n`` iterations: CPU-bound, holds the interpreter lock throughout."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def noop(x: int) -> int:
    return x


def calibrate(ms: float) -> int:
    """Loop iterations that take about ``ms`` milliseconds here (best of five timings)."""
    n = 100_000
    best = min(_timed(lambda: spin(n)) for _ in range(5))
    return max(1, round(n * ms / 1000 / best))


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    fn: Callable[[int], int], items: list[int], workers: int, executor: Any, reps: int
) -> float:
    """Best wall seconds of ``reps`` runs of one ``map`` stage over ``items``."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run = tp.Pipeline.from_iter(items).map(fn, workers=workers, executor=executor).start()
        count = sum(1 for _ in run)
        run.join()
        best = min(best, time.perf_counter() - start)
        assert count == len(items)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU-bound stage on threads, processes, Dask.")
    parser.add_argument("--items", type=int, default=300, help="items per run (default 300)")
    parser.add_argument("--ms", type=float, default=10.0, help="CPU ms per item (default 10)")
    parser.add_argument("--reps", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask rows")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    n = calibrate(args.ms)
    per_item = _timed(lambda: [spin(n) for _ in range(20)]) / 20
    # Distinct items: Dask treats calls as pure by default and would compute equal ones only once.
    items = [n + i for i in range(args.items)]
    print(
        f"CPython {platform.python_version()} on {platform.machine()}, {cores} cores; "
        f"{args.items} items of {1000 * per_item:.1f} ms CPU each; best of {args.reps}"
    )
    print(f"one core's ceiling: {1 / per_item:.1f} items/s; {cores} cores: {cores / per_item:.1f}")
    print()

    rows: list[tuple[str, float]] = []
    rows.append((f"threads, workers={cores}", measure(spin, items, cores, None, args.reps)))
    rows.append(
        (
            f'executor="processes", workers={cores}',
            measure(spin, items, cores, "processes", args.reps),
        )
    )

    cluster = client = None
    dask_executor: Executor | None = None
    if not args.no_dask:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            print('(Dask rows skipped: pip install "threadpipe[dask]")')
        else:
            cluster = LocalCluster(
                n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            client = Client(cluster)
            dask_executor = client.get_executor(pure=False)
            dask_executor.submit(noop, 0).result()  # workers up and connected
            for in_flight in (cores, 4 * cores):
                label = f"Dask LocalCluster({cores} workers), workers={in_flight}"
                rows.append((label, measure(spin, items, in_flight, dask_executor, args.reps)))

    threads_rate = args.items / rows[0][1]
    width = max(len(label) for label, _ in rows)
    print(f"{'configuration':<{width}}  {'seconds':>7}  {'items/s':>8}  {'vs threads':>10}")
    for label, seconds in rows:
        rate = args.items / seconds
        print(f"{label:<{width}}  {seconds:7.2f}  {rate:8.1f}  {rate / threads_rate:9.2f}x")

    # Per-item overhead: a function that does nothing, so the wall time is all overhead. With
    # `workers` calls in flight and c cores, an item of t seconds CPU runs at best at c/t items/s;
    # the overhead is what the executor adds on top, per item.
    print()
    print("per-item overhead: wall time per item of a function that does nothing")
    noops, few = list(range(2000)), list(range(300))  # Dask gets fewer: it takes ms per item
    overheads: list[tuple[str, int, float]] = [
        (f"threads, workers={cores}", len(noops), measure(noop, noops, cores, None, args.reps)),
        (
            f'executor="processes", workers={cores}',
            len(noops),
            measure(noop, noops, cores, "processes", args.reps),
        ),
    ]
    if dask_executor is not None:
        for in_flight in (cores, 4 * cores, 32):
            seconds = measure(noop, few, in_flight, dask_executor, args.reps)
            overheads.append((f"Dask, workers={in_flight}", len(few), seconds))
    width = max(len(label) for label, _, _ in overheads)
    for label, count, seconds in overheads:
        print(f"{label:<{width}}  {1e6 * seconds / count:7.0f} us/item  ({count} items)")
    if dask_executor is not None:
        # What each task cost beyond its own CPU time, in core-seconds, in the best Dask row:
        # the scheduler, the workers' bookkeeping and the client share the same cores here.
        label, seconds = rows[-1]
        extra = (cores * seconds - args.items * per_item) / args.items
        print(f"\nDask's cost per {args.ms:g} ms task, beyond the task itself, in the best row")
        print(f"({label}): {1000 * extra:.1f} core-ms")
    if client is not None and cluster is not None:
        client.close()
        cluster.close()


if __name__ == "__main__":  # needed: process pools and Dask workers import this module
    main()
