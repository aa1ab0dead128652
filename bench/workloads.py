"""The reference workloads of shared/BENCHMARKS.md: durations, stage functions, sources.

Everything a child process needs to rebuild a workload from a JSON job lives here, so the
parent and every library see exactly the same durations and items.
"""

from __future__ import annotations

import heapq
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

StageFn = Callable[[Any], Any]
Table = list[list[float]]

SEED = 20240611
STAGES = 3
MIN_S, MAX_S = 0.005, 0.010
SPIKE_S, SPIKE_P = 0.020, 0.20
MB = 1 << 20


def uniform_table(n_items: int, n_stages: int = STAGES, seed: int = SEED) -> Table:
    """Draws every (stage, item) sleep once, uniform in 5-10 ms, from a fixed seed.

    Args:
        n_items: Items per stage.
        n_stages: Number of stages.
        seed: Seed of the private generator.

    Returns:
        ``table[s][i]``, the seconds stage ``s`` sleeps for item ``i``.
    """
    rng = random.Random(seed)
    return [[rng.uniform(MIN_S, MAX_S) for _ in range(n_items)] for _ in range(n_stages)]


def spiky_table(n_items: int, n_stages: int = STAGES, seed: int = SEED) -> Table:
    """Like ``uniform_table`` but 20% of executions take 20 ms instead.

    Args:
        n_items: Items per stage.
        n_stages: Number of stages.
        seed: Seed of the private generator.

    Returns:
        ``table[s][i]`` in seconds.
    """
    rng = random.Random(seed)
    table: Table = []
    for _ in range(n_stages):
        row = []
        for _ in range(n_items):
            # Draw both numbers every time, so the spike pattern doesn't shift the uniform draws.
            spike, base = rng.random() < SPIKE_P, rng.uniform(MIN_S, MAX_S)
            row.append(SPIKE_S if spike else base)
        table.append(row)
    return table


def lower_bound(table: Table, concurrency: int) -> float:
    """The pattern's lower bound on wall time for these durations.

    ``LB(c) = max(max_s sum_i t[s][i] / c, max_i sum_s t[s][i])``: no stage can finish its
    work faster than c-fold parallel, and no item can pass faster than its own stages.

    Args:
        table: ``table[s][i]`` durations in seconds.
        concurrency: Workers per stage.

    Returns:
        The bound in seconds.
    """
    busiest_stage: float = max(sum(row) for row in table)
    slowest_item: float = max(sum(column) for column in zip(*table, strict=True))
    return max(busiest_stage / concurrency, slowest_item)


def ideal_fifo(table: Table, concurrency: int) -> float:
    """The makespan of the ideal FIFO schedule: the pattern run with zero overhead.

    Each stage has ``concurrency`` slots and serves items in the order they reach it; an item
    enters stage ``s`` the moment stage ``s - 1`` finished it (all items reach stage 0 at time 0,
    in index order). Tighter than ``lower_bound``, which ignores that the last items to start
    still have every stage to go. For the headline table (N = 1000) it is 1.03x LB at c = 8,
    1.19x at c = 64, 1.38x at c = 128 and 1.76x at c = 256 (shared/BENCHMARKS.md quotes 1.02x,
    1.20x, 1.40x and 1.79x).

    Args:
        table: ``table[s][i]`` durations in seconds.
        concurrency: Slots (workers) per stage.

    Returns:
        The time the last item leaves the last stage, in seconds.
    """
    ready = [0.0] * len(table[0])
    for row in table:
        slots = [0.0] * concurrency  # when each slot is next free: a min-heap
        done = [0.0] * len(row)
        # sorted() is stable: items that arrive together are served in index order.
        for i in sorted(range(len(row)), key=ready.__getitem__):
            start = max(heapq.heappop(slots), ready[i])
            done[i] = start + row[i]
            heapq.heappush(slots, done[i])
        ready = done
    return max(ready)


def sleep_stages(table: Table) -> list[StageFn]:
    """One stage per row: sleeps ``table[s][item]`` and returns the item (an index) unchanged.

    Args:
        table: ``table[s][i]`` durations in seconds.

    Returns:
        The stage functions.
    """

    def make(row: Sequence[float]) -> StageFn:
        def stage(item: int) -> int:
            time.sleep(row[item])
            return item

        return stage

    return [make(row) for row in table]


def identity(item: Any) -> Any:
    """The identity stage of the overhead and idle workloads."""
    return item


def slow_identity(delay: float) -> StageFn:
    """A stage that holds its item for ``delay`` seconds (the memory workload's slow stage)."""

    def stage(item: Any) -> Any:
        time.sleep(delay)
        return item

    return stage


def megabyte_items(n_items: int, size: int = MB) -> Iterator[bytes]:
    """Yields ``n_items`` fresh ``bytes`` of ``size``, created lazily.

    The bytes are filled by repetition, so every page is written and counts in RSS; a
    zero-filled ``bytes(size)`` comes from calloc and may stay unmapped until touched.

    Args:
        n_items: How many items.
        size: Bytes per item.

    Yields:
        One new object per item.
    """
    for index in range(n_items):
        yield bytes((index % 251 + 1,)) * size


def ticking_source(period: float, on_second_pull: Callable[[], None]) -> Iterator[int]:
    """Yields 0, 1, 2, ... one every ``period`` seconds, forever (the idle workload).

    Args:
        period: Seconds between items.
        on_second_pull: Called once, when the pipeline asks for item 1: by then it has
            taken item 0 and is running, waiting on the source.

    Yields:
        Consecutive integers.
    """
    index = 0
    while True:
        yield index
        if index == 0:
            on_second_pull()
        index += 1
        time.sleep(period)  # the workload itself: a slow source, not a synchronisation
