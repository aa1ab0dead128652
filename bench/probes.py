"""Measurement probes: resident memory of this process, CPU time of another process.

The memory workload cross-checks its sampler against the kernel's own high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``), so a sampler that misses a short
peak, or a GIL-starved sampling thread, shows as a disagreement instead of a wrong number.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil


def rss_bytes() -> int:
    """Returns the current resident set size of this process."""
    return int(psutil.Process().memory_info().rss)


def reset_kernel_peak() -> bool:
    """Resets this process's ``VmHWM`` to its current RSS (Linux >= 4.0).

    Returns:
        Whether the reset was accepted.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def kernel_peak_bytes() -> int | None:
    """Returns ``VmHWM``, the kernel's peak RSS of this process, or None where unavailable."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


class RssSampler:
    """Background thread that records the peak RSS of this process.

    Use as a context manager around the code being measured; ``peak`` is the highest RSS
    seen, ``samples`` how many readings were taken.
    """

    def __init__(self, interval: float = 0.002) -> None:
        """Creates a stopped sampler.

        Args:
            interval: Seconds between readings.
        """
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._sampled = threading.Condition()
        self._thread = threading.Thread(target=self._sample, name="bench-rss-sampler", daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        # Event.wait as the pacing clock: it returns at once when stopped.
        while True:
            rss = process.memory_info().rss
            with self._sampled:
                self.peak = max(self.peak, rss)
                self.samples += 1
                self._sampled.notify_all()
            if self._stop.wait(self.interval):
                break
        self.peak = max(self.peak, process.memory_info().rss)

    def wait_for_sample(self) -> None:
        """Blocks until a reading has been taken entirely after this call."""
        with self._sampled:
            # The reading under way when we are called may predate the call: wait for two.
            target = self.samples + 2
            self._sampled.wait_for(lambda: self.samples >= target)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """Returns user + system CPU seconds used so far by every thread of process ``pid``."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def cpu_share(pid: int, window: float) -> tuple[float, float]:
    """Measures the CPU a running process uses over a window of wall time.

    The calling thread only sleeps for the window: the sleep is the measurement period.

    Args:
        pid: The process to observe.
        window: Seconds to observe it.

    Returns:
        ``(cpu_seconds_per_wall_second, wall_seconds_observed)``.
    """
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    cpu_after, wall_after = cpu_seconds(pid), time.monotonic()
    wall = wall_after - wall_before
    return (cpu_after - cpu_before) / wall, wall
