"""The coroutine adapter: coroutine stages, async sources and ``async for``, one event loop a run.

A stage whose function is a coroutine function runs its calls on an event loop, so that
``workers=200`` means 200 coroutines in flight, not 200 threads. The pieces:

* :class:`LoopThread`: the run's event loop, in the run's thread ``threadpipe-loop-0``. It starts
  only for a run with a coroutine stage or an async source, is shared by all of them, and is stopped
  and closed when the run ends, is cancelled or fails. Stopping it cancels every task still pending
  (the coroutines see ``CancelledError``) and waits for them before the loop closes.
* :class:`CoroutineStage`: a coroutine stage of a run. Its calls run in worker tasks, one call at a
  time each, reused from item to item, never more than ``workers`` items taken. Its two sides run
  where their buffers let them:

  - output: the buffer after a coroutine stage is written on the loop (a ``LoopChannel``, see
    ``_loopchannel``), so an unordered worker puts its outputs in itself, and waits for room as an
    ``await``; an ordered stage's *emitter task* puts them in input order. Only into a relief
    valve, whose put is a thread's, does the *emitter thread* (``threadpipe-<stage>-1``) put them.
  - input: from a buffer a coroutine stage or an async source writes (a ``LoopLink``), the
    *puller* takes items on the loop as they arrive, with no thread; from a buffer threads write,
    the *taker thread* (``threadpipe-<stage>-0``) takes them and hands them to the loop in batches.

  So a chain of coroutine stages runs on the loop thread alone, and items cross to a thread only
  where a thread stage, an operator or the caller is.
* :class:`AsyncFeeder`: a task on the loop pulls the async source (or a container in memory) and
  puts its items into the first buffer.
* :class:`AsyncOutput`: ``async for`` over a run, from the caller's own event loop.

The loop never blocks on a buffer: a thread blocks, a task awaits. (One bounded exception: a full
buffer whose reader thread the busy loop keeps from the interpreter lock, see
``LoopChannel._yield_to_reader``.) Threads reach the loop only
through ``call_soon_threadsafe`` (coroutine objects are made on the loop, never in a thread, so none
is ever left un-awaited), and the loop reaches threads only through short critical sections on
``threading`` locks and conditions, never a wait. No thread touches an asyncio object of a loop it
does not run.

Backpressure reaches the coroutines through the permits: an item holds one until its outputs are
in the next buffer, and no call starts without one. When the next buffer is full, the calls already
running finish and wait, at most ``workers`` of them, and the stage starts no new call.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from itertools import islice
from time import perf_counter, sleep
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar, cast

from ._calls import RateLimiter, attempts_async, handle, open_resource_async
from ._channel import END, Channel
from ._coroutine import ASYNC_GEN
from ._errors import SourceConsumedError, describe
from ._loopchannel import LoopChannel, LoopLink
from ._reorder import Reorder
from ._scope import Cancelled, Scope
from ._source import SOURCE_NAME
from ._stage import EACH, FILTER, MAP, Runtime, StageSpec, outputs_of
from ._threads import Crew

from ._run import _SLICE, _raise_stopped

if TYPE_CHECKING:
    from ._run import Run, RunState

__all__ = ["AsyncFeeder", "AsyncOutput", "AsyncSource", "CoroutineStage", "LoopThread"]

T = TypeVar("T")

LOOP_THREAD_NAME: Final = "threadpipe-loop-0"

# How long the helper thread of an ``async for`` waits for its next job before it exits: long enough
# that a steady stream of waits reuses one thread, short enough that an abandoned iterator does not
# keep a thread around.
_LINGER: Final = 0.1

# How long a busy loop may go without asking the OS for I/O events (see ``_paced``), and how long it
# lets go of the interpreter lock, once per switch interval of being busy, so that the process's
# other threads get it.
_POLL_EVERY: Final = 0.0005
_YIELD_FOR: Final = 0.00005

_EMPTY: Final = object()  # the async feeder's slot holds no item
_END_OF_SOURCE: Final = object()  # the async source is exhausted
_CLOSED: Final = object()  # the output channel was closed (the run stopped)
_NO_MORE: Final = object()  # a flat_map's plain iterator is exhausted


class LoopThread:
    """The event loop of one run, in the run's thread ``threadpipe-loop-0``.

    Every user of the loop (a coroutine stage, the async feeder) holds it from its construction,
    before any thread of the run starts, until its own threads have exited; the last release stops
    the loop. The run stopping (cancel, a failure, a dropped run, interpreter exit) stops it too:
    this object is a member of the run's root scope. Once stopped, the loop cancels the tasks still
    pending, waits for them, finishes async generators and its default executor, and closes.

    Args:
        run: the run's shared state; the loop thread is counted among the run's threads.
    """

    def __init__(self, run: RunState) -> None:
        self.run = run
        # Set once by the loop thread, read by any thread (an attribute read is atomic).
        self.loop: asyncio.AbstractEventLoop | None = None
        # ``_lock`` guards ``_users`` and ``_stopping``, and publishes ``loop`` against a
        # concurrent stop request (see ``_main``).
        self._lock = threading.Lock()
        self._users = 0
        self._stopping = False
        self._ready = threading.Event()
        self._ident: int | None = None  # the loop thread's, once it runs
        self._crew = Crew("loop", run, run.scope, None)
        # Loop thread only: what closes the stages' resources, run on the loop as it shuts down,
        # after every call has ended (cleanly or cancelled) and before the loop closes.
        self.closers: list[Callable[[], Awaitable[None]]] = []
        run.scope.add(self)

    def __repr__(self) -> str:
        return f"<LoopThread users={self._users}{' stopping' if self._stopping else ''}>"

    # ------------------------------------------------------------------ users

    def stage(self, spec: StageSpec, inp: Channel, out: Channel, scope: Scope) -> CoroutineStage:
        """Make the runtime of a coroutine stage on this loop (it holds the loop at once)."""
        return CoroutineStage(spec, inp, out, self.run, scope, self)

    def feeder(
        self, aiterator: AsyncIterator[Any] | Iterator[Any], out: Channel, scope: Scope
    ) -> AsyncFeeder:
        """Make the feeder of an async source (it holds the loop at once)."""
        return AsyncFeeder(aiterator, out, self.run, scope, self)

    def on_loop(self) -> bool:
        """Whether the caller is the loop thread."""
        return threading.get_ident() == self._ident

    def here(self) -> asyncio.AbstractEventLoop:
        """The loop, for code running on it. ``asyncio.get_running_loop()`` gives the same, with a
        ``getpid()`` system call each time (its check for a fork): the per-item paths ask this."""
        loop = self.loop
        assert loop is not None, "called off the loop"
        return loop

    def hold(self) -> None:
        """Count one more user: the loop runs at least until it releases."""
        with self._lock:
            self._users += 1

    def release(self) -> None:
        """Count a user out; the last one stops the loop."""
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self._request_stop()

    def abort(self) -> None:
        """Stop the loop because the run stopped: pending tasks are cancelled, then it closes."""
        self._request_stop()

    # ------------------------------------------------------------------ from other threads

    def call_soon(self, callback: Callable[..., None], *args: Any) -> bool:
        """Have the loop call ``callback(*args)``; callable from any thread.

        Returns:
            False when the loop is already closed (the run is over): the callback will never run.
        """
        loop = self.loop
        if loop is None:
            self._ready.wait()  # the loop thread is creating it (or failed to)
            loop = self.loop
            if loop is None:
                return False
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # "Event loop is closed"
            return False
        return True

    def call_if_running(self, callback: Callable[[], None]) -> bool:
        """Have the loop call ``callback()`` if it runs; never waits (for a cancel's use).

        A loop not made yet has no tasks to cancel, and its users check their scope before they
        create any.

        Returns:
            Whether the callback went to the loop: False when there is no loop yet, or no more.
        """
        loop = self.loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # "Event loop is closed"
            return False
        return True

    # ------------------------------------------------------------------ the loop thread

    def start(self) -> None:
        """Start the loop thread (without waiting for it: ``call_soon`` waits if it must)."""
        try:
            started = self._crew.start(self._main)
        except BaseException:
            self._ready.set()
            raise
        if not started:  # the run was cancelled before it started
            self._ready.set()

    def _request_stop(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            loop = self.loop
        # No loop yet: ``_main`` sees ``_stopping`` as it publishes the loop, and does not run it.
        if loop is not None:
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass  # closed already

    def _main(self, index: int) -> bool:
        loop: asyncio.AbstractEventLoop | None = None
        try:
            # Made here, in the thread that runs it: a loop made elsewhere and never run would have
            # to be closed by whoever made it.
            loop = asyncio.new_event_loop()
            _paced(loop)
            self._ident = threading.get_ident()
            with self._lock:
                self.loop = loop
                stopping = self._stopping
            self._ready.set()
            if not stopping:
                loop.run_forever()
        except BaseException as exc:
            exc.add_note(f"threadpipe: raised by the run's event loop ({LOOP_THREAD_NAME})")
            self.run.fail(exc, self.run.scope, "loop", None, has_item=False)
        finally:
            self._ready.set()
            try:
                if loop is not None:
                    try:
                        _shutdown(loop)
                        self._close_resources(loop)
                        _finish(loop)
                    finally:
                        loop.close()
                        self._ident = None  # the identity of an exited thread can be reused
            except BaseException as exc:
                exc.add_note(
                    f"threadpipe: raised while closing the run's event loop ({LOOP_THREAD_NAME})"
                )
                self.run.fail(exc, self.run.scope, "loop", None, has_item=False)
        return False

    def _close_resources(self, loop: asyncio.AbstractEventLoop) -> None:
        # Each one, whatever the others do: a resource failing to close fails the run (unless it
        # already failed or was cancelled), and the next one is closed all the same.
        closers, self.closers = self.closers, []
        for close in closers:
            try:
                loop.run_until_complete(close())
            except BaseException as exc:
                exc.add_note("threadpipe: raised while closing a coroutine stage's resource")
                self.run.fail(exc, self.run.scope, "loop", None, has_item=False)


def _settle(handed: asyncio.Future[None]) -> None:
    """On the loop: let a flat_map call go on, its part of the outputs is in the next buffer."""
    if not handed.done():
        handed.set_result(None)


def _paced(loop: asyncio.AbstractEventLoop) -> None:
    """Let the loop, while callbacks are ready, poll for I/O only every ``_POLL_EVERY`` seconds,
    and give the process's other threads the interpreter lock once every switch interval.

    A selector loop with callbacks ready asks the OS for I/O events at every turn without waiting
    (``select(0)``), and lets go of the interpreter lock for that call. When another thread wants
    the lock (yours, reading the outputs), the lock changes hands at every turn, two context
    switches each: with one or two workers per stage, about a quarter of what a call cost. Paced,
    a turn with callbacks ready polls only once the last poll is ``_POLL_EVERY`` old, so I/O that
    became ready while the loop was busy is seen at the first turn after that, not at the next
    one; a turn with nothing ready waits in the OS as before.

    Pacing alone starves the other threads while the loop stays busy: each poll lets go of the
    lock for an instant and takes it back before a waiting thread can, and that counts as a
    switch, so the waiting thread never asks the interpreter to force one (it asks only after a
    whole switch interval without any). So once per switch interval of being busy the loop
    sleeps ``_YIELD_FOR`` seconds, without the lock, long enough for a woken thread to take it:
    about 1 % of a busy loop's time. A loop without a selector (the Windows proactor, uvloop or
    another policy's own loop) is left as it is.
    """
    selector: Any = getattr(loop, "_selector", None)
    select = getattr(selector, "select", None)
    if select is None:
        return
    polled = yielded = perf_counter()
    every = sys.getswitchinterval()

    def paced(timeout: float | None = None) -> Any:
        nonlocal polled, yielded
        now = perf_counter()
        if timeout is not None and timeout <= 0:
            if now - polled < _POLL_EVERY:
                return []  # busy, and polled a moment ago: run the ready callbacks first
            if now - yielded >= every:
                sleep(_YIELD_FOR)  # busy for a switch interval: let the other threads in
                yielded = now
        events = select(timeout)
        polled = perf_counter()
        if polled - now >= _YIELD_FOR:
            yielded = polled  # it waited in the OS, without the lock: the others had their turn
        return events

    selector.select = paced


def _shutdown(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still pending and wait for them.

    What ``asyncio.run`` does on its way out (with ``_finish``). Every task's outcome is retrieved: ours never raise
    (they carry a failure to the run as a value), and a task the user left behind that raised is
    reported through the loop's exception handler, as ``asyncio.run`` would.
    """
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                loop.call_exception_handler(
                    {
                        "message": "unhandled exception in a task still running when the run ended",
                        "exception": task.exception(),
                        "task": task,
                    }
                )


def _finish(loop: asyncio.AbstractEventLoop) -> None:
    """The rest of what ``asyncio.run`` does on its way out: async generators, the executor."""
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())


# ---------------------------------------------------------------------------------- coroutine stage


class CoroutineStage(Runtime):
    """One coroutine stage of a run: its worker tasks on the run's loop, and its two sides (a
    thread or a part on the loop each, see the module's docstring).

    It has the protocol of :class:`~threadpipe._stage.Runtime`. Its crew counts the two sides,
    thread or not (the last one out ends the stage). It is also a member of its scope: cancelling
    the scope calls :meth:`abort`, which cancels its coroutines.

    Args:
        spec: what to run; ``spec.fn`` is a coroutine function (or, for flat_map, an async
            generator function).
        inp: the channel the stage reads (a ``LoopLink``: on the loop).
        out: the channel the outputs go to (a ``LoopChannel``: written on the loop).
        run: the run's shared state (error, thread accounting).
        scope: the stage's segment scope.
        aio: the run's loop.
    """

    def __init__(
        self,
        spec: StageSpec,
        inp: Channel,
        out: Channel,
        run: RunState,
        scope: Scope,
        aio: LoopThread,
    ) -> None:
        # The taker and the emitter; the last one out closes the resource and releases the loop.
        super().__init__(spec, inp, out, run, scope, on_last=self._last_out)
        self.aio = aio
        # Each side of the stage runs on the loop when its buffer lets it (see ``_loopchannel``):
        # the output side as an *emitter task* when the next buffer is written on the loop (any
        # but a relief valve), the input side as the *puller* when the input buffer is a
        # ``LoopLink`` (a coroutine stage or an async source writes it). A side on a thread
        # buffer has its thread: the taker, the emitter.
        self._loop_in = isinstance(inp, LoopLink)
        self._loop_out = isinstance(out, LoopChannel)
        # A call of an unordered stage puts its outputs in itself, into a buffer written on the
        # loop; an ordered one leaves that to the emitter, which keeps the order.
        self._put_now = out.put_now if isinstance(out, LoopChannel) and not spec.ordered else None
        # Such a call reading on the loop too takes its items itself, one by one, like the
        # pattern's worker: the *passing* stage. Its permit passes from the item it handed on to
        # the next; when items arrive, workers are woken (or made) for them, not handed them.
        self._passing = self._loop_in and self._put_now is not None
        if spec.reorders and not self._loop_out:
            self.reorder = Reorder(inp, out, 2 * spec.workers)
            scope.add(self.reorder)
        # One set of counters, written by the loop thread only (each call adds itself on return).
        # The most coroutines that were in flight at once so far (``workers`` is the limit).
        self.peak = 0
        # Lock discipline: ``_lock`` guards the fields below. It is only ever held for bookkeeping,
        # never across a channel operation, a loop call or ``run.fail`` (which calls ``abort``,
        # which takes it). The loop thread takes it too, so it must never be held for long.
        self._lock = threading.Lock()
        self._has_room = threading.Condition(self._lock)  # taker: permits came back, or stop
        self._has_news = threading.Condition(self._lock)  # emitter: results, the end, or stop
        self._in_flight = 0  # permits in use: items taken and not yet handed to ``out``/reorder
        # Outputs for the emitter: (number, outputs, handed). ``handed`` is None for a call's last
        # outputs (the call is over), else the loop's future the call waits on for that part.
        self._results: list[tuple[int, list[Any], asyncio.Future[None] | None]] = []
        self._emitter_waits = False  # spares the loop thread a notify when nobody waits
        self._taker_waits = False  # likewise for the taker thread
        self._taking = True
        self._saw_end = False
        self._closed = False
        self._pulling = False  # the puller (a loop-side input) is counted in the crew
        self._pull_blocked = False  # the puller stopped for want of permits: call it when they return
        # Loop thread only: the emitter task (a loop-side output) and the future it waits on.
        self._emitter: asyncio.Task[bool] | None = None
        self._news: asyncio.Future[None] | None = None
        # Loop thread only: the calls run in worker tasks, each making one call at a time and
        # reused for the next item (a task per call would cost a task's creation per item, the
        # main cost of a call at high concurrency). Items taken and not yet started wait in
        # ``_backlog``; a worker whose call ends takes the next one there. Idle workers wait on a
        # future each in ``_idle``; ``_waking`` counts the workers made or woken that have not
        # taken an item yet. ``_launch`` wakes or makes workers until there are as many coming
        # as items waiting, so each item has one. The loop keeps only weak references to tasks:
        # ``_workers`` keeps them alive.
        self._backlog: deque[tuple[int, Any]] = deque()
        self._idle: list[asyncio.Future[bool]] = []
        # Loop thread only: every item of the input is in the backlog or done (the end came).
        # Idle workers are dismissed then, and busy ones end once the backlog is empty: they end
        # as the stage does, not cancelled when the loop stops.
        self._input_over = False
        self._waking = 0
        self._workers: set[asyncio.Task[None]] = set()
        self._running = 0  # calls started and not ended
        self._plain_map = spec.kind == MAP and spec.timeout is None and spec.options.plain
        # Loop thread only: the stage's resource (``resource=``), made on the loop before the
        # first call by a task every call awaits, and the call failure that ended the stage.
        self._resource: asyncio.Task[Any] | None = None
        self._release: Callable[[BaseException | None], Awaitable[None]] | None = None
        self._failure: BaseException | None = None
        rate = spec.options.rate
        # One limiter for the stage, shared by its coroutines: the rate holds whatever ``workers``.
        self._limiter = RateLimiter(rate, scope.event) if rate is not None else None
        aio.hold()
        scope.add(self)

    @classmethod
    def held(cls, spec: StageSpec, next_capacity: int) -> int:
        """One permit per item in flight, returned once its outputs are handed on; ordered, the
        reorder window lets as many again wait for their turn."""
        return 2 * spec.workers if spec.reorders else spec.workers

    @classmethod
    def held_outputs(cls, spec: StageSpec, next_capacity: int) -> int:
        """A ``flat_map`` call holds at most one output buffer's worth before it waits."""
        return spec.workers * next_capacity if spec.kind == "flat_map" else 0

    def __repr__(self) -> str:
        return (
            f"<CoroutineStage {self.spec.name!r} in flight {self._in_flight}/{self.spec.workers}>"
        )

    @property
    def in_flight(self) -> int:
        """Items taken from the input and not yet handed on (a snapshot)."""
        return self._in_flight

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start the two sides: a thread each, or on the loop the puller and the emitter task."""
        threads = [side for side, on_loop in ((self._take, self._loop_in), (self._emit, self._loop_out)) if not on_loop]
        if not self.crew.start_all(*threads, pieces=2 - len(threads)):
            self.aio.release()  # never started (the run was cancelled): let the loop go
            return
        if self._loop_in:
            with self._lock:
                self._pulling = not self._closed
                pulling = self._pulling
            if not pulling:
                self.crew.leave(False)
            else:
                pull = self._call_workers if self._passing else self._pull
                self.inp.on_items = pull  # type: ignore[attr-defined]
                if not self.aio.call_soon(pull):  # items may be waiting already
                    self._stop_pulling(False)
        if self._loop_out and not self.aio.call_soon(self._start_emitter):
            self.crew.leave(False)

    def abort(self) -> None:
        """Wake both threads so they exit, and cancel the stage's coroutines on the loop.

        Called by the scope's cancel: by the run stopping (the loop then stops and cancels every
        task anyway), or by a ``take()`` downstream that cut this stage off, while the loop goes
        on for the other stages.
        """
        with self._lock:
            self._closed = True
            self._has_room.notify_all()
            self._has_news.notify_all()
        self._stop_pulling(False)
        self.aio.call_if_running(self._cancel_tasks)

    def _cancel_tasks(self) -> None:
        for task in list(self._workers):
            task.cancel()
        if self._emitter is not None:
            self._emitter.cancel()

    def _tell_emitter(self) -> None:
        """Under ``_lock``: results or the end are in. A loop-side emitter only from the loop."""
        if self._loop_out:
            news, self._news = self._news, None
            if news is not None and not news.done():
                news.set_result(None)
        elif self._emitter_waits:
            self._has_news.notify()

    def _wake_emitter(self) -> None:
        with self._lock:
            self._tell_emitter()

    # ------------------------------------------------------------------ the taker thread

    def _take(self, index: int) -> bool:
        inp = self.inp
        limit = self.spec.workers
        saw_end = False
        try:
            while True:
                with self._lock:
                    while self._in_flight >= limit and not self._closed:
                        self._taker_waits = True
                        self._has_room.wait()
                        self._taker_waits = False
                    if self._closed:
                        return False
                    room = limit - self._in_flight
                got = inp.get_many(room)
                assert got is not None  # no timeout given
                items, number = got
                if not items:
                    saw_end = True
                    return False  # the emitter ends the stage, once every output is out
                with self._lock:
                    self._in_flight += len(items)
                # One handoff per batch. The coroutines are made on the loop, not here: one made
                # here for a loop that closed meanwhile would never be awaited.
                if not self.aio.call_soon(self._launch, items, number):
                    return False
                del items
        except Cancelled:
            return False
        except BaseException as exc:  # a threadpipe bug: fail the run rather than hang it
            self.run.fail(exc, self.scope, self.spec.name, None, has_item=False)
            return False
        finally:
            with self._lock:
                self._taking = False
                self._saw_end = saw_end
                self._has_news.notify_all()  # the emitter may be waiting for exactly this
            if self._loop_out:
                self.aio.call_soon(self._wake_emitter)
            if saw_end:  # after the last ``_launch`` on the loop: its items have their workers
                self.aio.call_soon(self._dismiss)

    # ------------------------------------------------------------------ the emitter thread

    def _emit(self, index: int) -> bool:
        out = self.out
        reorder = self.reorder
        stop = self.scope.cancelled
        # Ordered flat_map: parts of calls not at the head of the line yet, by number. Their calls
        # wait for them, so this holds at most one part per call in flight.
        parked: dict[int, list[tuple[list[Any], asyncio.Future[None]]]] = {}
        outputs: list[Any] = []
        try:
            while True:
                with self._lock:
                    while (
                        not self._results and not self._closed and (self._taking or self._in_flight)
                    ):
                        self._emitter_waits = True
                        self._has_news.wait()
                        self._emitter_waits = False
                    if self._closed or stop[0]:
                        return False
                    results = self._results
                    if not results:
                        break  # the taker saw the end, and every call's outputs are out
                    self._results = []
                # Blocking puts happen here, in this thread, so a full buffer downstream holds
                # this stage's permits and never the loop.
                count = 0
                if reorder is not None:
                    for number, outputs, handed in results:
                        if handed is None:
                            reorder.complete(number, 1, outputs)
                            count += 1
                        else:
                            parked.setdefault(number, []).append((outputs, handed))
                        # Parts of calls now at the head of the line go out, in order.
                        while reorder.head in parked:
                            for part, waiter in parked.pop(reorder.head):
                                out.put_many(part)
                                self.aio.call_if_running(partial(_settle, waiter))
                else:
                    batch = []
                    for _, outputs, handed in results:
                        batch.extend(outputs)
                        if handed is None:
                            count += 1
                    if batch:
                        out.put_many(batch)
                    for _, _, handed in results:
                        if handed is not None:
                            self.aio.call_if_running(partial(_settle, handed))
                    del batch
                del results, outputs  # hand the references on; a slow consumer keeps no copy
                self._give_back(count)
            return self._saw_end  # every output is out: the crew sends the end on
        except Cancelled:
            return False
        except BaseException as exc:  # a threadpipe bug: fail the run rather than hang it
            self.run.fail(exc, self.scope, self.spec.name, None, has_item=False)
            return False

    def _give_back(self, count: int) -> None:
        """Return the permits of ``count`` items whose outputs are all handed on (either emitter)."""
        if not count:
            return
        with self._lock:
            self._in_flight -= count
            if self._taker_waits:  # a notify costs a lock probe even with nobody waiting
                self._has_room.notify()
            blocked, self._pull_blocked = self._pull_blocked, False
            if not self._in_flight and not self._taking:
                self._tell_emitter()  # it may be waiting for the last permit to end the stage
        if blocked:
            if self.aio.on_loop():
                self._pull()
            else:
                self.aio.call_soon(self._pull)

    # ------------------------------------------------------------------ the loop-side input

    def _pull(self) -> None:
        """On the loop: take what the input buffer holds and the permits allow, and start calls.

        The input buffer calls it when items or the end arrive, and ``_give_back`` when permits
        it lacked come back. It never waits: with nothing to take it returns, and is called again.
        """
        try:
            while True:  # until nothing is left to take, or no permit
                with self._lock:
                    if not self._pulling or self._closed:
                        return
                    room = self.spec.workers - self._in_flight
                    if room <= 0:
                        self._pull_blocked = True
                        return
                got = self.inp.take(room)  # type: ignore[attr-defined]
                if got is None:
                    return
                items, number = got
                if not items:
                    self._stop_pulling(True)
                    return
                with self._lock:
                    self._in_flight += len(items)
                self._launch(items, number)
                del items
        except Cancelled:
            self._stop_pulling(False)
        except BaseException as exc:  # a threadpipe bug: fail the run rather than hang it
            self.run.fail(exc, self.scope, self.spec.name, None, has_item=False)
            self._stop_pulling(False)

    def _stop_pulling(self, saw_end: bool) -> None:
        """The loop-side input is done (the end came, or the stage stopped): count it out."""
        with self._lock:
            pulling, self._pulling = self._pulling, False
            if pulling:
                self._taking = False
                self._saw_end = saw_end
                self._has_news.notify_all()
                if saw_end:
                    self._tell_emitter()  # the end came on the loop
        if pulling:
            self.crew.leave(False)  # the emitter ends the stage, once every output is out
            if saw_end:  # on the loop, where the end came: no item will come any more
                self._dismiss()

    # ------------------------------------------------------------------ the loop-side output

    def _start_emitter(self) -> None:
        if self._closed or self.scope.cancelled[0]:
            self.crew.leave(False)
            return
        loop = self.aio.loop
        assert loop is not None  # we are running on it
        self._emitter = loop.create_task(self._emit_on_loop())
        self._emitter.add_done_callback(self._emitter_done)

    def _emitter_done(self, task: asyncio.Task[bool]) -> None:
        self._emitter = None
        saw_end = False
        if not task.cancelled():
            exc = task.exception()
            if exc is None:
                saw_end = task.result()
            else:  # a threadpipe bug: fail the run rather than hang it
                self.run.fail(exc, self.scope, self.spec.name, None, has_item=False)
        self.crew.leave(saw_end)

    async def _emit_on_loop(self) -> bool:
        """The emitter as a task: put the finished outputs into the next buffer, on the loop.

        As the emitter thread (``_emit``), with its waits as awaits: for news on a future, for
        room in the next buffer (a ``LoopChannel``) on another. An ordered stage keeps finished
        items, and the parts of flat_map calls not at the head of the line, until their turn; their
        permits come back only once their outputs are out, so it holds at most ``workers`` items.
        """
        out = cast("LoopChannel", self.out)
        ordered = self.spec.reorders
        stop = self.scope.cancelled
        loop = self.aio.here()
        parts: dict[int, list[tuple[list[Any], asyncio.Future[None] | None]]] = {}
        head = 0
        try:
            while True:
                with self._lock:
                    closed = self._closed or stop[0]
                    results = self._results
                    over = not results and not self._taking and not self._in_flight
                    news = None
                    if results:
                        self._results = []
                    elif not closed and not over:
                        news = self._news = loop.create_future()
                if closed:
                    return False
                if news is not None:
                    await news
                    continue
                if over:
                    break
                count = 0
                if ordered:
                    for number, outputs, handed in results:
                        parts.setdefault(number, []).append((outputs, handed))
                    while head in parts:
                        final = False
                        for outputs, handed in parts.pop(head):
                            if outputs:
                                if count and len(out.queue) + len(outputs) > out.maxsize:
                                    # The put will wait: the items already out give their
                                    # permits back first.
                                    self._give_back(count)
                                    count = 0
                                await out.put_async(outputs)
                            if handed is None:
                                final = True
                            else:
                                _settle(handed)
                        if not final:
                            break
                        head += 1
                        count += 1
                else:
                    batch: list[Any] = []
                    for _, outputs, handed in results:
                        batch.extend(outputs)
                        if handed is None:
                            count += 1
                    if batch:
                        await out.put_async(batch)
                    for _, _, handed in results:
                        if handed is not None:
                            _settle(handed)
                    del batch
                del results  # hand the references on
                self._give_back(count)
            # Every output is out. The resource closes before the end goes on (see ``_last_out``).
            if self.spec.options.resource is not None:
                try:
                    await self._close_resource()
                except BaseException as exc:
                    self._close_failed(exc)
                    return False
            return self._saw_end
        except Cancelled:
            return False

    # ------------------------------------------------------------------ the loop thread

    def _launch(self, items: list[Any], number: int) -> None:
        # The stop flag is set before any closable is closed, so before the loop is told to stop:
        # a batch that arrives once the run stopped starts nothing (no call after a cancel).
        if self.scope.cancelled[0] or self._closed:
            return
        self._backlog.extend(zip(range(number, number + len(items)), items))
        self._running += len(items)
        self.peak = max(self._running, self.peak or 0)
        self._summon(len(self._backlog))

    def _summon(self, waiting: int) -> None:
        """On the loop: every one of ``waiting`` items gets a worker coming, now: an idle one
        woken, or a new one, up to ``workers`` of them. (A worker whose call ends takes the next
        item itself, without a wake-up; one that calls this, giving its permit back, counts
        among those coming.)"""
        need = waiting - self._waking
        idle = self._idle
        while need > 0 and idle:
            waiter = idle.pop()
            if not waiter.done():  # else its worker was cancelled
                waiter.set_result(True)
                self._waking += 1
                need -= 1
        need = min(need, self.spec.workers - len(self._workers))  # the others are all busy
        if need > 0:
            loop = self.aio.loop
            assert loop is not None  # we are running on it
            self._waking += need
            for _ in range(need):
                task = loop.create_task(self._work())
                self._workers.add(task)
                task.add_done_callback(self._workers.discard)

    def _call_workers(self) -> None:
        """A passing stage's puller, on the loop: items or the end arrived in the input. Each
        item waiting gets a worker coming (``_summon``), which takes it itself; the end alone
        there ends the input."""
        if not self._pulling or self._closed:
            return
        if not self._idle and len(self._workers) >= self.spec.workers:
            return  # every worker is busy: each takes the next item (or sees the end) itself
        waiting, ended = self.inp.waiting()  # type: ignore[attr-defined]
        if waiting:
            self._summon(waiting)
        elif ended:
            self._stop_pulling(True)

    async def _work(self) -> None:
        """A worker task: make calls, one at a time, while items wait; then wait to be woken.

        It never raises but CancelledError, so a worker's task never ends with an exception to
        retrieve, and a cancelled task has nothing to retrieve. Failures go to the run as values,
        KeyboardInterrupt included, so nothing escapes into the loop.
        """
        backlog = self._backlog
        loop = self.aio.here()
        cancelled = self.scope.cancelled
        fn = self.spec.fn
        plain_map = self._plain_map
        plain = self.spec.options.plain
        counters = self.counters[0]
        put = self._put_now
        out = cast("LoopChannel", self.out)
        passing = self._passing
        holding = False  # passing: this worker holds a permit (see ``_take_one``)
        while True:
            self._waking -= 1  # made or woken for an item: it is here now
            while True:  # its item, and any other left waiting when its call ends
                if backlog:
                    number, item = backlog.popleft()
                elif passing and (got := self._take_one(holding)) is not None:
                    number, item = got
                    holding = True
                    del got
                else:
                    break
                # The stage may have been cut off since the item was taken (a take() downstream
                # has all it needs). No call starts after a cancel.
                if cancelled[0]:
                    self._running -= 1
                    return
                started = perf_counter()
                throttled = 0.0
                try:
                    if plain_map:  # the common case: no frame between the loop and the function
                        outputs = [await fn(item)]
                    elif plain:
                        outputs = await self._timed(item, number)
                    else:
                        outputs, throttled = await self._attempts(item, number)
                except asyncio.CancelledError as exc:
                    self._running -= 1
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # the run is stopping: end as cancelled
                    # The function raised CancelledError without being cancelled (an inner task
                    # of its own was): a failure like any other, never a silent drop.
                    self._failed(exc, item)
                    del exc, item
                    continue
                except BaseException as exc:
                    self._running -= 1
                    self._failed(exc, item)
                    del exc, item
                    continue
                del item
                self._running -= 1
                counters.items_in += 1
                counters.items_out += len(outputs)
                counters.busy_seconds += perf_counter() - started - throttled
                if put is not None:
                    # Unordered into a buffer on the loop: the worker puts the outputs in
                    # itself, waiting for room if it must, as the pattern's worker does.
                    try:
                        if outputs and not put(outputs):
                            await out.put_async(outputs)
                    except Cancelled:  # the buffer was aborted: the stage is stopping
                        return
                    del outputs
                    if passing:
                        continue  # the permit passes to the next item, if there is one
                    # The permit goes back, which may take in more items: this worker, about
                    # to look at the backlog, counts as one coming for them.
                    self._waking += 1
                    self._give_back(1)
                    self._waking -= 1
                else:
                    with self._lock:
                        self._results.append((number, outputs, None))
                        self._tell_emitter()
                    del outputs
            if holding:  # nothing to take now: the permit goes back
                holding = False
                self._give_back(1)
            if self._closed or cancelled[0] or self._input_over:
                return
            waiter = loop.create_future()
            self._idle.append(waiter)
            if not await waiter:
                return  # dismissed: no item will come any more (see ``_dismiss``)

    def _dismiss(self) -> None:
        """On the loop, once the input is over: let the idle workers end (the workers still busy
        end when they find the backlog empty)."""
        self._input_over = True
        idle, self._idle = self._idle, []
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(False)

    def _take_one(self, holding: bool) -> tuple[int, Any] | None:
        """A passing stage's worker, on the loop: the next item of the input and its number, under
        the permit the worker holds (``holding``) or a new one; None when there is none now. The
        end, found here, ends the input. The worker gives its permit back once it finds none."""
        if not self._pulling or self._closed:  # plain reads: a stop that races is seen below
            return None
        try:
            got: tuple[int, Any] | None = self.inp.take_one()  # type: ignore[attr-defined]
        except Cancelled:
            return None
        if got is None:
            return None
        if got[1] is END:
            self._stop_pulling(True)
            return None
        if not holding:
            with self._lock:
                self._in_flight += 1
        self._running += 1
        if self._running > (self.peak or 0):
            self.peak = self._running
        return got

    def _failed(self, exc: BaseException, item: Any) -> None:
        self.counters[0].errors += 1
        if self._failure is None:
            self._failure = exc
        self.run.fail(exc, self.scope, self.spec.name, item)

    async def _resource_value(self) -> Any:
        """The stage's resource, made on the first call's demand (once, shared by all calls)."""
        if self._resource is None:
            self._resource = self.aio.here().create_task(self._open_resource())
        return await asyncio.shield(self._resource)

    async def _open_resource(self) -> Any:
        try:
            value, release = await open_resource_async(self.spec.options)
        except BaseException as exc:
            exc.add_note(
                f"threadpipe: raised while making the resource of stage {self.spec.name!r}"
            )
            raise

        self._release = release
        self.aio.closers.append(self._close_resource)
        return value

    async def _close_resource(self) -> None:
        """Exit the resource, once: with the stage's own failed call if that ended the run."""
        release, self._release = self._release, None
        if release is not None:
            await release(self._failure if self.run.error is self._failure else None)

    def _last_out(self) -> None:
        """The taker and the emitter are done: close the resource, then let the loop go.

        After a clean end this happens before the end of input goes on, so a caller that has the
        last output knows the stage's resource (a client session) is closed. After a cancel or
        a failure the loop closes it as it shuts down.
        """
        try:
            loop = self.aio.loop
            # On the loop (the emitter task was last out) it is closed already: a clean end
            # closes it in the task, a cancel as the loop shuts down.
            if self.spec.options.resource is not None and loop is not None and not self.aio.on_loop():
                self._close_on(loop)
        finally:
            self.aio.release()

    def _close_on(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.scope.cancelled[0]:
            return
        try:
            done = asyncio.run_coroutine_threadsafe(self._close_resource(), loop)
        except RuntimeError:  # the loop is closed: it closed the resource on its way out
            return
        while True:
            try:
                done.result(0.1)
                return
            except TimeoutError:
                if self.scope.cancelled[0]:
                    return  # the loop's shutdown closes it now
            except BaseException as exc:
                self._close_failed(exc)
                return

    def _close_failed(self, exc: BaseException) -> None:
        exc.add_note(f"threadpipe: raised while closing the resource of stage {self.spec.name!r}")
        self.run.fail(exc, self.scope, self.spec.name, None, has_item=False)

    async def _invoke(self, item: Any) -> Any:
        """Call the function: ``fn(item)``, or ``fn(item, resource)`` with ``resource=``."""
        if self.spec.options.resource is None:
            return await self.spec.fn(item)
        return await self.spec.fn(item, await self._resource_value())

    async def _attempts(self, item: Any, number: int) -> tuple[list[Any], float]:
        """The outputs of one item with the stage's rate limit, retries and error policy: the
        call core's async driver (``_calls.attempts_async``), and the seconds it waited for the
        rate limit (not busy time). A ``flat_map`` call that handed outputs on is not retried."""
        options = self.spec.options
        handed = [False]
        ok, value, waited = await attempts_async(
            lambda: self._timed(item, number, handed),
            options,
            self._limiter,
            self.counters[0],
            lambda: not handed[0],
        )
        if ok:
            return value, waited
        result = handle(
            value,
            item,
            options,
            stage=self.spec.name,
            run=self.run,
            counters=self.counters[0],
            fallback=lambda item: None,  # a skipped item gives no outputs, whatever the kind
        )
        if options.on_error == "skip":
            return [], waited
        # The policy's replacement stands for what the call would have returned.
        return outputs_of(self.spec.kind, item, result), waited

    async def _timed(self, item: Any, number: int, handed: list[bool] | None = None) -> list[Any]:
        """The outputs of one call, within the stage's timeout."""
        timeout = self.spec.timeout
        if timeout is None:
            return await self._apply(item, number, handed)
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await self._apply(item, number, handed)
        except TimeoutError as exc:
            # Only the TimeoutError that ``asyncio.timeout`` made just now (from the CancelledError
            # it injected) gets a message: a user's own TimeoutError is raised as it is.
            if (
                scope.expired()
                and isinstance(exc.__cause__, asyncio.CancelledError)
                and not exc.args
            ):
                exc.args = (
                    f"the call did not finish within timeout={timeout:g} s and was cancelled",
                )
            raise

    async def _apply(self, item: Any, number: int, handed: list[bool] | None = None) -> list[Any]:
        """The outputs of one call: ``[result]``, ``[item]`` or ``[]``, or a flat_map's elements
        not handed on yet (see ``_stream``)."""
        kind = self.spec.kind
        if kind == MAP:
            return [await self._invoke(item)]
        if kind == FILTER:
            return [item] if await self._invoke(item) else []
        if kind == EACH:
            await self._invoke(item)
            return [item]
        # flat_map: an async generator function, or a coroutine function returning an iterable or
        # an async iterable. Either way the outputs stream on, a buffer's worth at a time.
        if self.spec.coroutine == ASYNC_GEN:
            fn = self.spec.fn
            if self.spec.options.resource is None:
                return await self._stream(fn(item), number, handed)
            return await self._stream(fn(item, await self._resource_value()), number, handed)
        result = await self._invoke(item)
        return await self._stream(result, number, handed)

    async def _stream(self, results: Any, number: int, handed: list[bool] | None) -> list[Any]:
        """Hand a ``flat_map`` call's outputs on as they come; return the last ones.

        Every time a buffer's worth is made, the call waits until the emitter has put it into
        the next buffer (for an ordered stage, once every earlier item's outputs are out), so a
        call holds at most one buffer's worth, and backpressure reaches the async generator. An
        async iterator is closed (``aclose()``) here, on the loop, when the call ends early.
        """
        chunk = max(1, self.out.maxsize)
        outputs: list[Any] = []
        is_async = hasattr(type(results), "__aiter__")
        iterator = aiter(results) if is_async else iter(results)
        try:
            while True:
                if is_async:
                    try:
                        value = await anext(iterator)
                    except StopAsyncIteration:
                        break
                else:
                    value = next(iterator, _NO_MORE)
                    if value is _NO_MORE:
                        break
                outputs.append(value)
                del value
                if len(outputs) >= chunk:
                    if handed is not None:
                        handed[0] = True
                    self.counters[0].items_out += len(outputs)
                    await self._hand_on(number, outputs)
                    outputs = []
            return outputs
        finally:
            close = getattr(iterator, "aclose" if is_async else "close", None)
            if close is not None:
                if is_async:
                    await close()
                else:
                    close()

    async def _hand_on(self, number: int, outputs: list[Any]) -> None:
        """Give the emitter part of a call's outputs and wait until they are in the next buffer."""
        handed = self.aio.here().create_future()
        with self._lock:
            self._results.append((number, outputs, handed))
            self._tell_emitter()
        await handed


# ---------------------------------------------------------------------------------- async source


class AsyncSource:
    """A pipeline's async source as built: an async iterable, and whether it can feed several runs.

    An async iterator (an async generator object, anything with ``__anext__``) feeds one run; any
    other async iterable is iterated afresh by every run. It has the interface of
    :class:`~threadpipe._source.Source` that a pipeline uses.

    Args:
        aiterable: the items to feed.

    Raises:
        TypeError: ``aiterable`` is not an async iterable.
    """

    is_async = True  # iterated on the run's event loop

    in_memory: Final = False
    """Items come from an async iterator, never from a container in memory."""

    def __init__(self, aiterable: AsyncIterable[Any]) -> None:
        if not hasattr(type(aiterable), "__aiter__"):
            if callable(aiterable):
                hint = "; to use an async generator function, call it: from_async_iter(gen())"
            elif hasattr(type(aiterable), "__iter__"):
                hint = "; for a plain iterable use Pipeline.from_iter"
            else:
                hint = ""
            raise TypeError(
                f"from_async_iter(aiterable) needs an async iterable, got {describe(aiterable)} "
                f"of type {type(aiterable).__qualname__}{hint}"
            )
        self.iterable = aiterable
        # Decided without calling ``__aiter__`` now: by protocol, an async iterator is its own.
        self.one_shot = hasattr(type(aiterable), "__anext__")
        self._lock = threading.Lock()
        self._opened = False

    def held(self, first_capacity: int) -> int:
        """The most items the feeder holds: the one handed over, the next not pulled until it is put."""
        return 1

    def launch(
        self, opened: AsyncIterator[Any], out: Channel, state: RunState, scope: Scope, aio: Any
    ) -> None:
        """Start the feeder of what :meth:`open` returned, on the run's loop ``aio``."""
        aio.feeder(opened, out, scope).start()

    def open(self) -> AsyncIterator[Any]:
        """Return a fresh async iterator over the items.

        Raises:
            SourceConsumedError: the source is a one-shot async iterator that a previous run used.
            TypeError: ``__aiter__`` did not return an async iterator.
        """
        with self._lock:
            if self.one_shot:
                if self._opened:
                    raise SourceConsumedError(
                        "this pipeline's source is a one-shot async iterator "
                        f"({type(self.iterable).__qualname__}) that an earlier run consumed; "
                        "build the pipeline on a re-iterable async source to run it again"
                    )
                self._opened = True
        # ``type(x).__aiter__(x)`` rather than ``aiter(x)``: the builtin would raise on a coroutine
        # returned by an ``async def __aiter__`` and leave it to warn "never awaited".
        iterator = type(self.iterable).__aiter__(self.iterable)
        if not hasattr(type(iterator), "__anext__"):
            close = getattr(iterator, "close", None)
            if (
                close is not None
            ):  # an ``async def __aiter__`` returned a coroutine: don't let it warn
                close()
            raise TypeError(
                f"__aiter__ of {describe(self.iterable)} returned {describe(iterator)}, "
                "not an async iterator (is __aiter__ an async def? it must be a plain def)"
            )
        return iterator


class AsyncFeeder:
    """Pulls an async source on the run's loop and puts its items into the first buffer.

    The async iterator runs on the loop, in a task. When the first buffer is written on the loop
    (see ``_loopchannel``) the task puts each item itself, waiting for room as an await. Into a
    relief valve (a plain ``Channel``), whose put the loop must not make, the task hands each item
    to the feeder thread (``threadpipe-source-0``), which puts it, and only then lets the task pull
    the next. Either way the source is never pulled more than one item ahead of the buffer, like a
    plain source. On cancel the loop cancels the task, which closes the iterator (``aclose()``) on
    its way out, on the loop.

    The same task feeds a coroutine stage from a container in memory (``Source.launch``), a buffer's
    worth at a time: nothing in it can block the loop.

    Args:
        aiterator: the opened async source.
        out: the first buffer.
        run: the run's shared state.
        scope: the source's scope (the first segment's).
        aio: the run's loop.
    """

    def __init__(
        self,
        aiterator: AsyncIterator[Any] | Iterator[Any],
        out: Channel,
        run: RunState,
        scope: Scope,
        aio: LoopThread,
    ) -> None:
        self.aiterator = aiterator
        self.scope = scope
        self.out = out
        self.run = run
        self.aio = aio
        # ``_lock`` guards the slot and ``_closed``; held only to move one item, by either side.
        self._lock = threading.Lock()
        self._handed = threading.Condition(self._lock)
        self._slot: Any = _EMPTY
        self._closed = False
        self._ack: asyncio.Future[None] | None = None  # loop thread only
        self._task: asyncio.Task[bool] | None = (
            None  # loop thread only; the loop holds tasks weakly
        )
        # The first buffer is on the loop (a coroutine stage reads it): the task puts the items.
        self._direct = isinstance(out, LoopChannel)
        self._crew: Crew | None = None
        aio.hold()
        scope.add(self)

    def start(self) -> None:
        """Start the feeder thread (``threadpipe-source-0``), or with a first buffer on the loop,
        only the task, which puts the items itself."""
        crew = self._crew = Crew(SOURCE_NAME, self.run, self.scope, self.out, on_last=self.aio.release)
        if self._direct:
            if not crew.start_all(pieces=1):
                self.aio.release()
            elif not self.aio.call_soon(self._start):
                crew.leave(False)
            return
        try:
            crew.start(self.feed)
        finally:
            if not crew.spawned:
                self.aio.release()

    def abort(self) -> None:
        """Wake the feeder thread so it exits: the scope was cancelled (the run, or a cut)."""
        with self._lock:
            self._closed = True
            self._handed.notify_all()
        self.aio.call_if_running(self._cancel)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def feed(self, index: int) -> bool:
        """The feeder thread: put each item the task hands over, then let it pull the next."""
        out = self.out
        try:
            if not self.aio.call_soon(self._start):
                return False
            while True:
                with self._lock:
                    while self._slot is _EMPTY and not self._closed:
                        self._handed.wait()
                    if self._closed:
                        return False
                    item = self._slot
                    self._slot = _EMPTY
                if item is _END_OF_SOURCE:
                    return True
                if not out.try_put(item):
                    out.put_many([item])
                del item
                if not self.aio.call_soon(self._resume):
                    return False
        except Cancelled:
            return False
        except BaseException as exc:  # a threadpipe bug: fail the run rather than hang it
            self.run.fail(exc, self.scope, SOURCE_NAME, None, has_item=False)
            return False

    # ------------------------------------------------------------------ the loop thread

    def _hand(self, item: Any) -> None:
        with self._lock:
            self._slot = item
            self._handed.notify()

    def _resume(self) -> None:
        ack = self._ack
        if ack is not None and not ack.done():
            ack.set_result(None)

    def _start(self) -> None:
        if self.scope.cancelled[0]:
            if self._direct:
                assert self._crew is not None
                self._crew.leave(False)
            return
        loop = self.aio.loop
        assert loop is not None  # we are running on it
        self._task = loop.create_task(self._pull())
        self._task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[bool]) -> None:
        saw_end = False
        if not task.cancelled():
            exc = task.exception()  # retrieved; ``_pull`` carries failures itself, so a bug
            if exc is not None:
                self.run.fail(exc, self.scope, SOURCE_NAME, None, has_item=False)
            else:
                saw_end = task.result()
        if self._direct:
            assert self._crew is not None
            self._crew.leave(saw_end)

    async def _pull(self) -> bool:
        """Pull the source; hand each item to the feeder thread, or put it into the first buffer
        when that is on the loop. Returns whether it put the whole source (the loop-side end)."""
        loop = self.aio.here()
        direct = cast("LoopChannel", self.out) if self._direct else None
        try:
            if not hasattr(type(self.aiterator), "__anext__"):
                # A container's items (``Source.launch``): nothing to await but room, a buffer's
                # worth at a time, as the feeder thread of a container takes them.
                assert direct is not None
                size = max(1, direct.maxsize)
                items = cast("Iterator[Any]", self.aiterator)
                while chunk := list(islice(items, size)):
                    await direct.put_async(chunk)
                    del chunk
                return True
            aiterator = cast("AsyncIterator[Any]", self.aiterator)
            while True:
                try:
                    item = await anext(aiterator)
                except StopAsyncIteration:
                    if direct is not None:
                        return True
                    self._hand(_END_OF_SOURCE)
                    return False
                if direct is not None:
                    await direct.put_async([item])
                    del item
                    continue
                self._ack = loop.create_future()
                self._hand(item)
                del item
                await self._ack
        except asyncio.CancelledError:
            raise
        except Cancelled:
            return False
        except BaseException as exc:
            self.run.fail(exc, self.scope, SOURCE_NAME, None, has_item=False)
            return False
        finally:
            # Like the feeder of a plain source: a source the run stopped early is closed, here on
            # the loop that iterates it, so its ``finally`` blocks run.
            if self.scope.cancelled[0]:
                aclose = getattr(self.aiterator, "aclose", None)
                if aclose is not None:
                    try:
                        await aclose()
                    except asyncio.CancelledError:
                        raise
                    except BaseException as exc:
                        self.run.fail(exc, self.scope, SOURCE_NAME, None, has_item=False)


# ---------------------------------------------------------------------------------- async for


class _Helper:
    """One thread that does an async iterator's blocking waits, so the caller's loop never does.

    It runs one job at a time and hands the result to the caller's loop with
    ``call_soon_threadsafe``. It lingers ``_LINGER`` seconds for the next job, so a steady stream
    of waits reuses one thread, then exits, so an abandoned iterator does not keep a thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._has_job = threading.Condition(self._lock)
        self._job: (
            tuple[Callable[[], Any], asyncio.AbstractEventLoop, Callable[[Any], None]] | None
        ) = None
        self._running = False
        self._closed = False

    def close(self) -> None:
        """Let the thread exit now rather than linger: the iteration is over."""
        with self._lock:
            self._closed = True
            self._has_job.notify()

    def submit(
        self,
        job: Callable[[], Any],
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[Any], None],
    ) -> None:
        """Run ``job()`` in the helper thread, then ``deliver((result, exception))`` on ``loop``."""
        with self._lock:
            self._job = (job, loop, deliver)
            if self._running:
                self._has_job.notify()
                return
            self._running = True
        try:
            threading.Thread(target=self._main, name="threadpipe-output-0", daemon=True).start()
        except BaseException:
            with self._lock:
                self._running = False
                self._job = None
            raise

    def _main(self) -> None:
        while True:
            with self._lock:
                if self._job is None and not self._closed:
                    self._has_job.wait(_LINGER)
                job = self._job
                self._job = None
                if job is None:
                    self._running = False
                    return
            fn, loop, deliver = job
            del job
            result: tuple[Any, BaseException | None]
            try:
                result = (fn(), None)
            except BaseException as exc:
                result = (None, exc)
            try:
                loop.call_soon_threadsafe(deliver, result)
            except RuntimeError:
                pass  # the caller's loop is closed: nobody is waiting any more
            del fn, loop, deliver, result


def _fetch(state: RunState, channel: Channel, batch: int) -> Any:
    """Wait for outputs (in the helper thread): a batch, ``[]`` at the end, ``_CLOSED`` on stop.

    It waits in slices, as the plain iterator does, to see an end that will never come
    (``RunState.check_end``)."""
    try:
        while True:
            got = channel.get_many(batch, _SLICE)
            if got is not None:
                return got[0]
            state.check_end(channel)
            if state.stop[0]:
                return _CLOSED
    except Cancelled:
        return _CLOSED


def _deliver(ref: weakref.ref[AsyncOutput[Any]], result: tuple[Any, BaseException | None]) -> None:
    # Through a weak reference: a wait in progress must not keep an abandoned iterator (and so its
    # run) alive; dropping it is what cancels a run that ``async for x in pipeline`` left early.
    output = ref()
    if output is not None:
        output._delivered(result)


class AsyncOutput(Generic[T]):
    """The async iterator over a run's outputs, for ``async for``; see ``Run.__aiter__``.

    Outputs already in the buffer are taken at once. When there are none, a helper thread
    (``threadpipe-output-0``) waits for them and wakes this iterator's task through its loop, which
    meanwhile runs its other tasks. Cancelling the task that waits loses nothing: the outputs the
    helper takes are kept for the next ``__anext__``.

    Leaving the loop early (``break``, an exception in the body, ``aclose()``, dropping the
    iterator) cancels the run, as with a plain ``for``.

    Args:
        run: the run to iterate.
        own: the iterator owns the run (``async for x in pipeline``).
    """

    def __init__(self, run: Run[T], own: bool = False) -> None:
        self._run = run  # keeps the run alive (and so not cancelled) while this iterator is
        self._own = own
        self._state = run._state
        self._channel = run._output
        self._stop = run._state.stop
        self._batch = max(1, run._output.maxsize)
        self._buffer: deque[Any] = deque()
        # Caller's loop thread only: results the helper delivered, not yet looked at.
        self._delivered_results: deque[tuple[Any, BaseException | None]] = deque()
        self._waiting = False  # a job is with the helper
        self._woken: asyncio.Future[None] | None = None
        self._helper = _Helper()
        self._over = False  # the end arrived, or the run stopped

    def __aiter__(self) -> AsyncOutput[T]:
        return self

    async def __anext__(self) -> T:
        """Return the next output, waiting for it without blocking the caller's event loop.

        Raises:
            StopAsyncIteration: the outputs are over (or the run was cancelled).
            RuntimeError: a stage raised ``StopIteration`` or ``StopAsyncIteration`` (its cause).
            BaseException: the exception a stage or the source raised, as itself.
        """
        buffer = self._buffer
        if buffer and not self._stop[0]:
            return buffer.popleft()  # type: ignore[no-any-return]
        while True:
            if self._stop[0]:
                got = _CLOSED
            elif self._delivered_results:
                got, error = self._delivered_results.popleft()
                if error is not None:
                    self._over = True
                    self._state.cancel()  # Ctrl-C (or a bug) in the helper: stop, then let it go
                    raise error
            elif self._waiting:
                await self._sleep()
                continue
            else:
                try:
                    taken = self._channel.get_many(self._batch, 0)  # takes what is there, never waits
                except Cancelled:
                    continue  # the flag is up: reported at the top
                if taken is None:
                    self._wait_in_thread(partial(_fetch, self._state, self._channel, self._batch))
                    await self._sleep()
                    continue
                got = taken[0]
            if got and got is not _CLOSED:
                buffer.extend(cast("list[Any]", got))
                return buffer.popleft()  # type: ignore[no-any-return]
            # The end, or the run stopped. As the plain iterator does: every call has returned
            # once the end arrives, and the threads on their way out are not waited for.
            self._over = True
            buffer.clear()
            self._helper.close()
            if got is not _CLOSED:
                self._state.delivered = True
            self._run._close_monitor()
            state = self._state
            del self, buffer  # the traceback holds this frame: it must not hold the run
            try:
                _raise_stopped(state)
            finally:
                del state
            raise StopAsyncIteration

    def __del__(self) -> None:
        if not self._over:
            self._state.cancel_soon()  # left early: the loop broke, raised, or dropped this

    async def aclose(self) -> None:
        """Stop iterating and cancel the run (a no-op once its outputs were all delivered)."""
        self._over = True
        self._buffer.clear()
        self._helper.close()
        self._run.cancel()

    def _wait_in_thread(self, job: Callable[[], Any]) -> None:
        self._waiting = True
        self._helper.submit(job, asyncio.get_running_loop(), partial(_deliver, weakref.ref(self)))

    def _delivered(self, result: tuple[Any, BaseException | None]) -> None:
        # On the caller's loop thread, like every other method here: no lock needed.
        self._waiting = False
        self._delivered_results.append(result)
        woken = self._woken
        if woken is not None and not woken.done():
            woken.set_result(None)

    async def _sleep(self) -> None:
        """Wait until the helper delivers (nothing can run between a submit and this await)."""
        woken = asyncio.get_running_loop().create_future()
        self._woken = woken
        try:
            await woken
        finally:
            self._woken = None
