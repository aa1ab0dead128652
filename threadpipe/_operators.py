"""Stream-shaping stages: one thread each, with the whole input stream in view.

``map`` and its siblings see one item at a time on many threads. The operators here need to see the
stream in order, on one thread: a user's generator function over the stage's inputs (``pipe``, and
through it ``enumerate`` and ``skip``), ``batch`` (which also needs to wait with a deadline), and
``take`` (which ends the run early and stops everything upstream of it).

They keep every promise of the thread stages: the end of input cascades, a failure reaches the caller
as itself with a note, a cancel wakes them, and statistics read their counters.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from time import monotonic, perf_counter, thread_time
from typing import TYPE_CHECKING, Any, Final

from ._channel import Channel
from ._scope import Cancelled, Scope
from ._stage import BATCH, PIPE, TAKE, Runtime

if TYPE_CHECKING:
    from ._run import RunState
    from ._stage import StageSpec

__all__ = ["BATCH", "OPERATOR_KINDS", "PIPE", "TAKE", "BatchStage", "PipeStage", "TakeStage"]

OPERATOR_KINDS: Final = frozenset({PIPE, BATCH, TAKE})


class _OneThreadStage(Runtime):
    """The common frame of the operators: one thread, started at once, sending the end on.

    Subclasses implement :meth:`_body`, which returns True if the input ended (the end is then
    sent on) and False if it stopped otherwise. The segments before the stage's own are what it
    can cut off.
    """

    def start(self) -> None:
        """Start the stage's thread."""
        self.crew.start(self._work)

    def _work(self, index: int) -> bool:
        try:
            return self._body()
        except Cancelled:
            return False
        except BaseException as exc:
            self.counters[0].errors += 1
            self.run.fail(exc, self.scope, self.spec.name, None, has_item=False)
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
    """Passes on the first ``n`` items, then ends the run's output and stops everything upstream.

    Upstream stages stop taking items and the source stops being pulled (a generator source is
    closed); calls already running finish, and their outputs are dropped.
    """

    def _body(self) -> bool:
        left: int = self.spec.arg
        counters = self.counters[0]
        if left <= 0:
            self._cut_upstream()
            return True
        while True:
            got = self.inp.get_many(min(left, self.inp.maxsize))
            assert got is not None
            items = got[0]
            if not items:
                return True  # fewer than n items: an ordinary end
            counters.items_in += len(items)
            counters.items_out += len(items)
            left -= len(items)
            if left <= 0:
                # Cut upstream off before the last items go out: once the caller has them,
                # nothing upstream can fail the run, and no call upstream can start.
                self._cut_upstream()
                self.out.put_many(items)
                return True
            self.out.put_many(items)


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
