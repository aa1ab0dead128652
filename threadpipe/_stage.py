"""The worker pool: one stage of a run, a set of threads between an input and an output channel.

A stage starts with one worker and grows to its ``workers`` only as work needs it: when items arrive
in its input channel and no worker is idle to take them, the thread that put them starts one more. A
pipeline of wide stages therefore pays for threads only where the load calls for them.

Each worker loops: take a batch from the input channel, call the user's function on each item, put
the outputs downstream (directly, or through the reorder buffer when the stage is ordered). The batch
size adapts: it starts at one item and grows while calls are fast, so cheap functions pay one lock
round-trip per batch instead of per item, and slow ones are shared out one item at a time. When the
calls are measured that cheap (under ``_GROW_SECONDS``), every worker but the first leaves: more
threads would only contend for the interpreter lock and split the batches. The stage grows again
if the calls slow down.

A worker that finished a batch may carry it on itself (:meth:`Stage.carry`): when the next stage is
an unordered thread stage (map, filter, each; plain calls) with a worker's place free and nothing
waiting in its input, the worker runs that stage's calls on its outputs in its own thread, counted
as one of that stage's workers for the batch, and hands the results on the same way. That saves
the hand-off, a wake-up of another thread, which is what wide stages (hundreds of workers, every
thread waiting for the interpreter lock) spend most of their time on. A worker away like that
leaves its place at home to another thread when its batch fits the place it takes (see
``Crew.go_away``), and waits for a place when it comes back. A worker whose own stage is at its
limit with items waiting hands its outputs over instead, unless a worker back from a carry waits
for a place: that one then takes the place, and this one carries on.

The end of input is the sentinel at the head of the input channel; every worker sees it, and the
last one to exit sends it on, so stages close in a cascade.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from time import perf_counter, thread_time
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from ._calls import PLAIN, SKIPPED, CallOptions, RateLimiter, open_resource, wrap, wrap_iter
from ._channel import Channel
from ._errors import label
from ._reorder import Reorder
from ._scope import Cancelled, Scope
from ._threads import Crew
from ._timeout import Timed

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from ._run import RunState

__all__ = [
    "BATCH",
    "EACH",
    "FILTER",
    "FLAT_MAP",
    "GROUP_BY",
    "MAP",
    "PIPE",
    "SKIP_WHILE",
    "TAKE",
    "TAKE_WHILE",
    "Stage",
    "StageSpec",
    "Runtime",
    "count_through",
    "outputs_of",
]

MAP: Final = "map"
FILTER: Final = "filter"
FLAT_MAP: Final = "flat_map"
EACH: Final = "each"
# The one-thread stream operators (see ``_operators.py``).
PIPE: Final = "pipe"
BATCH: Final = "batch"
TAKE: Final = "take"
TAKE_WHILE: Final = "take_while"
SKIP_WHILE: Final = "skip_while"
GROUP_BY: Final = "group_by"

# A batch is sized so that the calls in it take about this long: long enough to amortise the lock
# round-trips of taking and putting, short enough that slow items are still shared between workers.
_BATCH_SECONDS: Final = 0.0002

# A stage whose calls take less than this per item does not grow: one thread already keeps up with
# anything the interpreter lock lets the other threads produce, and more threads only contend.
_GROW_SECONDS: Final = 0.00002

# Weight of the newest batch in the stage's running estimate of seconds per call.
_EWMA: Final = 0.3

_NO_ITEM: Final = object()

# The kinds a worker of the stage before may run in its own thread (``Stage.carry``): one output
# at most per input, so a carried batch holds no more than the items it came as.
_CARRIED: Final = frozenset({MAP, FILTER, EACH})

# What an item that ``on_error="skip"`` drops becomes, for each kind: dropped from the outputs.
_FALLBACK: Final[dict[str, Callable[[Any], Any]]] = {
    MAP: lambda item: SKIPPED,
    EACH: lambda item: SKIPPED,
    FILTER: lambda item: False,
}


class StageSpec(NamedTuple):
    """What a stage is, as built: never changes, shared by every run of the pipeline.

    A named tuple, not a dataclass: immutable all the same, and ``dataclasses`` (which imports
    ``inspect``) would be a good part of the cost of ``import threadpipe``.

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
        timeout: seconds allowed per call, or None: a coroutine stage cancels an overrunning call,
            a thread stage abandons it (see ``_timeout.py``).
        options: how each call is made: retries, rate limit, error policy, resource.
        arg: an operator's argument (``take``'s count, ``batch``'s size and timeout,
            ``group_by``'s size, timeout and most open groups).
        relief: the input buffer is a relief valve: it drops its oldest item rather than wait.
    """

    kind: str
    fn: Callable[..., Any]
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



def outputs_of(kind: str, item: Any, result: Any) -> list[Any]:
    """What a stage of ``kind`` passes on for ``item`` when its call gave ``result``.

    The one rule of what each kind does with a result, for the stages that get a call's result
    whole (an executor's future, a coroutine, an error policy's replacement); the thread pool
    inlines it per kind, for speed.
    """
    if kind == MAP:
        return [result]
    if kind == FILTER:
        return [item] if result else []
    if kind == EACH:
        return [item]
    return list(result)


def count_through(spec: StageSpec, inputs: int | None) -> int | None:
    """How many outputs the stage makes from ``inputs`` items, when that is known.

    ``map`` and ``each`` make one per input (unless ``on_error="skip"`` may drop some), ``take(n)``
    at most ``n``; after a ``filter``, a ``flat_map`` or another operator the count is unknown.
    """
    if inputs is None:
        return None
    if spec.kind in (MAP, EACH) and spec.options.on_error != "skip":
        return inputs
    if spec.kind == TAKE:
        limit: int = spec.arg
        return min(inputs, limit)
    return None


def _call_all(
    kind: str,
    fn: Callable[[Any], Any],
    items: list[Any],
    stop: list[bool],
    skipping: bool,
    stage: str,
) -> list[Any]:
    """The outputs of a ``map``, ``filter`` or ``each`` batch: ``fn`` called on each item in turn.

    The one call loop of a thread stage, for its own workers and for a worker of the stage before
    that carries a batch in (``Stage.carry``). One loop per kind, so the per-item path has no
    branch on the kind. Each reads the stop flag before every call: after a cancel the function
    is never called again. ``skipping``: ``fn`` returns ``SKIPPED`` for an item an error policy
    dropped.

    Raises:
        Cancelled: the stage's scope was cancelled.
        BaseException: what a call raised, as itself, labelled with its stage and item.
    """
    item: Any = _NO_ITEM
    outputs: list[Any] | None = None
    try:
        if kind is MAP:
            outputs = []
            for item in items:
                if stop[0]:
                    raise Cancelled
                outputs.append(fn(item))
            if skipping:
                outputs = [output for output in outputs if output is not SKIPPED]
            return outputs
        if kind is FILTER:
            outputs = []
            for item in items:
                if stop[0]:
                    raise Cancelled
                if fn(item):
                    outputs.append(item)
            return outputs
        if not skipping:  # each
            for item in items:
                if stop[0]:
                    raise Cancelled
                fn(item)
            return items
        outputs = []
        for item in items:
            if stop[0]:
                raise Cancelled
            if fn(item) is not SKIPPED:
                outputs.append(item)
        return outputs
    except Cancelled:
        raise
    except BaseException as exc:
        label(exc, stage, item, has_item=item is not _NO_ITEM)
        raise
    finally:
        # The traceback of an error a policy handled (kept in ``run.errors``) keeps this frame
        # once it has returned: its frames link to their callers. So it must not keep the batch,
        # its outputs or its last item, which ``buffer_bound()`` no longer counts.
        del items
        item = outputs = None


def _batch_size(call_seconds: float, limit: int) -> int:
    """How many items to take so the calls take about ``_BATCH_SECONDS``, between 1 and ``limit``."""
    if call_seconds <= 0:
        return limit
    size = int(_BATCH_SECONDS / call_seconds)
    return 1 if size < 1 else limit if size > limit else size


class _Counters:
    """One worker's running counts; only that worker writes them, readers sum over workers."""

    __slots__ = (
        "abandoned",
        "busy_seconds",
        "cpu_seconds",
        "errors",
        "items_in",
        "items_out",
        "throttled_seconds",
    )

    def __init__(self, cpu_seconds: float | None = None) -> None:
        self.items_in = 0
        self.items_out = 0
        self.busy_seconds = 0.0  # in the function, not counting waits for the rate limit
        self.throttled_seconds = 0.0  # waiting for the stage's rate limit (``rate=``)
        self.errors = 0
        self.cpu_seconds = cpu_seconds  # the worker thread's CPU time, set as it exits
        self.abandoned = 0  # calls given up on after their timeout (see ``_timeout.py``)


class Runtime:
    """The stage protocol: what every kind of stage is in a run, and what a run asks of it.

    The thread pool (:class:`Stage`), the one-thread operators, the executor and coroutine stages
    all derive from it. A runtime reads ``inp``, writes ``out``, belongs to a segment ``scope``
    (cancelling it stops the stage), starts its threads through its ``crew`` (which sends the end
    on when the last one exits), keeps ``counters`` that statistics sum, and declares with
    :meth:`held` how many items it may hold, its part of ``Pipeline.buffer_bound()``.

    Args:
        spec: what to run.
        inp: the channel the stage reads.
        out: the channel the outputs go to.
        run: the run's shared state (error, thread accounting).
        scope: the stage's segment scope.
        on_last: called by the stage's last thread out (see :class:`~threadpipe._threads.Crew`).
    """

    reorder: Reorder | None = None
    # Whether the stage's threads come from the process's parked threads (see ``_threads``).
    pooled = False

    def __init__(
        self,
        spec: StageSpec,
        inp: Channel,
        out: Channel,
        run: RunState,
        scope: Scope,
        on_last: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.inp = inp
        self.out = out
        self.run = run
        self.scope = scope
        self.counters: list[_Counters] = [_Counters()]
        self.crew = Crew(spec.name, run, scope, out, on_last, pooled=self.pooled)
        self.call_seconds: float | None = None
        # The most calls in flight at once, for stages whose calls do not run one per thread
        # (coroutines, executor calls); None where each thread makes one call at a time.
        self.peak: int | None = None

    @classmethod
    def held(cls, spec: StageSpec, next_capacity: int) -> int:
        """The most input items the stage holds outside its input buffer (default: one batch
        taken), and the outputs it made from them that keep their size (a map's results)."""
        return spec.capacity

    @classmethod
    def held_outputs(cls, spec: StageSpec, next_capacity: int) -> int:
        """The most new outputs it holds before handing them on (a ``flat_map``'s elements)."""
        return 0

    @classmethod
    def weight(cls, spec: StageSpec, weight: int) -> int:
        """How many source items one output stands for, when one input stands for ``weight``.

        ``buffer_bound()`` counts items as the source made them: a batch of ``n`` counts ``n``,
        a ``flat_map``'s outputs count one each, anything else keeps its input's weight.
        """
        return 1 if spec.kind is FLAT_MAP else weight

    @property
    def spawned(self) -> int:
        """Threads started so far."""
        return self.crew.spawned

    @property
    def concurrency(self) -> int:
        """The most calls in flight at once so far."""
        return self.crew.most if self.peak is None else self.peak

    def start(self) -> None:
        """Start the stage's threads."""
        raise NotImplementedError


class Stage(Runtime):
    """One stage of a run: its workers, their counters, and the channels around them.

    Its workers run on pooled threads: a thread may have served another stage or run before.

    Args:
        spec: what to run.
        inp: the channel the workers read.
        out: the channel the outputs go to.
        run: the run's shared state (error, thread accounting).
        scope: the stage's segment scope: cancelling it stops the workers.
    """

    pooled = True

    def __init__(
        self, spec: StageSpec, inp: Channel, out: Channel, run: RunState, scope: Scope
    ) -> None:
        super().__init__(spec, inp, out, run, scope, self._unhook)
        if spec.reorders:
            self.reorder = Reorder(inp, out, self.window(spec))
            scope.add(self.reorder)
        rate = spec.options.rate
        # One limiter for the stage, shared by its workers: the rate holds however many there are.
        self.limiter = RateLimiter(rate, scope.event) if rate is not None else None
        # One entry per worker, each written by its worker only; ``_lock`` guards the list.
        self.counters = []
        self._lock = threading.Lock()
        # ``call_seconds``: the running estimate of seconds per call, shared by the workers (a
        # float store is atomic; a lost update between two workers only delays the estimate by
        # one batch). None until the first batch is measured.
        if spec.workers > 1:
            # Set before any thread of the run starts, so no put can miss it.
            inp.on_starved = self._grow
        # Whether the stage before may carry batches in (``carry``); hooked by ``start``.
        self._carried_into = (
            spec.workers > 1
            and spec.kind in _CARRIED
            and not spec.ordered
            and spec.timeout is None
            and spec.options.plain
            and not spec.relief
            and run.trace is None
        )

    @staticmethod
    def window(spec: StageSpec) -> int:
        """The most input items the workers hold at once.

        A worker takes at most its share of the items waiting, rounded up, with the buffer shared
        among the workers started so far; the ``i``-th worker (from 1) starts when ``i - 1``
        already run, so it never holds more than ``ceil(capacity / i)``.
        """
        return sum(-(-spec.capacity // i) for i in range(1, spec.workers + 1))

    @classmethod
    def held(cls, spec: StageSpec, next_capacity: int) -> int:
        """The most items the stage holds outside its input buffer: its part of ``buffer_bound()``.

        Its workers' items (``window``); for an ordered stage with several workers, as many again
        in finished items waiting in the reorder buffer for their turn; for a ``flat_map``, the
        outputs are counted by ``held_outputs``.
        """
        held = cls.window(spec)
        if spec.kind is FLAT_MAP:
            return held
        return 2 * held if spec.reorders else held

    @classmethod
    def held_outputs(cls, spec: StageSpec, next_capacity: int) -> int:
        """A ``flat_map`` worker holds at most one output buffer's worth before handing it on."""
        if spec.kind is not FLAT_MAP:
            return 0
        # Ordered, the reorder buffer parks up to one buffer's worth more (``complete_within``).
        return spec.workers * next_capacity + (next_capacity if spec.reorders else 0)

    def start(self) -> None:
        """Start the first worker; the input channel asks for more when items find nobody idle.

        Only then may the stage before carry batches in: worker 0, which never leaves, must hold
        its place before any place is borrowed, or carried batches could take every place and
        leave the stage without a thread to see the end of input.
        """
        self._grow()
        if self._carried_into and self.crew.spawned:
            self.inp.carry = self.carry

    def _grow(self) -> None:
        """Start one more worker if the stage has room for one and input is not over.

        One at a time, on purpose: starting threads in bursts (two per call, growing as a tree)
        was measured slower at 256 workers, because start-ups compete with the running workers
        for the interpreter lock and stretch every call.
        """
        crew = self.crew
        if crew.busy >= self.spec.workers or crew.ended:  # unlocked fast path; rechecked below
            return
        estimate = self.call_seconds
        if estimate is not None and estimate < _GROW_SECONDS and crew.alive:
            return
        crew.start(self._work, limit=self.spec.workers)

    def _unhook(self) -> None:
        """The last worker out: no thread of the stage before carries a batch in any more."""
        self.inp.carry = None

    def carry(
        self, items: list[Any], tabs: dict[Any, _Counters], release: Callable[[], None] | None
    ) -> int:
        """Run the stage's calls on ``items`` in the calling thread, and hand the outputs on.

        The caller is a worker of the stage before, holding the outputs it would otherwise put into
        this stage's input buffer, for one of this stage's workers to wake up and take. It runs
        them itself instead, as one of this stage's workers for the one batch: only while the
        stage has a worker's place free (it counts against ``workers``, see ``Crew.borrow``) and
        nothing waits in the input buffer (that would go first). The outputs go on the same way:
        carried into the next stage, or put into the output buffer. A thread that carries the item
        on saves a hand-off: a wake-up of another thread, and that thread's wait for the
        interpreter lock.

        Memory: the carried items count in the place they take here, and are counted where they
        came from until ``release`` is called: it is called (and the caller's place there given
        up, for another thread to take) only when the batch is no bigger than what a place here
        holds at the least, a share of the buffer among all ``workers``
        (``ceil(capacity / workers)``); so what the stages hold stays within what ``held``
        declares for each. Otherwise the caller keeps its place where it came from, as this stage
        keeps the place until the outputs are handed on, like its own workers.

        Args:
            items: the batch, as the caller would have put it.
            tabs: the caller's counters for the stages it carries into, one per stage, written by
                the caller only.
            release: gives up the caller's place where the items come from (see above); None
                to keep it.

        Returns:
            0 when it did nothing (the caller puts the items into the input buffer), else 1, or 2
            if it called ``release``.

        Raises:
            Cancelled: the run was cancelled, or a call raised (the run has failed with it).
        """
        spec = self.spec
        crew = self.crew
        if crew.busy >= spec.workers:  # unlocked fast path; rechecked in borrow
            return 0
        if not crew.borrow(spec.workers):
            return 0
        taken = len(items)
        # Whether the place here was given up early, when the outputs were carried on (a list:
        # set by the callback the next stage calls).
        released: list[bool] = []
        try:
            inp = self.inp
            if not inp.pass_by(taken):
                return 0
            carried = 1
            if release is not None and taken <= -(-inp.maxsize // spec.workers):
                release()
                carried = 2
            counters = tabs.get(self)
            if counters is None:
                # Its CPU time is the carried calls', taken out of the carrying worker's.
                counters = tabs[self] = _Counters(cpu_seconds=0.0)
                with self._lock:
                    self.counters.append(counters)
            cpu = thread_time()
            started = perf_counter()
            try:
                outputs = _call_all(spec.kind, spec.fn, items, self.scope.cancelled, False, spec.name)
            except Cancelled:
                raise
            except BaseException as exc:
                counters.errors += 1
                self.run.fail(exc, self.scope, spec.name, None, has_item=False)  # labelled
                raise Cancelled from None
            elapsed = perf_counter() - started
            counters.cpu_seconds = (counters.cpu_seconds or 0.0) + thread_time() - cpu
            counters.items_in += taken
            counters.items_out += len(outputs)
            counters.busy_seconds += elapsed
            estimate = self.call_seconds
            per_call = elapsed / taken
            self.call_seconds = (
                per_call if estimate is None else estimate + _EWMA * (per_call - estimate)
            )
            if outputs is not items:
                items.clear()  # the caller's list: the inputs are not held while outputs go on
            del items
            if outputs:
                out = self.out
                carry = out.carry

                def give_back() -> None:
                    released.append(True)
                    crew.give_back()

                if carry is None or not carry(outputs, tabs, give_back):
                    out.put_many(outputs)
            return carried
        finally:
            if not released:
                crew.give_back()

    def _work(self, index: int) -> bool:
        """Worker ``index``'s life: returns whether it saw the end of input."""
        # The thread may have run other stages before: its CPU time counts from here.
        cpu_started = thread_time()
        counters = _Counters()
        with self._lock:
            self.counters.append(counters)
        spec = self.spec
        fn = spec.fn
        kind = spec.kind
        inp = self.inp
        get_many = inp.get_many
        options = spec.options
        skipping = options.on_error == "skip"
        release: Callable[[BaseException | None], None] | None = None
        trace = self.run.trace
        scope = self.scope
        stop = scope.cancelled
        timed: Timed | None = None
        if spec.timeout is not None:
            # Each call goes to a thread the worker can stop waiting for; inside the call core,
            # so that an overrun is retried and handled like any failure.
            name = f"{spec.name}-{index}"
            fn = timed = Timed(fn, spec.timeout, name, counters, kind is FLAT_MAP)
        if kind is FLAT_MAP or not options.plain:
            # Built once per worker, with its own resource: the plain path stays ``fn(item)``.
            resource = None
            if options.resource is not None:
                try:
                    resource, release = open_resource(options)
                except BaseException as exc:
                    exc.add_note(f"threadpipe: raised while making the resource of stage {spec.name!r}")
                    counters.errors += 1
                    self.run.fail(exc, scope, spec.name, None, has_item=False)
                    return False
            wrapper = wrap_iter if kind is FLAT_MAP else wrap
            fn = wrapper(
                fn,
                options,
                stage=spec.name,
                run=self.run,
                scope=scope,
                limiter=self.limiter,
                resource=resource,
                counters=counters,
                fallback=_FALLBACK.get(kind),
            )
        if trace is not None:
            # Chosen once per worker: untraced, the loop below runs the user's function as is.
            fn, get_many = trace.hook(spec.name, index, fn, get_many, kind is FLAT_MAP)
        out = self.out
        reorder = self.reorder
        crew = self.crew
        limit = spec.capacity
        estimate = self.call_seconds
        size = 1 if estimate is None else _batch_size(estimate, limit)
        failure: BaseException | None = None
        # Outputs may be carried into the next stage (``carry``) unless a reorder buffer or a
        # flat_map's chunking hands them on; ``tabs`` are this worker's counters there.
        carries = reorder is None and kind is not FLAT_MAP
        tabs: dict[Any, _Counters] = {}
        try:
            while True:
                # Shared among the workers running now: a lone worker takes whole batches.
                got = get_many(size, None, crew.alive)
                assert got is not None  # no timeout given
                items, number = got
                del got  # the batch is held by ``items`` only: let go with it (see the carry below)
                taken = len(items)
                if not taken:
                    return True
                started = perf_counter()
                throttled = counters.throttled_seconds
                outputs: list[Any]
                at_head = True
                if kind is FLAT_MAP:
                    outputs, at_head = self._flat_map(fn, items, number, counters)
                else:
                    outputs = _call_all(kind, fn, items, stop, skipping, spec.name)
                elapsed = perf_counter() - started
                counters.items_in += taken
                counters.items_out += len(outputs)
                # Waiting for the rate limit is not work: a rate-limited stage is not "busy".
                counters.busy_seconds += elapsed - (counters.throttled_seconds - throttled)
                per_call = elapsed / taken
                estimate = self.call_seconds
                # Measured cheap enough to leave only on more than one call's word: one call
                # alone may be fast for reasons of its own (the last to reach a barrier the
                # others wait at), and a worker that left then could leave them waiting.
                settled = estimate is not None and taken > 1
                if estimate is not None:
                    per_call = estimate + _EWMA * (per_call - estimate)
                self.call_seconds = per_call
                size = _batch_size(per_call, limit)
                if reorder is not None:
                    if kind is FLAT_MAP and not at_head:
                        # Parks what fits in one output buffer's worth, else waits its turn.
                        reorder.complete_within(number, taken, outputs, out.maxsize)
                    else:
                        reorder.complete(number, taken, outputs)
                elif outputs:
                    carry = out.carry if carries else None
                    if (
                        carry is not None
                        and not crew.awaited
                        and crew.full(spec.workers)
                        and inp.qsize()
                    ):
                        # Its place here is wanted at once (the stage is at its limit and items
                        # wait), and none of the stage's threads is back from a carry waiting
                        # for one: leaving it would idle it until a new thread starts, on the
                        # stage that is the bottleneck. Hand the outputs on. (With a thread
                        # waiting, the place goes to that one at once, and this one carries on:
                        # the wake-up the stage needs either way, and no worker of the next
                        # stage to wake or start.)
                        carry = None
                    if carry is None:
                        out.put_many(outputs)
                    else:
                        # The inputs are let go first: when the outputs are carried, what this
                        # thread holds counts where they go (and its place here may be given up).
                        items = outputs
                        carried = carry(outputs, tabs, crew.go_away if index else None)
                        if not carried:
                            out.put_many(outputs)
                        elif carried == 2:
                            del items, outputs  # nothing held while it waits for its place back
                            crew.come_back(spec.workers)
                            items = outputs = []
                del items, outputs  # hand the references on; a slow consumer keeps no extra copy
                if index and settled and per_call < _GROW_SECONDS:
                    # Calls this cheap gain nothing from a second thread, which only contends for
                    # the interpreter lock and splits the batches: leave them to worker 0 (which
                    # never leaves, so someone is there to see the end). The stage grows again
                    # if its calls slow down.
                    return False
        except Cancelled:
            return False
        except BaseException as exc:
            counters.errors += 1
            failure = exc
            # A call's exception names its item already (``_call_all``, ``_flat_map``).
            self.run.fail(exc, scope, spec.name, None, has_item=False)
            return False
        finally:
            # Once per thread, not per batch: tells CPU-bound stages from waiting ones after a run.
            elsewhere = sum(tab.cpu_seconds or 0.0 for tab in tabs.values())
            counters.cpu_seconds = thread_time() - cpu_started - elsewhere
            if timed is not None:
                timed.close()
            if release is not None:
                try:
                    release(failure)  # the worker's resource, also on failure and cancel
                except BaseException as exc:
                    exc.add_note(f"threadpipe: raised while closing the resource of stage {spec.name!r}")
                    self.run.fail(exc, scope, spec.name, None, has_item=False)
            del failure

    def _flat_map(
        self, fn: Callable[[Any], Iterator[Any]], items: list[Any], number: int, counters: _Counters
    ) -> tuple[list[Any], bool]:
        """Run a flat_map batch, output by output; return the outputs not handed on yet, and
        whether the batch is at the head of the line (it handed outputs on directly).

        The stop flag is read between any two outputs, and at most one output buffer's worth is
        held: when that much is made, an unordered stage hands it on at once, and an ordered one
        waits for its turn (every earlier item's outputs out) and then hands it on. Once at the
        head of the line it stays there until its batch completes, so the order holds.
        """
        stop = self.scope.cancelled
        out = self.out
        reorder = self.reorder
        at_head = reorder is None
        chunk = max(1, out.maxsize)
        outputs: list[Any] = []
        for item in items:
            if stop[0]:
                raise Cancelled
            try:
                results = fn(item)
            except Cancelled:
                raise
            except BaseException as exc:
                label(exc, self.spec.name, item)  # this loop's item, which _work does not see
                raise
            try:
                for result in results:
                    outputs.append(result)
                    if len(outputs) >= chunk:
                        if not at_head:
                            assert reorder is not None
                            reorder.wait_turn(number)
                            at_head = True
                        counters.items_out += len(outputs)
                        out.put_many(outputs)
                        outputs = []
                    if stop[0]:
                        raise Cancelled
            finally:
                close = getattr(results, "close", None)
                if close is not None:
                    close()  # the user's generator's finally blocks run now, in this thread
        return outputs, at_head
