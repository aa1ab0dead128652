"""The worker pool: one stage of a run, a set of threads between an input and an output channel.

A stage starts with one worker and grows to its ``workers`` only as work needs it: when items arrive
in its input channel and no worker is idle to take them, the thread that put them starts one more. A
pipeline of wide stages therefore pays for threads only where the load calls for them.

Each worker loops: take a batch from the input channel, call the user's function on each item, put
the outputs downstream (directly, or through the reorder buffer when the stage is ordered). The batch
size adapts: it starts at one item and grows while calls are fast, so cheap functions pay one lock
round-trip per batch instead of per item, and slow ones are shared out one item at a time.

The end of input is the sentinel at the head of the input channel; every worker sees it, and the
last one to exit sends it on, so stages close in a cascade.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from time import perf_counter, thread_time
from typing import TYPE_CHECKING, Any, Final

from ._calls import PLAIN, SKIPPED, CallOptions, RateLimiter, open_resource, wrap
from ._channel import Channel, Closed
from ._reorder import Reorder

if TYPE_CHECKING:
    from ._run import RunState

__all__ = [
    "BATCH",
    "EACH",
    "FILTER",
    "FLAT_MAP",
    "MAP",
    "PIPE",
    "TAKE",
    "Stage",
    "StageSpec",
    "held_bound",
]

MAP: Final = "map"
FILTER: Final = "filter"
FLAT_MAP: Final = "flat_map"
EACH: Final = "each"
# The one-thread stream operators (see ``_operators.py``).
PIPE: Final = "pipe"
BATCH: Final = "batch"
TAKE: Final = "take"

# A batch is sized so that the calls in it take about this long: long enough to amortise the lock
# round-trips of taking and putting, short enough that slow items are still shared between workers.
_BATCH_SECONDS: Final = 0.0002

# A stage whose calls take less than this per item does not grow: one thread already keeps up with
# anything the interpreter lock lets the other threads produce, and more threads only contend.
_GROW_SECONDS: Final = 0.00002

# Weight of the newest batch in the stage's running estimate of seconds per call.
_EWMA: Final = 0.3

_NO_ITEM: Final = object()

# What an item that ``on_error="skip"`` drops becomes, for each kind: dropped from the outputs.
_FALLBACK: Final[dict[str, Callable[[Any], Any]]] = {
    MAP: lambda item: SKIPPED,
    EACH: lambda item: SKIPPED,
    FILTER: lambda item: False,
    FLAT_MAP: lambda item: (),
}


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What a stage is, as built: never changes, shared by every run of the pipeline.

    Attributes:
        kind: one of ``map``, ``filter``, ``flat_map``, ``each``.
        fn: the user's function.
        workers: the most threads the stage runs.
        ordered: whether outputs keep input order.
        name: the stage's label in errors, thread names and statistics.
        capacity: how many items the stage's input buffer holds.
        executor: where the calls run: None for the stage's own threads, else an ``Executor`` or
            ``"processes"``; ``workers`` is then the most calls in flight.
        coroutine: None for a plain function; ``"coroutine"`` or (flat_map only) ``"async_gen"``
            when ``fn`` is async and the calls run on the run's event loop (see ``_aio.py``);
            ``workers`` is then the most coroutines in flight.
        timeout: seconds allowed per call of a coroutine stage, or None.
        options: how each call is made: retries, rate limit, error policy, resource.
        arg: an operator's argument (``take``'s count, ``batch``'s size and timeout).
        relief: the input buffer is a relief valve: it drops its oldest item rather than wait.
    """

    kind: str
    fn: Callable[[Any], Any]
    workers: int
    ordered: bool
    name: str
    capacity: int
    executor: Executor | str | None = None
    coroutine: str | None = None
    timeout: float | None = None
    options: CallOptions = PLAIN
    arg: Any = None
    relief: bool = False

    @property
    def reorders(self) -> bool:
        """Whether the stage needs a reorder buffer (ordered, with more than one worker thread).

        A stage on an executor keeps order with its own queue of futures instead.
        """
        return self.ordered and self.workers > 1 and self.executor is None



def held_bound(spec: StageSpec) -> int:
    """The most input items a stage holds outside its input buffer (in workers, reorder buffer).

    A worker takes at most its share of the items waiting, rounded up, with the buffer shared among
    the workers started so far; the ``i``-th worker (from 1) starts when ``i - 1`` already run, so it
    never holds more than ``ceil(capacity / i)``. An ordered stage's reorder buffer may hold as much
    again in finished items waiting for their turn.

    A stage on an executor holds at most ``workers`` items (one more for ``"processes"``): one
    permit per item, returned only when its output is in the next buffer (see ``_executor.py``).
    """
    if spec.kind == BATCH:
        size: int = spec.arg[0]
        return max(spec.capacity, size)  # a buffer's worth being taken, or one batch
    if spec.executor is not None:
        return spec.workers + 1 if spec.executor == "processes" else spec.workers
    if spec.coroutine:
        # One permit per item in flight, returned once its outputs are handed on; ordered, the
        # reorder window lets as many again wait for their turn (see ``_aio.py``).
        return 2 * spec.workers if spec.reorders else spec.workers
    held = sum(-(-spec.capacity // i) for i in range(1, spec.workers + 1))
    return 2 * held if spec.reorders else held


def _batch_size(call_seconds: float, limit: int) -> int:
    """How many items to take so the calls take about ``_BATCH_SECONDS``, between 1 and ``limit``."""
    if call_seconds <= 0:
        return limit
    size = int(_BATCH_SECONDS / call_seconds)
    return 1 if size < 1 else limit if size > limit else size


@dataclass(slots=True)
class _Counters:
    """One worker's running counts; only that worker writes them, readers sum over workers."""

    items_in: int = 0
    items_out: int = 0
    busy_seconds: float = 0.0
    errors: int = 0
    cpu_seconds: float | None = None  # the worker thread's CPU time, set as it exits


class Stage:
    """One stage of a run: its workers, their counters, and the channels around them.

    Args:
        spec: what to run.
        inp: the channel the workers read.
        out: the channel the outputs go to.
        run: the run's shared state (stop flag, error, thread accounting).
    """

    def __init__(self, spec: StageSpec, inp: Channel, out: Channel, run: RunState) -> None:
        self.spec = spec
        self.inp = inp
        self.out = out
        self.run = run
        self.reorder = Reorder(inp, out, held_bound(spec)) if spec.reorders else None
        rate = spec.options.rate
        # One limiter for the stage, shared by its workers: the rate holds however many there are.
        self.limiter = RateLimiter(rate, run.stopped) if rate is not None else None
        self.counters: list[_Counters] = []
        # ``_lock`` guards the worker accounting below. ``alive`` and ``spawned`` change together
        # under it, so the last worker to exit is known exactly and sends the sentinel once.
        self._lock = threading.Lock()
        self.spawned = 0
        self.alive = 0
        self.ended = False
        # Running estimate of seconds per call, shared by the workers (a float store is atomic;
        # a lost update between two workers only delays the estimate by one batch). None until
        # the first batch is measured.
        self.call_seconds: float | None = None
        if spec.workers > 1:
            # Set before any thread of the run starts, so no put can miss it.
            inp.on_starved = self._grow

    def start(self) -> None:
        """Start the first worker; the input channel asks for more when items find nobody idle."""
        self._grow()

    def _grow(self) -> None:
        """Start one more worker if the stage has room for one and input is not over.

        One at a time, on purpose: starting threads in bursts (two per call, growing as a tree)
        was measured slower at 256 workers, because start-ups compete with the running workers
        for the interpreter lock and stretch every call.
        """
        if self.spawned >= self.spec.workers or self.ended:  # unlocked fast path; rechecked below
            return
        estimate = self.call_seconds
        if estimate is not None and estimate < _GROW_SECONDS and self.spawned:
            return
        with self._lock:
            if self.spawned >= self.spec.workers or self.ended or self.run.stop[0]:
                return
            index = self.spawned
            self.spawned += 1
            if self.spawned == self.spec.workers:
                self.inp.on_starved = None  # fully grown: spare the producers the call
            self.alive += 1
            counters = _Counters()
            self.counters.append(counters)
        self.run.thread_started()
        thread = threading.Thread(
            target=self._work,
            args=(counters, index),
            name=f"threadpipe-{self.spec.name}-{index}",
            daemon=True,
        )
        try:
            thread.start()
        except BaseException:
            # No thread, so nobody will run _work's exit accounting: undo it here.
            self._exit(saw_end=False)
            raise

    def _exit(self, saw_end: bool) -> None:
        with self._lock:
            self.alive -= 1
            last = self.alive == 0
            if saw_end:
                self.ended = True
        if last and saw_end and not self.run.stop[0]:
            self.out.put_end()
        self.run.thread_exited()

    def _work(self, counters: _Counters, index: int) -> None:
        spec = self.spec
        fn = spec.fn
        kind = spec.kind
        inp = self.inp
        get_many = inp.get_many
        options = spec.options
        skipping = options.on_error == "skip"
        release: Callable[[], None] | None = None
        trace = self.run.trace
        if not options.plain:
            # Built once per worker, with its own resource: the plain path stays ``fn(item)``.
            resource = None
            if options.resource is not None:
                try:
                    resource, release = open_resource(options)
                except BaseException as exc:
                    exc.add_note(f"threadpipe: raised while making the resource of stage {spec.name!r}")
                    counters.errors += 1
                    self.run.fail(exc, spec.name, None, has_item=False)
                    self._exit(False)
                    return
            fn = wrap(
                (lambda item, *res: list(spec.fn(item, *res))) if kind is FLAT_MAP else fn,
                options,
                stage=spec.name,
                run=self.run,
                limiter=self.limiter,
                resource=resource,
                counters=counters,
                fallback=_FALLBACK[kind],
            )
        if trace is not None:
            # Chosen once per worker: untraced, the loop below runs the user's function as is.
            fn, get_many = trace.hook(spec.name, index, fn, get_many, kind is FLAT_MAP)
        out = self.out
        reorder = self.reorder
        stop = self.run.stop
        limit = spec.capacity
        estimate = self.call_seconds
        size = 1 if estimate is None else _batch_size(estimate, limit)
        saw_end = False
        item: Any = _NO_ITEM
        try:
            while True:
                got = get_many(size, None, self.spawned)
                assert got is not None  # no timeout given
                items, number = got
                taken = len(items)
                if not taken:
                    saw_end = True
                    return
                started = perf_counter()
                # One loop per kind, so the per-item path has no branch on the kind. Each checks
                # the stop flag before every call: after a cancel the function is never called again.
                outputs: list[Any]
                if kind is MAP:
                    outputs = []
                    for item in items:
                        if stop[0]:
                            raise Closed
                        outputs.append(fn(item))
                    if skipping:
                        outputs = [output for output in outputs if output is not SKIPPED]
                elif kind is FILTER:
                    outputs = []
                    for item in items:
                        if stop[0]:
                            raise Closed
                        if fn(item):
                            outputs.append(item)
                elif kind is EACH and not skipping:
                    for item in items:
                        if stop[0]:
                            raise Closed
                        fn(item)
                    outputs = items
                elif kind is EACH:
                    outputs = []
                    for item in items:
                        if stop[0]:
                            raise Closed
                        if fn(item) is not SKIPPED:
                            outputs.append(item)
                else:
                    outputs = self._flat_map(fn, items, number, counters)
                elapsed = perf_counter() - started
                item = _NO_ITEM
                counters.items_in += taken
                counters.items_out += len(outputs)
                counters.busy_seconds += elapsed
                per_call = elapsed / taken
                estimate = self.call_seconds
                if estimate is not None:
                    per_call = estimate + _EWMA * (per_call - estimate)
                self.call_seconds = per_call
                size = _batch_size(per_call, limit)
                if reorder is not None:
                    reorder.complete(number, taken, outputs)
                elif outputs:
                    out.put_many(outputs)
                del items, outputs  # hand the references on; a slow consumer keeps no extra copy
        except Closed:
            pass
        except BaseException as exc:
            counters.errors += 1
            self.run.fail(exc, spec.name, item, has_item=item is not _NO_ITEM)
        finally:
            # Once per thread, not per batch: tells CPU-bound stages from waiting ones after a run.
            counters.cpu_seconds = thread_time()
            try:
                if release is not None:
                    release()  # the worker's resource, also on failure and cancel
            except BaseException as exc:
                exc.add_note(f"threadpipe: raised while closing the resource of stage {spec.name!r}")
                self.run.fail(exc, spec.name, None, has_item=False)
            finally:
                self._exit(saw_end)

    def _flat_map(
        self, fn: Callable[[Any], Any], items: list[Any], number: int, counters: _Counters
    ) -> list[Any]:
        """Run a flat_map batch; unordered outputs are streamed on in chunks as they come."""
        stop = self.run.stop
        out = self.out
        stream = self.reorder is None
        chunk = max(1, out.maxsize)
        outputs: list[Any] = []
        for item in items:
            if stop[0]:
                raise Closed
            try:
                for result in fn(item):
                    outputs.append(result)
                    if stream and len(outputs) >= chunk:
                        counters.items_out += len(outputs)
                        out.put_many(outputs)
                        outputs = []
            except Closed:
                raise
            except BaseException as exc:
                counters.errors += 1
                self.run.fail(exc, self.spec.name, item)
                raise Closed from None
        return outputs
