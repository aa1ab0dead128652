"""Tracing: the start and end of every call, per worker, for a timeline of the run.

With ``start(trace=True)``, each worker, once when it starts, wraps its stage's function and its
input channel's ``get_many`` in recorders; with tracing off nothing is wrapped, so the worker loop
runs exactly as it does without this module. A recorder keeps its worker's calls in a flat
``array('d')`` of (item number, start, end): 24 bytes a call. The item number is the item's position
in the stage's input, as the input buffer numbers items (for the first stage, the source's order).

Memory is bounded by a cap on the number of calls recorded per run (:data:`DEFAULT_TRACE_CAP`,
100,000 calls, about 2.4 MB, unless ``trace=`` gives another number): the first calls up to the cap
are kept, later ones are only counted as dropped. Workers take the cap in chunks under a lock (the
lock is taken once per chunk, not per call), so a run never keeps more than the cap; when the cap
runs out, a few slots may still sit reserved by one worker while another drops a call, so slightly
fewer than the cap may be kept. Kept plus dropped is always the number of calls.

The timeline is written as Chrome trace-event JSON (Perfetto, ``chrome://tracing``) or drawn as a
Gantt chart with matplotlib (an optional extra).
"""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any, Final

from ._errors import describe

__all__ = ["DEFAULT_TRACE_CAP", "Tracer", "check_trace"]

DEFAULT_TRACE_CAP: Final = 100_000
"""The most calls a run started with ``trace=True`` records; later calls are counted as dropped."""

# Calls a worker reserves from the run's cap at a time.
_CHUNK: Final = 512

GetMany = Callable[..., Any]


def check_trace(trace: object) -> int:
    """Validate ``start(trace=...)``: the cap on recorded calls, or 0 for no tracing.

    Raises:
        TypeError: ``trace`` is not a bool or an int.
        ValueError: ``trace`` is an int < 1.
    """
    if trace is False or trace is None:
        return 0
    if trace is True:
        return DEFAULT_TRACE_CAP
    if not isinstance(trace, int):
        raise TypeError(
            "trace must be a bool or an int (the most calls to record), "
            f"got {describe(trace)} ({type(trace).__qualname__})"
        )
    if trace < 1:
        raise ValueError(
            f"trace must be True or an int >= 1 (the most calls to record), got {trace}"
        )
    return trace


class _Lane:
    """The calls of one worker. Only that worker writes to it."""

    __slots__ = ("_left", "_next", "_tracer", "calls", "dropped", "stage", "worker")

    def __init__(self, tracer: Tracer, stage: int, worker: int) -> None:
        self.stage = stage
        self.worker = worker
        self.calls = array("d")  # flat triples: item number, start, end (perf_counter seconds)
        self.dropped = 0
        self._left = 0  # calls reserved from the cap and not used yet
        self._next = 0  # the number of the next item this worker calls the function on
        self._tracer = tracer

    def record(self, number: int, started: float, ended: float) -> None:
        if not self._left:
            self._left = self._tracer.reserve()
            if not self._left:
                self.dropped += 1
                return
        self._left -= 1
        calls = self.calls
        calls.append(number)
        calls.append(started)
        calls.append(ended)

    def wrap_get(self, get_many: GetMany) -> GetMany:
        """Wrap the input channel's ``get_many`` to note the number of each batch's first item."""

        def get(*args: Any) -> Any:
            got = get_many(*args)
            if got is not None:
                self._next = got[1]
            return got

        return get

    def wrap(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Wrap a stage's function to record each call."""
        record = self.record

        def traced(item: Any) -> Any:
            number = self._next
            self._next = number + 1
            started = perf_counter()
            try:
                return fn(item)
            finally:
                record(number, started, perf_counter())

        return traced

    def wrap_iter(self, fn: Callable[[Any], Any]) -> Callable[[Any], Iterator[Any]]:
        """Wrap a flat_map function: a call lasts until its iterable is exhausted (or closed)."""
        record = self.record

        def traced(item: Any) -> Iterator[Any]:
            # The call is made here, outside a generator, so that what it raises leaves as itself
            # (a StopIteration inside a generator would become a RuntimeError).
            number = self._next
            self._next = number + 1
            started = perf_counter()
            try:
                results = fn(item)
            except BaseException:
                record(number, started, perf_counter())
                raise
            return drain(number, started, results)

        def drain(number: int, started: float, results: Any) -> Iterator[Any]:
            try:
                yield from results
            finally:
                record(number, started, perf_counter())

        return traced


class Tracer:
    """The calls of one run, one lane per worker.

    Args:
        names: the stages' names, in order.
        cap: the most calls to record.
        origin: the run's start (``perf_counter``), time zero of the timeline.
    """

    def __init__(self, names: tuple[str, ...], cap: int, origin: float) -> None:
        self.names = names
        self.cap = cap
        self.origin = origin
        self._index = {name: i for i, name in enumerate(names)}
        # ``_lock`` guards ``_left`` and ``_lanes``; ``_full`` is read without it (a stale False
        # only costs one more trip to the lock).
        self._lock = threading.Lock()
        self._left = cap
        self._full = False
        self._lanes: list[_Lane] = []

    def reserve(self) -> int:
        """Take up to one chunk of the cap for a worker; 0 once the cap is used up."""
        if self._full:
            return 0
        with self._lock:
            # An eighth of what is left, at most a chunk: as the cap runs out the pieces shrink,
            # so little of it sits reserved in one worker while another worker has to drop.
            n = min(_CHUNK, max(1, self._left // 8), self._left)
            self._left -= n
            if not self._left:
                self._full = True
            return n

    def hook(
        self,
        stage: str,
        worker: int,
        fn: Callable[[Any], Any],
        get_many: GetMany,
        iterates: bool = False,
    ) -> tuple[Callable[[Any], Any], GetMany]:
        """Wrap a worker's function and input getter so that each call is recorded.

        Called once per worker, when it starts: tracing costs nothing in workers of an untraced run.

        Args:
            stage: the stage's name.
            worker: the worker's index in its stage.
            fn: the stage's function.
            get_many: the input channel's ``get_many``.
            iterates: ``fn`` returns an iterable whose iteration is part of the call (flat_map).

        Returns:
            The wrapped ``fn`` and ``get_many``, to use in their place.
        """
        lane = _Lane(self, self._index[stage], worker)
        with self._lock:
            self._lanes.append(lane)
        wrapped = lane.wrap_iter(fn) if iterates else lane.wrap(fn)
        return wrapped, lane.wrap_get(get_many)

    @property
    def dropped(self) -> int:
        """Calls not recorded because the cap was reached."""
        return sum(lane.dropped for lane in self.lanes())

    def lanes(self) -> list[_Lane]:
        """The lanes, sorted by stage and worker."""
        with self._lock:
            lanes = list(self._lanes)
        return sorted(lanes, key=lambda lane: (lane.stage, lane.worker))

    def calls(self) -> list[tuple[int, int, list[tuple[int, float, float]]]]:
        """A snapshot: per lane, ``(stage index, worker, [(item, start, end), ...])``.

        Times are seconds from the run's start.
        """
        origin = self.origin
        result = []
        for lane in self.lanes():
            flat = lane.calls
            # A worker may be appending: read whole triples only.
            flat = flat[: len(flat) // 3 * 3]
            events = [
                (int(flat[i]), flat[i + 1] - origin, flat[i + 2] - origin)
                for i in range(0, len(flat), 3)
            ]
            result.append((lane.stage, lane.worker, events))
        return result

    # -------------------------------------------------------------------------------- output

    def chrome_trace(self) -> dict[str, Any]:
        """The trace as a Chrome trace-event document (a JSON-ready dict).

        Each stage is a process (pid = stage number from 1, named after the stage), each worker a
        thread in it (tid = worker index + 1, named ``threadpipe-<stage>-<i>`` as the real one is),
        each call an ``"X"`` event with ``ts`` and ``dur`` in microseconds from the run's start.
        """
        events: list[dict[str, Any]] = []
        for i, name in enumerate(self.names):
            pid = i + 1
            events.append(
                {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}}
            )
            events.append(
                {
                    "ph": "M",
                    "name": "process_sort_index",
                    "pid": pid,
                    "tid": 0,
                    "args": {"sort_index": i},
                }
            )
        for stage, worker, calls in self.calls():
            pid, tid, name = stage + 1, worker + 1, self.names[stage]
            events.append(
                {
                    "ph": "M",
                    "name": "thread_name",
                    "pid": pid,
                    "tid": tid,
                    "args": {"name": f"threadpipe-{name}-{worker}"},
                }
            )
            events.append(
                {
                    "ph": "M",
                    "name": "thread_sort_index",
                    "pid": pid,
                    "tid": tid,
                    "args": {"sort_index": worker},
                }
            )
            for item, started, ended in calls:
                events.append(
                    {
                        "ph": "X",
                        "name": name,
                        "cat": "call",
                        "pid": pid,
                        "tid": tid,
                        "ts": round(started * 1e6, 3),
                        "dur": round((ended - started) * 1e6, 3),
                        "args": {"item": item},
                    }
                )
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"generator": "threadpipe", "cap": self.cap, "dropped": self.dropped},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`chrome_trace` as JSON to the file ``path``."""
        document = self.chrome_trace()
        with open(path, "w", encoding="utf-8") as file:
            import json  # here, not at the top: only saving a trace needs it

            json.dump(document, file)

    def plot(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        """Draw the calls as a Gantt chart, a lane per worker grouped by stage, into an image file.

        Raises:
            ImportError: matplotlib is not installed (``pip install 'threadpipe[plot]'``).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.colors import to_rgb
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "plot_timeline() needs matplotlib: pip install 'threadpipe[plot]'"
            ) from exc
        lanes = self.calls()
        count = max(1, len(lanes))
        # A Figure and its canvas, not pyplot: no global state, no GUI backend, safe in any thread.
        fig = Figure(figsize=(10, 1.2 + 0.32 * count), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        # Two shades per stage, alternating call by call, so back-to-back calls stay distinguishable.
        shades = []
        for i in range(len(self.names)):
            r, g, b = to_rgb(f"C{i % 10}")
            shades.append(((r, g, b), (0.45 + 0.55 * r, 0.45 + 0.55 * g, 0.45 + 0.55 * b)))
        labels = []
        end = max((e for _, _, calls in lanes for _, _, e in calls), default=0.0)
        # Calls shorter than a pixel are drawn a pixel wide, or fast stages would vanish.
        least = end / 1000
        for row, (stage, worker, calls) in enumerate(lanes):
            y = count - 1 - row  # first stage on top
            spans = [(started, max(ended - started, least)) for _, started, ended in calls]
            faces = [shades[stage][k % 2] for k in range(len(calls))]
            ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=faces, edgecolor="none")
            labels.append((y, f"{self.names[stage]} {worker}"))
        ax.set_yticks([y for y, _ in labels], [label for _, label in labels])
        ax.set_ylim(-0.6, count - 0.4)
        ax.set_xlim(0, end * 1.01 or 1)
        ax.set_xlabel("seconds since the run started")
        for row in range(1, len(lanes)):
            if lanes[row][0] != lanes[row - 1][0]:  # a line between two stages' groups
                ax.axhline(count - row - 0.5, color="0.6", linewidth=0.8)
        calls_total = sum(len(calls) for _, _, calls in lanes)
        dropped = self.dropped
        ax.set_title(
            title
            or f"threadpipe timeline: {calls_total} calls"
            + (f" ({dropped} more not recorded)" if dropped else "")
            + "; one lane per worker thread",
            fontsize=10,
        )
        ax.grid(axis="x", color="0.9")
        ax.set_axisbelow(True)
        fig.tight_layout()
        fig.savefig(path)
