"""Soak run: a million items through five stages, with the process's RSS sampled as it goes.

Memory must stay flat: every buffer is bounded, so after warm-up the resident set should not grow
with the number of items. A psutil sampler thread records RSS every ``--interval`` seconds; the
report gives the start (after warm-up), peak and end RSS, the drift (end minus start), and the
throughput.

Usage::

    python bench/soak.py                  # 1,000,000 items
    python bench/soak.py --items 100000   # a shorter run
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from collections.abc import Iterator

import psutil

import threadpipe as tp

_MB = 1024 * 1024


def _items(n: int) -> Iterator[bytes]:
    """A generator source of small, distinct payloads (fresh objects, so leaks would show)."""
    for i in range(n):
        yield i.to_bytes(8, "little") * 8


def _parse(b: bytes) -> int:
    return int.from_bytes(b[:8], "little")


def _square(n: int) -> int:
    return n * n


def _keep(n: int) -> bool:
    return n % 7 != 2  # squares mod 7 are 0, 1, 2, 4: drops two items in seven


def _label(n: int) -> str:
    return f"item-{n}"


def _check(s: str) -> None:
    if not s.startswith("item-"):
        raise AssertionError(s)


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its figures; return 1 if an invariant broke."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--interval", type=float, default=0.5, help="RSS sampling period, seconds")
    args = parser.parse_args(argv)

    process = psutil.Process()
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        # Event.wait as the clock: the sampler stops as soon as the run ends.
        while True:
            samples.append((time.monotonic(), process.memory_info().rss))
            if done.wait(args.interval):
                return

    pipeline = (
        tp.Pipeline.from_iter(_items(args.items))
        .map(_parse, workers=4)
        .map(_square, workers=2, ordered=False)
        .filter(_keep, workers=2)
        .map(_label, workers=3)
        .each(_check)
    )
    gc.collect()
    sampler = threading.Thread(target=sample, name="soak-rss")
    started = time.monotonic()
    sampler.start()
    count = 0
    run = pipeline.start()
    try:
        for _ in run:
            count += 1
        run.join(timeout=60)
    finally:
        done.set()
        sampler.join()
    elapsed = time.monotonic() - started
    expected = sum(1 for i in range(args.items) if (i * i) % 7 != 2)

    # The first tenth of the run is warm-up (threads start, buffers and allocator pools fill).
    warm = [rss for t, rss in samples if t - started >= 0.1 * elapsed] or [samples[-1][1]]
    start_rss, end_rss, peak_rss = warm[0], warm[-1], max(warm)
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("threadpipe-")]
    print(f"python {sys.version.split()[0]}, threadpipe {tp.__version__}")
    print(f"items in: {args.items:,}  out: {count:,}  expected out: {expected:,}")
    print(f"time: {elapsed:.1f} s  throughput: {args.items / elapsed:,.0f} items/s")
    print(
        f"RSS (after warm-up, {len(samples)} samples every {args.interval} s): "
        f"start {start_rss / _MB:.1f} MB, peak {peak_rss / _MB:.1f} MB, end {end_rss / _MB:.1f} MB, "
        f"drift {(end_rss - start_rss) / _MB:+.1f} MB"
    )
    print(f"threads left: {leftover or 'none'}")
    ok = count == expected and run.done
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
