"""The report: a run's statistics in a table, the bottleneck stage, why, and what to try.

It puts a snapshot (``_stats``) in a table and names the bottleneck: the stage whose workers were
busy most of the time while the stage before it waited to put (its input buffer full) and the stage
after it waited to get (its output buffer empty). Buffer fill and resource use come from the
monitor thread (``progress=`` or ``monitor=True``); without it the verdict rests on utilization
alone.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from ._stats import Samples, StageStats, fill

if TYPE_CHECKING:
    from ._channel import Channel
    from ._run import RunState

__all__ = ["render_report"]

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

    def occupied(s: StageStats) -> float:
        # Busy, or waiting for its rate limit: either way its workers could take no more items.
        capacity = s.workers * elapsed
        share = min(1.0, (s.busy_seconds + s.throttled_seconds) / capacity) if capacity > 0 else 0.0
        if s.rate is not None and s.throttled_seconds > 0 and elapsed > 0:
            # A stage held to ``rate=`` starts its calls ``1 / rate`` apart: ``n`` of them take
            # ``(n - 1) / rate`` seconds, however its workers spent the time (some waiting for
            # their turn, some for input). Only once the limit made someone wait.
            share = max(share, min(1.0, (s.items_in - 1) / (s.rate * elapsed)))
        return share

    top = max(occupied(s) for s in stats)
    if top < _BUSY:
        return _outside(stats, top, samples)
    # Ties are broken by the buffers: the true bottleneck has a full buffer before it and an empty
    # one after it. Without samples, the first of the busiest wins.
    tied = [i for i, s in enumerate(stats) if occupied(s) >= top - _TIE]
    if samples is not None:
        fills = [*samples.inputs, samples.output]
        index = max(tied, key=lambda i: (fills[i].full - fills[i + 1].full, occupied(stats[i])))
    else:
        index = max(tied, key=lambda i: occupied(stats[i]))
    s = stats[index]
    if s.rate is not None and s.throttled_seconds > s.busy_seconds:
        return _rate_limited(s, occupied(s), elapsed)
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


def _rate_limited(s: StageStats, occupied: float, elapsed: float) -> list[str]:
    """The verdict on a bottleneck held back by its own ``rate=``: more workers cannot help."""
    waited = s.throttled_seconds / (s.workers * elapsed) if elapsed > 0 else 0.0
    return [
        f"bottleneck: stage {s.name!r} ({s.kind}, {s.workers} worker{'s' * (s.workers > 1)}),"
        f" limited by rate={s.rate:g}",
        f"  why: its workers waited for its rate limit {_pct(waited)} of the time and were in"
        f" the function {_pct(s.utilization)}: it runs as fast as rate= lets it",
        f"  try: a higher rate= if the service allows it (now {s.rate:g} calls per second);"
        " more workers cannot help",
    ]


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
    share = cpu / elapsed if elapsed > 0 else 0.0
    # The samples may miss the run's busiest moments (a short run has few); the peak is never below
    # the mean over the whole run.
    resources = (
        ""
        if samples is None or samples.resources is None
        else (
            f" (peak {max(samples.resources.cpu_peak, 100 * share):.0f}%); memory peak"
            f" {_mb(samples.resources.rss_peak)}, mean {_mb(samples.resources.rss_mean)}"
        )
    )
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
    for s in stats:
        if s.abandoned:
            lines.append(
                f"abandoned: {s.abandoned} call(s) of {s.name!r} overran timeout= (their threads"
                " run on until the calls return)"
            )
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
