"""Statistics: frozen snapshots of a run's per-stage counters (the report reading them: ``_report``).

Workers keep their own counters (one ``_Counters`` per worker, written only by that worker), so
statistics cost the pipeline nothing but a few additions per batch; everything here happens when a
snapshot is asked for, by merging the counters of every worker of a stage. A snapshot reads plain
ints and floats without locks: each read is atomic, and the fields of one snapshot may be a batch
apart, never torn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._channel import END, Channel

if TYPE_CHECKING:
    from ._run import Clock

__all__ = [
    "BufferFill",
    "ResourceUse",
    "Samples",
    "StageStats",
    "fill",
    "snapshot",
]

@dataclass(frozen=True, slots=True)
class StageStats:
    """A snapshot of one stage's counters, from :meth:`Run.stats`.

    Counts include a batch only once its calls have all returned: a call still running is counted in
    ``in_flight``, not yet in ``items_in`` or ``busy_seconds``.

    Attributes:
        name: the stage's name.
        kind: ``map``, ``filter``, ``flat_map`` or ``each``.
        workers: the most threads the stage may run (the ``workers=`` it was built with).
        spawned: the threads started so far (workers start as the load calls for them; a
            coroutine or executor stage runs two, an operator one). A thread stage's workers
            leave when its calls are measured cheap, and start again if they slow down, so this
            can exceed ``workers``; ``concurrency`` never does.
        items_in: input items whose calls have returned.
        items_out: items the stage has produced (for an ordered stage, some may still wait in its
            reorder buffer for their turn).
        errors: calls that raised.
        in_flight: items taken from the input buffer whose calls have not all returned yet.
        busy_seconds: seconds spent in the user's function, summed over the workers.
        cpu_seconds: CPU seconds used by the stage's threads (each reads its CPU clock as it
            exits), or None until the run is done, and for stages whose calls do not run on
            threads of their own (coroutine and executor stages). Much less than
            ``busy_seconds`` means the calls mostly wait (I/O, sleeps, locks); close to it means
            they compute.
        utilization: ``busy_seconds / (workers * elapsed)``, clipped to 0..1, where ``workers`` is
            the configured maximum (not ``spawned``) and ``elapsed`` the run's wall time so far: 1.0
            means every allowed thread was calling the function all the time.
        queue_size: items in the stage's input buffer now.
        queue_capacity: the input buffer's capacity.
        dropped: items the input buffer let go because it is a relief valve (0 otherwise).
        concurrency: the most calls that were in flight at once so far: a thread stage's
            most workers running at once, a coroutine stage's coroutines, an executor stage's
            submitted calls.
        throttled_seconds: seconds its calls waited for the stage's rate limit (``rate=``),
            summed over the workers; not counted in ``busy_seconds`` or ``utilization``.
        rate: the stage's ``rate=`` (calls per second), or None.
        abandoned: calls of a thread stage with ``timeout=`` that overran and were given up on;
            each one's thread runs on until the call returns (its result is dropped), outside
            the run.
    """

    name: str
    kind: str
    workers: int
    spawned: int
    items_in: int
    items_out: int
    errors: int
    in_flight: int
    busy_seconds: float
    cpu_seconds: float | None
    utilization: float
    queue_size: int
    queue_capacity: int
    dropped: int = 0
    concurrency: int = 0
    throttled_seconds: float = 0.0
    rate: float | None = None
    abandoned: int = 0

    @property
    def seconds_per_item(self) -> float | None:
        """Mean seconds in the function per input item, or None before the first call returns."""
        return self.busy_seconds / self.items_in if self.items_in else None


@dataclass(frozen=True, slots=True)
class BufferFill:
    """How full one buffer was over the samples of a run (fractions of the samples, 0..1).

    Attributes:
        mean: the mean fill, as a fraction of the capacity.
        full: the share of samples in which the buffer was at capacity.
        empty: the share of samples in which the buffer was empty.
    """

    mean: float
    full: float
    empty: float


@dataclass(frozen=True, slots=True)
class ResourceUse:
    """The process's CPU and memory over the samples of a run.

    Attributes:
        cpu_peak: the highest CPU percent over one sampling interval (100 = one core).
        rss_mean: the mean resident set size, in bytes.
        rss_peak: the highest resident set size sampled, in bytes.
    """

    cpu_peak: float
    rss_mean: float
    rss_peak: int


@dataclass(frozen=True, slots=True)
class Samples:
    """What the monitor thread saw: buffer fill per stage input (and the output), and resources.

    Attributes:
        count: how many samples were taken.
        inputs: the fill of each stage's input buffer, in stage order.
        output: the fill of the buffer the caller reads.
        resources: CPU and memory, or None when not sampled.
    """

    count: int
    inputs: tuple[BufferFill, ...]
    output: BufferFill
    resources: ResourceUse | None


def fill(channel: Channel) -> int:
    """Items in ``channel`` now, not counting the end-of-input sentinel."""
    # Under the channel's lock: the sentinel test reads the tail, which a getter may pop meanwhile.
    # A buffer confined to the loop (``LoopLink``) changes without that lock: its tail may be gone.
    with channel.mutex:
        q = channel.queue
        n = len(q)
        try:
            return n - 1 if n and q[-1] is END else n
        except IndexError:
            return 0


def snapshot(stages: Sequence[Any], clock: Clock) -> tuple[StageStats, ...]:
    """Merge every stage's per-worker counters into one frozen :class:`StageStats` per stage.

    Args:
        stages: the run's stage runtimes; each has ``spec`` (name, kind, workers), ``inp``,
            ``spawned`` and ``counters`` (objects with ``items_in``, ``items_out``, ``errors``,
            ``busy_seconds``).
        clock: the run's clock, for utilization.

    Returns:
        One snapshot per stage, in stage order.
    """
    elapsed = clock.elapsed()
    done = clock.ended is not None
    result = []
    for stage in stages:
        spec = stage.spec
        # Copy first: the list grows as workers start. Counters are read before the channel's
        # ``taken``, which moves first (items are taken before their calls are counted), so
        # ``taken - items_in`` is never negative.
        counters = list(stage.counters)
        items_in = sum(c.items_in for c in counters)
        items_out = sum(c.items_out for c in counters)
        errors = sum(c.errors for c in counters)
        busy = sum(c.busy_seconds for c in counters)
        # Known once every thread has exited, and only for runtimes that measure it (a stage on
        # an executor or an event loop does not: its calls do not run on threads of its own).
        cpus = [c.cpu_seconds for c in counters if c.cpu_seconds is not None]
        cpu = sum(cpus) if done and len(cpus) == len(counters) else None
        inp = stage.inp
        in_flight = max(0, inp.taken - items_in)
        capacity = spec.workers * elapsed
        utilization = min(1.0, busy / capacity) if capacity > 0 else 0.0
        result.append(
            StageStats(
                name=spec.name,
                kind=spec.kind,
                workers=spec.workers,
                spawned=stage.spawned,
                items_in=items_in,
                items_out=items_out,
                errors=errors,
                in_flight=in_flight,
                busy_seconds=busy,
                cpu_seconds=cpu,
                utilization=utilization,
                queue_size=fill(inp),
                queue_capacity=inp.maxsize,
                dropped=getattr(inp, "dropped", 0),
                concurrency=stage.concurrency,
                throttled_seconds=sum(c.throttled_seconds for c in counters),
                rate=spec.options.rate,
                abandoned=sum(c.abandoned for c in counters),
            )
        )
    return tuple(result)


# ---------------------------------------------------------------------------------------- report
