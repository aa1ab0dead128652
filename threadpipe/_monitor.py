"""The monitor: one thread per observed run that samples it and refreshes its progress bars.

It runs only for a run started with ``progress=`` or ``monitor=True``; a plain run has no monitor
and pays nothing for it. Ten times a second it takes a statistics snapshot, the fill of every
buffer, the process's CPU time and resident memory (psutil), and refreshes the bars. It waits on an
event between ticks, so it sleeps rather than polls, and it ends with the run: when the run is done,
stopped (failure, cancel), or its caller asks (the end of iteration, ``join()``). Its last act is to
show the final counts and close the bars, so nothing is drawn after the caller moves on.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from time import perf_counter, process_time
from typing import TYPE_CHECKING, Any, Final

from ._stats import BufferFill, ResourceUse, Samples, fill, snapshot

if TYPE_CHECKING:
    from ._channel import Channel
    from ._progress import Bars
    from ._run import RunState

__all__ = ["INTERVAL", "Monitor"]

INTERVAL: Final = 0.1
"""Seconds between two samples (and two refreshes of the bars)."""


class _Fill:
    """Running aggregates of one buffer's fill; written by the monitor thread under its lock."""

    __slots__ = ("empty", "full", "total")

    def __init__(self) -> None:
        self.total = 0.0
        self.full = 0
        self.empty = 0

    def add(self, size: int, capacity: int) -> None:
        self.total += size / capacity
        self.full += size >= capacity
        self.empty += size == 0

    def result(self, count: int) -> BufferFill:
        if not count:
            return BufferFill(0.0, 0.0, 0.0)
        return BufferFill(self.total / count, self.full / count, self.empty / count)


class Monitor:
    """Samples one run and drives its bars from a thread of its own.

    Args:
        bars: the run's progress bars, or None to sample only.
        interval: seconds between samples.
    """

    def __init__(self, bars: Bars | None, interval: float = INTERVAL) -> None:
        self.bars = bars
        self.interval = interval
        self.failure: Exception | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._stages: Sequence[Any] = ()
        self._channels: list[Channel] = []
        self._state: RunState | None = None
        # ``_lock`` guards the aggregates below: the monitor thread adds a sample under it,
        # ``samples()`` reads them under it from the caller's thread.
        self._lock = threading.Lock()
        self._count = 0
        self._fills: list[_Fill] = []
        self._rss_total = 0.0
        self._rss_peak = 0
        self._cpu_peak = 0.0
        self._resources = 0
        self._process: Any = None
        self._last_cpu = 0.0
        self._last_wall = 0.0

    def start(self, stages: Sequence[Any], output: Channel, state: RunState) -> None:
        """Start sampling ``stages`` (and the ``output`` buffer) in the thread of the monitor."""
        import psutil

        self._stages = stages
        self._channels = [stage.inp for stage in stages] + [output]
        self._fills = [_Fill() for _ in self._channels]
        self._state = state
        self._process = psutil.Process()
        self._last_cpu, self._last_wall = process_time(), perf_counter()
        name = "progress" if self.bars is not None else "monitor"
        thread = threading.Thread(target=self._loop, name=f"threadpipe-{name}-0", daemon=True)
        thread.start()
        self._thread = thread

    def close(self) -> None:
        """Ask the thread to show the final state and exit, and wait for it; idempotent.

        Waits in short slices so that Ctrl-C is not held up.
        """
        self._closing.set()
        thread = self._thread
        if thread is None:
            # Never started: no other thread has touched the bars.
            if self.bars is not None:
                self.bars.close()
            return
        if thread is threading.current_thread():
            return  # a finalizer run by the monitor itself: the set event ends the loop
        while thread.is_alive():
            thread.join(INTERVAL)

    def samples(self) -> Samples | None:
        """What the thread has seen so far, or None before the first sample."""
        with self._lock:
            count = self._count
            if not count:
                return None
            resources = None
            if self._resources:
                resources = ResourceUse(
                    self._cpu_peak, self._rss_total / self._resources, self._rss_peak
                )
            fills = tuple(f.result(count) for f in self._fills)
        return Samples(count, fills[:-1], fills[-1], resources)

    def _loop(self) -> None:
        state = self._state
        assert state is not None
        wait = self._closing.wait
        try:
            while not wait(self.interval):
                if state.done.is_set() or state.stop[0] or state.delivered:
                    break
                self._tick(sample=True)
            # Once more with the final counts; not a sample, since the run is over.
            self._tick(sample=False)
        except Exception as exc:  # monitoring must never fail a run; the bars just stop
            self.failure = exc
        finally:
            if self.bars is not None:
                try:
                    self.bars.close()
                except Exception as exc:
                    self.failure = self.failure or exc

    def _tick(self, sample: bool) -> None:
        stats = snapshot(self._stages, self._state.clock) if self._state is not None else ()
        if self.bars is not None:
            self.bars.update(stats)
        if not sample:
            return
        # CPU from process_time (nanosecond resolution) rather than psutil's cpu_times, which
        # count in clock ticks: too coarse for a 0.1 s window.
        cpu, wall = process_time(), perf_counter()
        cpu_percent = 100 * (cpu - self._last_cpu) / max(wall - self._last_wall, 1e-9)
        self._last_cpu, self._last_wall = cpu, wall
        try:
            rss: int | None = self._process.memory_info().rss
        except Exception:  # psutil may be denied on some platforms; sample the rest anyway
            rss = None
        output = self._channels[-1]
        output_size = fill(output)
        with self._lock:
            self._count += 1
            for f, s in zip(self._fills, stats, strict=False):  # the last fill is the output's
                f.add(s.queue_size, s.queue_capacity)
            self._fills[-1].add(output_size, output.maxsize)
            self._cpu_peak = max(self._cpu_peak, cpu_percent)
            if rss is not None:
                self._resources += 1
                self._rss_total += rss
                self._rss_peak = max(self._rss_peak, rss)
