"""Stream-shaping stages: one thread each, with the whole input stream in view.

``map`` and its siblings see one item at a time on many threads. The operators here need to see the
stream in order, on one thread: a user's generator function over the stage's inputs (``pipe``, and
through it ``enumerate`` and ``skip``), ``batch`` (which also needs to wait with a deadline),
``take`` and ``take_while`` (which end the run early and stop everything upstream of them),
``skip_while``, and ``group_by`` (which keeps groups open across the stream, with deadlines).

They keep every promise of the thread stages: the end of input cascades, a failure reaches the caller
as itself with a note (naming the item when a user's function raised for one), a cancel wakes them,
and statistics read their counters.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from time import monotonic, perf_counter, thread_time
from typing import TYPE_CHECKING, Any, Final

from ._channel import Channel
from ._scope import Cancelled, Scope
from ._stage import BATCH, GROUP_BY, PIPE, SKIP_WHILE, TAKE, TAKE_WHILE, Runtime

if TYPE_CHECKING:
    from ._run import RunState
    from ._stage import StageSpec

__all__ = [
    "BATCH",
    "GROUP_BY",
    "OPERATOR_KINDS",
    "PIPE",
    "SKIP_WHILE",
    "TAKE",
    "TAKE_WHILE",
    "BatchStage",
    "GroupStage",
    "PipeStage",
    "SkipWhileStage",
    "TakeStage",
    "TakeWhileStage",
]

OPERATOR_KINDS: Final = frozenset({PIPE, BATCH, TAKE, TAKE_WHILE, SKIP_WHILE, GROUP_BY})

_NO_ITEM: Final = object()


class _OneThreadStage(Runtime):
    """The common frame of the operators: one thread, started at once, sending the end on.

    Subclasses implement :meth:`_body`, which returns True if the input ended (the end is then
    sent on) and False if it stopped otherwise. The segments before the stage's own are what it
    can cut off. While a user's function runs for an item, ``_item`` holds that item, so that a
    failure's note names it.
    """

    _item: Any = _NO_ITEM

    def start(self) -> None:
        """Start the stage's thread."""
        self.crew.start(self._work)

    def _work(self, index: int) -> bool:
        try:
            return self._body()
        except Cancelled:
            return False
        except BaseException as exc:
            item, self._item = self._item, _NO_ITEM
            self.counters[0].errors += 1
            self.run.fail(exc, self.scope, self.spec.name, item, has_item=item is not _NO_ITEM)
            del item
            return False
        finally:
            self.counters[0].cpu_seconds = thread_time()

    def _body(self) -> bool:
        raise NotImplementedError

    def _cut_upstream(self) -> None:
        """Cancel everything upstream of this stage: it has all the input it will read.

        The stages before it start no new call, their coroutines and executor calls are
        cancelled and the source is closed; their late failures are ignored. The stages after
        it get the end from this one, and finish normally.
        """
        self.run.cut(self.run.segments.index(self.scope) - 1)

    def _scan(self, items: list[Any]) -> int:
        """The index of the first of ``items`` for which the stage's predicate is false, or
        ``len(items)`` if it holds for all.

        The predicate runs in this thread, item by item, from the first; the stop flag is read
        before every call, so after a cancel it is never called again. Its time counts as busy.
        """
        pred: Callable[[Any], object] = self.spec.fn
        stop = self.scope.cancelled
        started = perf_counter()
        index = len(items)
        for i, item in enumerate(items):
            if stop[0]:
                raise Cancelled
            self._item = item
            if not pred(item):
                index = i
                break
        self._item = _NO_ITEM
        self.counters[0].busy_seconds += perf_counter() - started
        return index


class _Inputs(Iterator[Any]):
    """The stage's input channel as a plain iterator, for a user's generator function.

    Before it waits for more input it hands on the outputs made so far, so a generator that yields
    as it reads never holds an output back while waiting.
    """

    def __init__(self, stage: PipeStage) -> None:
        self._stage: PipeStage | None = stage
        self._buffer: deque[Any] = deque()
        self.ended = False

    def release(self) -> None:
        """Let go of the stage and the inputs left: the stage is over.

        A failed generator's frame holds this iterator and stays in the failure's traceback,
        which the run's state holds: without this, a cycle that only the garbage collector frees.
        """
        self._stage = None
        self._buffer.clear()

    def __next__(self) -> Any:
        if self._buffer:
            return self._buffer.popleft()
        stage = self._stage
        if stage is None:
            raise Cancelled  # read after its stage ended: only a generator's cleanup does that
        if self.ended:
            raise StopIteration
        if stage.scope.cancelled[0]:
            raise Cancelled
        stage.flush()
        got = stage.inp.get_many(stage.inp.maxsize)
        assert got is not None  # no timeout given
        items = got[0]
        if not items:
            self.ended = True
            raise StopIteration
        stage.counters[0].items_in += len(items)
        self._buffer.extend(items)
        return self._buffer.popleft()


class PipeStage(_OneThreadStage):
    """Runs ``fn(inputs)``, a generator function over the stage's inputs, and passes on what it yields.

    The function sees the inputs in order, on one thread, and may keep any state it likes. When it
    returns, the stage ends (even if inputs are left: they are not read); when its inputs end, it
    should return. If the run stops, the generator is closed (its ``finally`` blocks run).
    """

    def __init__(
        self, spec: StageSpec, inp: Channel, out: Channel, run: RunState, scope: Scope
    ) -> None:
        super().__init__(spec, inp, out, run, scope)
        self._pending: list[Any] = []

    @classmethod
    def held(cls, spec: StageSpec, next_capacity: int) -> int:
        """One batch of inputs taken (what the user's generator keeps in its own state, a
        window, is its own to bound)."""
        return spec.capacity

    @classmethod
    def held_outputs(cls, spec: StageSpec, next_capacity: int) -> int:
        """Up to one output buffer's worth made and not handed on yet."""
        return next_capacity

    def flush(self) -> None:
        """Hand on the outputs made so far (blocks while the next buffer is full)."""
        pending = self._pending
        if pending:
            self._pending = []
            self.counters[0].items_out += len(pending)
            self.out.put_many(pending)

    def _body(self) -> bool:
        inputs = _Inputs(self)
        fn: Callable[[Iterator[Any]], Iterable[Any]] = self.spec.fn
        result = iter(fn(inputs))
        chunk = self.out.maxsize
        started = perf_counter()
        try:
            for output in result:
                self._pending.append(output)
                if len(self._pending) >= chunk:
                    self.flush()
                if self.scope.cancelled[0]:
                    raise Cancelled
            if not inputs.ended:
                # The function returned before its inputs ended: the stage is over, and what it
                # left unread is not needed. Cut upstream off first, as take() does, so that
                # nothing upstream can fail the run once the caller has the last outputs.
                self._cut_upstream()
            self.flush()
        finally:
            self.counters[0].busy_seconds = perf_counter() - started
            close = getattr(result, "close", None)
            if close is not None:
                close()  # runs the generator's finally blocks if it stopped early
            inputs.release()  # the generator's frame may outlive the stage (in a traceback)
        return True


class TakeStage(_OneThreadStage):
    """Passes on a prefix of its inputs, then ends the run's output and stops everything upstream.

    ``take(n)``: the first ``n`` items; :class:`TakeWhileStage` (``take_while``) decides the prefix
    otherwise. Once the prefix is complete, upstream stages stop taking items and the source stops
    being pulled (a generator source is closed); calls already running finish, and their outputs
    are dropped.
    """

    def __init__(
        self, spec: StageSpec, inp: Channel, out: Channel, run: RunState, scope: Scope
    ) -> None:
        super().__init__(spec, inp, out, run, scope)
        self._left: int = spec.arg if spec.kind is TAKE else 0

    def _want(self) -> int:
        """The most items to read next; 0 once the prefix is complete (``take(0)`` at once)."""
        return min(self._left, self.inp.maxsize)

    def _prefix(self, items: list[Any]) -> int:
        """How many of ``items``, read in order, belong to the prefix; fewer than all ends it."""
        self._left -= len(items)  # never more than ``_want()`` were read
        return len(items)

    def _body(self) -> bool:
        counters = self.counters[0]
        inp = self.inp
        want = self._want()
        while want > 0:
            got = inp.get_many(want)
            assert got is not None
            items = got[0]
            if not items:
                return True  # the input ended inside the prefix: an ordinary end
            counters.items_in += len(items)
            keep = self._prefix(items)
            want = self._want()
            complete = keep < len(items) or want <= 0
            del items[keep:]
            counters.items_out += len(items)
            if complete:
                break
            self.out.put_many(items)
        else:
            items = []  # complete before reading anything
        # Cut upstream off before the last items go out: once the caller has them, nothing
        # upstream can fail the run, and no call upstream can start.
        self._cut_upstream()
        if items:
            self.out.put_many(items)
        return True


class TakeWhileStage(TakeStage):
    """``take_while(pred)``: the items before the first for which ``pred`` is false.

    That first false item is dropped, and so is everything after it: the run ends there, as with
    ``take``.
    """

    def _want(self) -> int:
        return self.inp.maxsize

    def _prefix(self, items: list[Any]) -> int:
        return self._scan(items)


class SkipWhileStage(_OneThreadStage):
    """``skip_while(pred)``: drops items while ``pred`` is true, then passes on everything.

    ``pred`` is called on the items up to and including the first for which it is false, and
    never again after that.
    """

    def _body(self) -> bool:
        inp = self.inp
        counters = self.counters[0]
        skipping = True
        while True:
            got = inp.get_many(inp.maxsize)
            assert got is not None
            items = got[0]
            if not items:
                return True
            counters.items_in += len(items)
            if skipping:
                first = self._scan(items)
                if first == len(items):
                    continue
                skipping = False
                del items[:first]
            counters.items_out += len(items)
            self.out.put_many(items)
            del items


class BatchStage(_OneThreadStage):
    """Groups items into lists of ``size``; the last, partial batch is emitted at the end.

    With a timeout, a partial batch is emitted once ``timeout`` seconds have passed since its first
    item arrived, so a slow trickle of items still moves on.
    """

    @classmethod
    def held(cls, spec: StageSpec, next_capacity: int) -> int:
        """The batch being filled: never more than its size (nor than a buffer's worth taken)."""
        size: int = spec.arg[0]
        return max(spec.capacity, size)

    @classmethod
    def weight(cls, spec: StageSpec, weight: int) -> int:
        """A batch stands for as many items as it holds."""
        size: int = spec.arg[0]
        return weight * size

    def _body(self) -> bool:
        size, timeout = self.spec.arg
        inp = self.inp
        out = self.out
        counters = self.counters[0]
        current: list[Any] = []
        deadline: float | None = None
        while True:
            wait = None if deadline is None else max(0.0, deadline - monotonic())
            got = inp.get_many(size - len(current), wait)
            if got is None:  # the deadline passed with the batch still partial
                counters.items_out += 1
                out.put_many([current])
                current, deadline = [], None
                continue
            items = got[0]
            if not items:
                if current:
                    counters.items_out += 1
                    out.put_many([current])
                return True
            counters.items_in += len(items)
            if not current and timeout is not None:
                deadline = monotonic() + timeout
            current.extend(items)
            if len(current) >= size:
                counters.items_out += 1
                out.put_many([current])
                current, deadline = [], None


class GroupStage(_OneThreadStage):
    """``group_by(key, n, timeout, max_open)``: ``(k, [items])`` tuples, one list per key.

    A group opens with the first item of its key and goes out, its items in arrival order, when it
    holds ``n`` items; when its first item has waited ``timeout`` seconds; when a new group would
    make more than ``max_open`` open (the oldest open group goes out); at the end of input (every
    open group, oldest first). The next item of that key opens a new group.
    """

    @classmethod
    def held(cls, spec: StageSpec, next_capacity: int) -> int:
        """A buffer's worth of inputs taken, plus ``n * max_open`` items in groups.

        Between two buffers' worth, at most ``max_open`` groups are open, each with fewer than
        ``n`` items (a group that fills goes out at once): so the groups open or going out while
        the stage works through one buffer's worth (and waits for room to hand them on) hold no
        more than those items plus the ones it took.
        """
        n: int = spec.arg[0]
        max_open: int = spec.arg[2]
        return spec.capacity + n * max_open

    @classmethod
    def weight(cls, spec: StageSpec, weight: int) -> int:
        """A group stands for as many items as it may hold: ``n``."""
        n: int = spec.arg[0]
        return weight * n

    def _body(self) -> bool:
        key: Callable[[Any], Hashable] = self.spec.fn
        n, timeout, max_open = self.spec.arg
        inp = self.inp
        counters = self.counters[0]
        stop = self.scope.cancelled
        # Open groups, oldest first: key -> (deadline, items). Groups open in arrival order, so the
        # oldest also has the earliest deadline. An OrderedDict, not a dict: taking its first entry
        # stays O(1) however many groups went out from the front.
        groups: OrderedDict[Any, tuple[float, list[Any]]] = OrderedDict()
        while True:
            wait: float | None = None
            if timeout is not None and groups:
                wait = next(iter(groups.values()))[0] - monotonic()
                if wait <= 0:
                    now = monotonic()
                    expired = []
                    while groups and next(iter(groups.values()))[0] <= now:
                        k, (_, members) = groups.popitem(last=False)
                        expired.append((k, members))
                    self._emit(expired)
                    continue
            got = inp.get_many(inp.maxsize, wait)
            if got is None:
                continue  # the oldest group's deadline passed: the next round sends it
            items = got[0]
            if not items:
                self._emit([(k, members) for k, (_, members) in groups.items()])
                groups.clear()
                return True
            counters.items_in += len(items)
            deadline = 0.0 if timeout is None else monotonic() + timeout
            ready: list[tuple[Any, list[Any]]] = []
            started = perf_counter()
            for item in items:
                if stop[0]:
                    raise Cancelled
                self._item = item
                k = key(item)
                entry = groups.get(k)  # an unhashable key raises here, noted with its item
                self._item = _NO_ITEM
                if entry is None:
                    members = [item]
                    if n == 1:
                        ready.append((k, members))
                        continue
                    groups[k] = (deadline, members)
                    if len(groups) > max_open:
                        oldest, (_, members) = groups.popitem(last=False)
                        ready.append((oldest, members))
                    continue
                members = entry[1]
                members.append(item)
                if len(members) >= n:
                    del groups[k]
                    ready.append((k, members))
            del items, item, members
            counters.busy_seconds += perf_counter() - started
            self._emit(ready)
            del ready

    def _emit(self, ready: list[tuple[Any, list[Any]]]) -> None:
        """Hand the groups that went out on, in order (blocks while the next buffer is full)."""
        if ready:
            self.counters[0].items_out += len(ready)
            self.out.put_many(ready)
