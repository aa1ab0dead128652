"""A CPU-bound stage on processes, then the same pipeline on a Dask cluster.

Hashing in pure Python holds the interpreter lock, so a wider thread stage does not make it faster.
Handing the stage's calls to an executor does: ``executor="processes"`` gives each run its own
process pool, and a Dask ``Client(...).get_executor()`` sends the same calls to a cluster (here a
``LocalCluster`` of two worker processes; a real one spans machines). The rest of the pipeline, its
ordering and its buffers stay as they are.

What it measures: the wall time and items/s of one pipeline (make a 60 kB block, hash it with a
pure-Python FNV-1a, format the digest) over 120 items, run three ways: the hash stage on threads
(one per core), on a process pool, on the Dask cluster. It first prints how long one block takes to
hash here, and after each executor run whether its digests equal the threads' in order. The
cluster's start-up (about 2 s) is not in its timing but is in the script's runtime.

    python examples/cpu_stage.py             # about 6 s on 2 idle cores; under 15 s
    python examples/cpu_stage.py --items 40  # fewer items

The Dask part needs ``pip install "threadpipe[dask]"``; without it, it is skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from concurrent.futures import Executor
from typing import Literal

import threadpipe as tp

BLOCK_BYTES = 60_000  # about 10 ms of pure-Python hashing (the script prints what it takes here)


def make_block(seed: int) -> bytes:
    """The bytes to hash for one item (in a real program: a file read, a download)."""
    return random.Random(seed).randbytes(BLOCK_BYTES)


def fnv1a(block: bytes) -> int:
    """64-bit FNV-1a, one byte at a time in pure Python: CPU-bound, holds the interpreter lock."""
    h = 0xCBF29CE484222325
    for byte in block:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def pipeline(
    n: int, workers: int, executor: Executor | Literal["processes"] | None
) -> tp.Pipeline[str]:
    """Read blocks on threads, hash them where ``executor`` says, format the results in order."""
    return (
        tp.Pipeline.from_iter(range(n))
        .map(make_block, workers=2)
        .map(fnv1a, workers=workers, executor=executor)
        .map(lambda h: f"{h:016x}")
    )


def timed(label: str, p: tp.Pipeline[str], n: int) -> list[str]:
    start = time.perf_counter()
    digests = p.to_list()
    seconds = time.perf_counter() - start
    print(f"{label:<11}{n} items in {seconds:5.2f} s = {n / seconds:6.1f} items/s")
    return digests


class DropHeartbeatAtShutdown(logging.Filter):
    """Drops the one error a Dask worker may log when the cluster closes under its heartbeat.

    Closing a ``LocalCluster`` races with the workers' heartbeats: one sent just before the
    scheduler drops the worker gets "Stream is closed" and is logged with a traceback, though the
    run ended well (dask/distributed#7105; here 2 runs in 25 on a loaded machine). Only that
    message is dropped; every other log record of the workers still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(
            "Failed to communicate with scheduler during heartbeat"
        )


def drop_heartbeat_race() -> None:
    """Runs in each Dask worker process (``client.run``): installs the filter above there."""
    logging.getLogger("distributed.worker").addFilter(DropHeartbeatAtShutdown())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=120, help="blocks to hash (default 120)")
    args = parser.parse_args()
    n = args.items
    cores = os.cpu_count() or 1

    block = make_block(0)
    start = time.perf_counter()
    fnv1a(block)
    one = time.perf_counter() - start
    print(f"hashing {n} blocks of {BLOCK_BYTES:,} bytes, {one * 1000:.1f} ms each in this process")

    reference = timed("threads:", pipeline(n, cores, None), n)
    on_processes = timed("processes:", pipeline(n, cores, "processes"), n)
    print(
        f"processes give the same digests, in order: {'yes' if on_processes == reference else 'NO'}"
    )

    try:
        from distributed import Client, LocalCluster
    except ImportError:
        print('dask: skipped (pip install "threadpipe[dask]")')
        return
    # Two single-threaded worker processes, no dashboard. ``workers`` counts calls in flight: a
    # few more than the cluster's threads keep every worker busy across Dask's round trips.
    cluster_workers = 2
    with (
        LocalCluster(
            n_workers=cluster_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(cluster_workers)
        client.run(drop_heartbeat_race)
        on_cluster = timed("dask:", pipeline(n, 8, client.get_executor()), n)
    print(f"dask gives the same digests, in order: {'yes' if on_cluster == reference else 'NO'}")


if __name__ == "__main__":  # needed: process pools and Dask workers import this module
    main()
