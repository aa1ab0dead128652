"""What ``timeout=`` costs a thread stage: the per-item time of 3 identity stages, with and without.

Without ``timeout=`` a worker calls the function itself; with it, every call is handed to the
worker's caller thread and back (see ``threadpipe/_timeout.py``). The difference, per call, is the
price of being able to give up on a call. The plain rows are also the check that the plain path
did not get slower.

Usage::

    python bench/timeout.py                 # ~30 s on 2 cores
    python bench/timeout.py --items 20000 --reps 3

Every configuration runs ``--reps`` times and the best run is reported (the machine is shared and
noise only ever slows a run down).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

try:
    import threadpipe as tp
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import threadpipe as tp


def identity(x: int) -> int:
    return x


def best_seconds(items: int, workers: int, timeout: float | None, reps: int) -> float:
    pipeline = tp.Pipeline.from_iter(range(items))
    for _ in range(3):
        pipeline = pipeline.map(identity, workers=workers, timeout=timeout)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        assert pipeline.run() == items
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000, help="items per run (default 100,000)")
    parser.add_argument("--reps", type=int, default=5, help="runs per configuration, best kept")
    args = parser.parse_args(argv)
    print(f"CPython {platform.python_version()}, {os.cpu_count()} cores; {args.items:,} items, 3 stages")
    print(f"{'workers':>7}  {'timeout':>7}  {'us/item':>8}  {'us/call over plain':>18}")
    for workers in (1, 4):
        plain = best_seconds(args.items, workers, None, args.reps) / args.items
        timed = best_seconds(args.items, workers, 10.0, args.reps) / args.items
        print(f"{workers:>7}  {'None':>7}  {plain * 1e6:>8.2f}  {'-':>18}")
        print(f"{workers:>7}  {'10 s':>7}  {timed * 1e6:>8.2f}  {(timed - plain) / 3 * 1e6:>18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
