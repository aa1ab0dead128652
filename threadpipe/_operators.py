"""Stream-shaping stages: one thread each, with the whole input stream in view.

``map`` and its siblings see one item at a time on many threads. The operators here need to see the
stream in order, on one thread: a user's generator function over the stage's inputs (``pipe``, and
through it ``enumerate`` and ``skip``), ``batch`` (which also needs to wait with a deadline), and
``take`` (which ends the run early and stops everything upstream of it).

They keep every promise of the thread stages: the end of input cascades, a failure reaches the caller
as itself with a note, a cancel wakes them, and statistics read their counters.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from time import monotonic, perf_counter, thread_time
from typing import TYPE_CHECKING, Any, Final

from ._channel import Channel, Closed
from ._stage import BATCH, PIPE, TAKE, _Counters

if TYPE_CHECKING:
    from ._run import RunState
    from ._stage import StageSpec

__all__ = ["BATCH", "OPERATOR_KINDS", "PIPE", "TAKE", "BatchStage", "PipeStage", "TakeStage"]

OPERATOR_KINDS: Final = frozenset({PIPE, BATCH, TAKE})


class _Halt(BaseException):
    """Raised into a user's generator when its run stops.

    A BaseException, so that a generator's ``except Exception`` does not swallow it; the stage
    catches it and exits quietly. Never reaches a caller.
    """


class _OneThreadStage:
    """The common frame of the operators: one thread, started at once, sending the end on.

    Subclasses implement :meth:`_body`, which returns True if the input ended (the end is then
    sent on) and False if it stopped otherwise.

    Args:
        spec: what to run (``workers`` is 1).
        inp: the channel the stage reads.
        out: the channel its outputs go to.
        run: the run's shared state.
    """

    reorder = None  # the interface of thread stages: never reorders, one thread keeps the order

    def __init__(self, spec: StageSpec, inp: Channel, out: Channel, run: RunState) -> None:
        self.spec = spec
        self.inp = inp
        self.out = out
        self.run = run
        self.counters = [_Counters()]
        self.spawned = 0
        self.call_seconds: float | None = None

    def start(self) -> None:
        """Start the stage's thread."""
        self.spawned = 1
        self.run.thread_started()
        thread = threading.Thread(
            target=self._work, name=f"threadpipe-{self.spec.name}-0", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            self.spawned = 0
            self.run.thread_exited()
            raise

    def _work(self) -> None:
        ended = False
        try:
            ended = self._body()
        except (Closed, _Halt):
            pass
        except BaseException as exc:
            self.counters[0].errors += 1
            self.run.fail(exc, self.spec.name, None, has_item=False)
        finally:
            self.counters[0].cpu_seconds = thread_time()
            if ended and not self.run.stop[0]:
                self.out.put_end()
            self.run.thread_exited()

    def _body(self) -> bool:
        raise NotImplementedError


class _Inputs(Iterator[Any]):
    """The stage's input channel as a plain iterator, for a user's generator function.

    Before it waits for more input it hands on the outputs made so far, so a generator that yields
    as it reads never holds an output back while waiting.
    """

    def __init__(self, stage: PipeStage) -> None:
        self._stage = stage
        self._buffer: deque[Any] = deque()
        self.ended = False

    def __next__(self) -> Any:
        if self._buffer:
            return self._buffer.popleft()
        stage = self._stage
        if self.ended:
            raise StopIteration
        if stage.run.stop[0]:
            raise _Halt
        stage.flush()
        try:
            got = stage.inp.get_many(stage.inp.maxsize)
        except Closed:
            raise _Halt from None
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

    def __init__(self, spec: StageSpec, inp: Channel, out: Channel, run: RunState) -> None:
        super().__init__(spec, inp, out, run)
        self._pending: list[Any] = []

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
                if self.run.stop[0]:
                    raise _Halt
            self.flush()
        finally:
            self.counters[0].busy_seconds = perf_counter() - started
            close = getattr(result, "close", None)
            if close is not None:
                close()  # runs the generator's finally blocks if it stopped early
        # The function returned: whether or not it read every input, the stage is over. Inputs
        # it left unread still wait upstream; stop feeding them, as take() does.
        if not inputs.ended:
            _stop_upstream(self)
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
            _stop_upstream(self)
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
                # nothing upstream can fail the run any more.
                self.run.halt_upstream(self.inp)
                self.out.put_many(items)
                _stop_upstream(self)
            self.out.put_many(items)


class BatchStage(_OneThreadStage):
    """Groups items into lists of ``size``; the last, partial batch is emitted at the end.

    With a timeout, a partial batch is emitted once ``timeout`` seconds have passed since its first
    item arrived, so a slow trickle of items still moves on.
    """

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


def _stop_upstream(stage: _OneThreadStage) -> None:
    """Cut off everything upstream of the stage, then end its output.

    Closing the upstream channels wakes and stops every upstream thread and the source (see
    ``RunState.halt_upstream``); their late failures are ignored from then on. The stage after
    this one gets the end and finishes normally.
    """
    stage.run.halt_upstream(stage.inp)
    if not stage.run.stop[0]:
        stage.out.put_end()
    raise _Halt  # the end is sent: _work must not send it again
