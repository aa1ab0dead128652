"""Statistics: frozen snapshots of a run's per-stage counters, and the report that reads them.

Workers keep their own counters (one ``_Counters`` per worker, written only by that worker), so
statistics cost the pipeline nothing but a few additions per batch; everything here happens when a
snapshot is asked for, by merging the counters of every worker of a stage. A snapshot reads plain
ints and floats without locks: each read is atomic, and the fields of one snapshot may be a batch
apart, never torn.

The report puts the snapshot in a table and names the bottleneck: the stage whose workers were busy
most of the time while the stage before it waited to put (its input buffer full) and the stage after
it waited to get (its output buffer empty). Buffer fill and resource use come from the monitor
thread (``progress=`` or ``monitor=True``); without it the verdict rests on utilization alone.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter, process_time
from typing import TYPE_CHECKING, Any, Final

from ._channel import END, Channel

if TYPE_CHECKING:
    from ._run import RunState

__all__ = [
    "BufferFill",
    "Clock",
    "ResourceUse",
    "Samples",
    "StageStats",
    "fill",
    "render_report",
    "snapshot",
]

# Seconds between the monitor's samples (``_monitor.INTERVAL``, which imports this module).
_INTERVAL: Final = 0.1

# Width the report's sentences are wrapped to.
_WIDTH: Final = 100

# A stage is "busy" (a candidate bottleneck) when its workers were in the user function at least
# this share of the time; below it, the stages mostly waited, so the time went elsewhere.
_BUSY: Final = 0.6

# Stages within this much utilization of the busiest are ties, broken by the buffers around them.
_TIE: Final = 0.05

# The bottleneck is CPU-bound when its threads used at least this share of the CPU time they could
# have used (its busy time, at most one core's worth under the GIL). While the run goes on, the
# threads' CPU time is not known yet, and the process's stands in for it, with a higher bar.
_CPU_BOUND: Final = 0.5
_CPU_BOUND_PROCESS: Final = 0.7

# The process is CPU-saturated when it used at least this share of one core.
_SATURATED: Final = 0.9

# A bottleneck busy less than ``_BUSY_ENOUGH`` whose input buffer was empty in at least
# ``_OFTEN_EMPTY`` of the samples was starved part of the time: a larger buffer in front of it would
# absorb upstream bursts. (A stage busy all the time may show an empty buffer: its workers hold
# the items.)
_BUSY_ENOUGH: Final = 0.9
_OFTEN_EMPTY: Final = 0.25

# Fewer samples than this say little about the buffers: the verdict then ignores them.
_MIN_SAMPLES: Final = 10


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
            coroutine or executor stage runs two, an operator one).
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
            started workers, a coroutine stage's coroutines, an executor stage's submitted calls.
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

    @property
    def seconds_per_item(self) -> float | None:
        """Mean seconds in the function per input item, or None before the first call returns."""
        return self.busy_seconds / self.items_in if self.items_in else None


class Clock:
    """A run's wall-clock and process CPU time, from its start to the exit of its last thread."""

    __slots__ = ("cpu_ended", "cpu_started", "ended", "started")

    def __init__(self) -> None:
        self.started = perf_counter()
        self.cpu_started = process_time()
        self.ended: float | None = None
        self.cpu_ended: float | None = None

    def stop(self) -> None:
        """Mark the end of the run; called once, by the run's last thread to exit."""
        if self.ended is None:
            # CPU first: a reader that sees ``ended`` set also sees ``cpu_ended`` set.
            self.cpu_ended = process_time()
            self.ended = perf_counter()

    def elapsed(self) -> float:
        """Wall seconds from the start to the end of the run (or to now, while it runs)."""
        ended = self.ended
        return (perf_counter() if ended is None else ended) - self.started

    def cpu_seconds(self) -> float:
        """CPU seconds the whole process used (all threads, user and system) during the run."""
        ended = self.cpu_ended
        return (process_time() if ended is None else ended) - self.cpu_started


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
    with channel.mutex:
        q = channel.queue
        n = len(q)
        return n - 1 if n and q[-1] is END else n


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
            )
        )
    return tuple(result)


# ---------------------------------------------------------------------------------------- report


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _status(state: RunState) -> str:
    if state.error is not None:
        return f"failed ({type(state.error).__name__})"
    if state.cancelled:
        return "cancelled"
    return "done" if state.done.is_set() else "running"


def _table(stats: Sequence[StageStats], samples: Samples | None) -> list[str]:
    header = (
        "stage",
        "kind",
        "threads",
        "in",
        "out",
        "errors",
        "in flight",
        "busy s",
        "cpu s",
        "util",
        "ms/item",
        "buffer",
        "mean",
    )
    rows = [header]
    for i, s in enumerate(stats):
        per_item = s.seconds_per_item
        rows.append(
            (
                s.name,
                s.kind,
                f"{s.spawned}/{s.workers}",
                str(s.items_in),
                str(s.items_out),
                str(s.errors),
                str(s.in_flight),
                f"{s.busy_seconds:.2f}",
                "-" if s.cpu_seconds is None else f"{s.cpu_seconds:.2f}",
                _pct(s.utilization),
                "-" if per_item is None else f"{1000 * per_item:.3f}",
                f"{s.queue_size}/{s.queue_capacity}",
                "-" if samples is None else _pct(samples.inputs[i].mean),
            )
        )
    # Text columns left-aligned, numbers right-aligned.
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    left = {0, 1}
    lines = []
    for row in rows:
        cells = [
            cell.ljust(widths[c]) if c in left else cell.rjust(widths[c])
            for c, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _verdict(
    stats: Sequence[StageStats], elapsed: float, cpu: float, samples: Samples | None
) -> list[str]:
    """The bottleneck, why, and what to try, as report lines."""
    if not stats:
        return ["bottleneck: none (the pipeline has no stages)"]
    if not any(s.items_in for s in stats):
        return ["bottleneck: not known yet (no call has returned)"]
    top = max(s.utilization for s in stats)
    if top < _BUSY:
        return _outside(stats, top, samples)
    # Ties are broken by the buffers: the true bottleneck has a full buffer before it and an empty
    # one after it. Without samples, the first of the busiest wins.
    tied = [i for i, s in enumerate(stats) if s.utilization >= top - _TIE]
    if samples is not None:
        fills = [*samples.inputs, samples.output]
        index = max(tied, key=lambda i: (fills[i].full - fills[i + 1].full, stats[i].utilization))
    else:
        index = max(tied, key=lambda i: stats[i].utilization)
    s = stats[index]
    others = [o for o in stats if o is not s]
    lines = [f"bottleneck: stage {s.name!r} ({s.kind}, {s.workers} worker{'s' * (s.workers > 1)})"]
    why = f"its workers were busy {_pct(s.utilization)} of the time"
    if others:
        runner_up = max(others, key=lambda o: o.utilization)
        why += f" (next busiest: {runner_up.name!r}, {_pct(runner_up.utilization)})"
    if samples is not None:
        before, after = samples.inputs[index], ([*samples.inputs, samples.output])[index + 1]
        why += (
            f"; its input buffer was full in {_pct(before.full)} of samples, the buffer after it"
            f" empty in {_pct(after.empty)}"
        )
        if before.full >= 0.5 and after.empty >= 0.5:
            upstream = "the source waits" if index == 0 else "the stages before it wait"
            downstream = "the caller waits" if index == len(stats) - 1 else "the ones after it wait"
            why += f": {upstream} to put, {downstream} to get"
    lines.append(f"  why: {why}")
    # CPU-bound: the stage's threads computed for most of their busy time. They share a single
    # core under the GIL, so the busy time counts at most ``elapsed``.
    could_use = min(s.busy_seconds, elapsed)
    if s.cpu_seconds is not None:
        cpu_bound = could_use > 0 and s.cpu_seconds >= _CPU_BOUND * could_use
        used = f"its threads used {s.cpu_seconds:.2f} s of CPU in {s.busy_seconds:.2f} s busy"
    else:
        cpu_bound = could_use > 0 and cpu >= _CPU_BOUND_PROCESS * could_use
        used = f"the process used {cpu:.2f} s of CPU; the stage was busy {s.busy_seconds:.2f} s"
    if cpu_bound:
        lines.append(
            f"  try: it is CPU-bound ({used}): more threads will not help under the GIL; run it in"
            " a process pool (an executor stage) or make the function cheaper"
        )
    else:
        lines.append(
            f"  try: more workers for it (now {s.workers}): its calls mostly wait ({used}), so"
            " more threads overlap more of the waiting"
        )
    # A waiting stage can still be slowed by a CPU-heavy one: they all share one core's worth of
    # Python. Name the stage that uses it, once the threads' CPU times are known.
    known = [o for o in stats if o.cpu_seconds is not None]
    if not cpu_bound and known and elapsed > 0 and cpu >= _SATURATED * elapsed:
        heavy = max(known, key=lambda o: o.cpu_seconds or 0.0)
        lines.append(
            f"  note: the process used {_pct(cpu / elapsed)} of one core, so every stage waited"
            f" for the interpreter lock too; {heavy.name!r} used the most CPU"
            f" ({heavy.cpu_seconds:.2f} s): an executor stage for it frees the core for the others"
        )
    empty = None if samples is None else samples.inputs[index].empty
    if empty is not None and empty >= _OFTEN_EMPTY and s.utilization < _BUSY_ENOUGH:
        lines.append(
            f"  try: a larger buffer in front of it (.backpressure(n) before it): its input was"
            f" empty in {_pct(empty)} of samples, so upstream bursts left it idle"
        )
    return lines


def _outside(stats: Sequence[StageStats], top: float, samples: Samples | None) -> list[str]:
    """Verdict lines for a run where no stage was busy most of the time."""
    busiest = max(stats, key=lambda s: s.utilization)
    lines = [
        (
            f"bottleneck: outside the stages (the busiest, {busiest.name!r}, was busy {_pct(top)}"
            " of the time)"
        )
    ]
    if samples is not None and samples.output.full >= 0.5:
        lines.append(
            f"  why: the output buffer was full in {_pct(samples.output.full)} of samples: the"
            " caller reading the outputs is slower than the pipeline"
        )
        lines.append("  try: read the outputs faster, or do that work in a stage")
    elif samples is not None and samples.inputs[0].empty >= 0.5:
        lines.append(
            f"  why: the first buffer was empty in {_pct(samples.inputs[0].empty)} of samples:"
            " the source yields items slower than the stages take them"
        )
        lines.append("  try: a faster source, or move slow work out of the iterable into a stage")
    else:
        calls = sum(s.items_in for s in stats)
        busy = sum(s.busy_seconds for s in stats)
        lines.append(
            f"  why: the stages waited on the source, on the caller, or on per-item overhead"
            f" (calls took {1e6 * busy / max(1, calls):.1f} us on average)"
        )
        if samples is None:
            lines.append("  try: start(monitor=True) samples the buffers to tell which")
    return lines


def render_report(
    stats: Sequence[StageStats],
    state: RunState,
    output: Channel,
    samples: Samples | None,
    monitored: bool = False,
) -> str:
    """Format the report: a header line, the table, the output buffer, and the verdict.

    Args:
        stats: the snapshot to report.
        state: the run's state (status, clock).
        output: the buffer the caller reads.
        samples: what the monitor thread saw, or None when it saw nothing.
        monitored: whether the run had a monitor thread (to explain missing samples).

    Returns:
        The report, lines joined with newlines, no trailing newline.
    """
    clock = state.clock
    elapsed = clock.elapsed()
    cpu = clock.cpu_seconds()
    out = stats[-1].items_out if stats else 0
    first = stats[0].items_in if stats else 0
    lines = [
        (
            f"threadpipe run {_status(state)} after {elapsed:.2f} s: {first} items into the first"
            f" stage, {out} out of the last"
        )
    ]
    resources = (
        ""
        if samples is None or samples.resources is None
        else (
            f" (peak {samples.resources.cpu_peak:.0f}%); memory peak"
            f" {_mb(samples.resources.rss_peak)}, mean {_mb(samples.resources.rss_mean)}"
        )
    )
    share = cpu / elapsed if elapsed > 0 else 0.0
    lines.append(f"process CPU {cpu:.2f} s = {_pct(share)} of one core{resources}")
    if samples is None and monitored:
        lines.append(f"(no samples yet: they are taken every {_INTERVAL} s)")
    elif samples is None:
        lines.append(
            "(buffers, CPU peak and memory not sampled: start with progress= or monitor=True)"
        )
    else:
        lines.append(f"({samples.count} samples of buffers, CPU and memory)")
    lines.append("")
    lines.extend(_table(stats, samples))
    tail = f"output buffer (read by the caller): {fill(output)}/{output.maxsize}"
    if samples is not None:
        tail += f", mean fill {_pct(samples.output.mean)}"
    lines.append(tail)
    lines.append("(threads: started/allowed; util: busy s / (allowed threads x elapsed);")
    lines.append(" buffer: the stage's input buffer now; mean: its mean fill)")
    lines.append("")
    if samples is not None and samples.count < _MIN_SAMPLES:
        lines.append(f"(the verdict ignores the buffers: {samples.count} samples are too few)")
        samples = None
    for line in _verdict(stats, elapsed, cpu, samples):
        # Verdict lines are sentences: wrap them, indented under their "why:"/"try:" label.
        indent = " " * (len(line) - len(line.lstrip()))
        label = line.lstrip().split(" ", 1)[0]
        lines.extend(
            textwrap.wrap(
                line,
                _WIDTH,
                initial_indent="",
                subsequent_indent=indent + " " * (len(label) + 1),
                break_on_hyphens=False,
                drop_whitespace=True,
            )
            if len(line) > _WIDTH
            else [line]
        )
    return "\n".join(lines)
