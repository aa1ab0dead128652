"""The executor adapter: a stage whose calls run on a ``concurrent.futures.Executor``.

Threads share one interpreter lock, so a CPU-bound function gains nothing from a wider thread stage.
Such a stage can hand its calls to an executor instead: a process pool, a Dask cluster
(``Client(...).get_executor()``), or any other object with the ``Executor.submit`` protocol. The
pipeline keeps its own flow control, ordering, backpressure and error handling around it.

A stage on an executor runs two threads of its own, whatever its ``workers``:

* the dispatcher (``threadpipe-<stage>-0``) takes items from the input buffer and submits one call
  per item, never holding more than ``workers`` items at once (one permit per item, taken before the
  item leaves the input buffer);
* the collector (``threadpipe-<stage>-1``) hands finished calls on, in input order or as they
  finish, and returns an item's permit only once its output is in the next buffer.

The futures' done-callbacks run on the executor's own threads (a process pool's manager thread, a
Dask client's event loop). They only record the completion and wake the collector: a callback that
waited for room in a full buffer would stall every other future of that executor. Waiting for room
is the collector's job, and its held permits are what stop the dispatcher from submitting more.

Two threads, not one: the dispatcher sleeps in the input buffer while it waits for items, and the
buffer cannot also wake it for a completion, so a single thread would leave finished results
sitting (possibly for good) whenever the input runs dry.

Cancel (or a failure anywhere in the run) cancels the stage's futures that have not started and
returns without waiting for calls already running elsewhere; their results are dropped.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final

from ._channel import Channel
from ._errors import describe
from ._scope import Cancelled, Scope
from ._stage import FLAT_MAP, Runtime, StageSpec, _Counters, outputs_of

if TYPE_CHECKING:
    from concurrent.futures import Executor, Future, ProcessPoolExecutor
    from multiprocessing.context import BaseContext

    from ._run import RunState

__all__ = [
    "PROCESSES",
    "ExecutorStage",
    "call_with_resource",
    "check_executor",
    "flatten",
    "flatten_with_resource",
    "open_process_resource",
    "permits",
    "process_context",
]

PROCESSES: Final = "processes"
"""The ``executor=`` string that gives each run its own process pool of ``workers`` processes."""

_NO_ITEM: Final = object()


def _pickle_errors() -> tuple[type[Exception], ...]:
    """The error types that pickle raises for an object it cannot serialise: PicklingError for a
    function it cannot find by name, TypeError ("cannot pickle '_thread.lock' object"),
    AttributeError ("Can't pickle local object")."""
    import pickle  # here, not at the top: only stages on an executor pickle

    return (pickle.PicklingError, TypeError, AttributeError)


def check_executor(executor: object) -> Executor | str | None:
    """Check the ``executor=`` argument of a stage when the pipeline is built.

    Args:
        executor: None (a thread stage), an ``Executor`` instance, or ``"processes"``.

    Returns:
        ``executor`` itself.

    Raises:
        TypeError: ``executor`` is none of those.
    """
    if executor is None:
        return executor
    if isinstance(executor, str) and executor == PROCESSES:
        return executor
    from concurrent.futures import Executor  # here: it imports logging; only executors need it

    if isinstance(executor, Executor):
        return executor
    if isinstance(executor, type) and issubclass(executor, Executor):
        raise TypeError(
            f"executor must be an Executor instance or {PROCESSES!r}, got the class "
            f"{executor.__qualname__}: pass an instance, such as {executor.__qualname__}(...)"
        )
    raise TypeError(
        f"executor must be a concurrent.futures.Executor or {PROCESSES!r}, "
        f"got {describe(executor)} ({type(executor).__qualname__})"
    )


def flatten(fn: Callable[[Any], Iterable[Any]], item: Any) -> list[Any]:
    """Call a ``flat_map`` function where it runs and return its outputs as a list.

    A generator cannot travel between processes, so a remote ``flat_map`` call returns the list of
    what it yielded. This is a module-level function so that it pickles by name: workers of another
    process (or machine) need threadpipe importable to run a ``flat_map`` stage.
    """
    return list(fn(item))


# The resource of this worker process (``resource=`` with ``executor="processes"``): made by the
# pool's initializer, once per process, before its first call; closed when the process exits.
_PROCESS_RESOURCE: Any = None


def open_process_resource(factory: Callable[[], Any]) -> None:
    """A process pool's initializer: make this process's resource and arrange for its closing.

    A context manager is entered and exited (with ``(None, None, None)``) when the process exits
    at the pool's shutdown; any other object with ``close()`` is closed then. Runs in the worker
    process; module-level so that it pickles by name.
    """
    from multiprocessing.util import Finalize

    global _PROCESS_RESOURCE
    made = factory()
    cls = type(made)
    if hasattr(cls, "__enter__") and hasattr(cls, "__exit__"):
        _PROCESS_RESOURCE = cls.__enter__(made)
        Finalize(None, cls.__exit__, args=(made, None, None, None), exitpriority=10)
    else:
        _PROCESS_RESOURCE = made
        close = getattr(made, "close", None)
        if callable(close):
            Finalize(None, close, exitpriority=10)


def call_with_resource(fn: Callable[[Any, Any], Any], item: Any) -> Any:
    """Call ``fn(item, resource)`` with this worker process's resource."""
    return fn(item, _PROCESS_RESOURCE)


def flatten_with_resource(fn: Callable[[Any, Any], Iterable[Any]], item: Any) -> list[Any]:
    """``flatten`` for a ``flat_map`` with a per-process resource."""
    return list(fn(item, _PROCESS_RESOURCE))


def _is_process_pool(executor: object) -> bool:
    """Whether ``executor`` is a ``ProcessPoolExecutor``, without importing multiprocessing.

    If its module was never imported, no such pool can exist.
    """
    module = sys.modules.get("concurrent.futures.process")
    return module is not None and isinstance(executor, module.ProcessPoolExecutor)


def process_context() -> BaseContext:
    """The multiprocessing context for ``executor="processes"``: never ``fork``.

    ``spawn`` if the program chose it (``multiprocessing.set_start_method``), else ``forkserver``
    (``spawn`` where that is missing). Never ``fork`` (the default of Linux before Python 3.14),
    even if the program chose it: a run always has threads going, and a child forked from a
    threaded process can inherit a lock that some thread held at that instant and deadlock on it.
    Decided from the context the program set explicitly, never from the one a pool's start leaves
    behind (see ``_StartMethodGuard``).
    """
    import multiprocessing

    method = _GUARD.baseline() if _GUARD.live else multiprocessing.get_start_method(allow_none=True)
    if method not in ("spawn", "forkserver"):
        method = (
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        )
    return multiprocessing.get_context(method)


class _StartMethodGuard:
    """Keeps the program's start method as the program left it while our pools run.

    Starting a process of any context reads ``multiprocessing.get_start_method()``, which sets the
    global start method to the platform default when none was set: after one run, the program
    could no longer ``set_start_method()``, and a later run would read ``fork`` as its choice. So
    the method in force before the first of our live pools is remembered, and restored (reset to
    none, with the public ``set_start_method(None, force=True)``) when the last one shuts down.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = 0
        self._baseline: str | None = None

    def baseline(self) -> str | None:
        return self._baseline

    def acquire(self) -> None:
        import multiprocessing

        with self._lock:
            if not self.live:
                self._baseline = multiprocessing.get_start_method(allow_none=True)
            self.live += 1

    def release(self) -> None:
        import multiprocessing

        with self._lock:
            self.live -= 1
            if not self.live and self._baseline is None:
                multiprocessing.set_start_method(None, force=True)


_GUARD = _StartMethodGuard()


def permits(spec: StageSpec) -> int:
    """The most items a stage on an executor holds: its calls in flight plus outputs on their way.

    ``workers``, and one more for the pool of ``"processes"``: that pool has exactly ``workers``
    processes, so the extra call cannot run alongside the others; it waits in the pool's queue, as
    ``ProcessPoolExecutor.map`` keeps one waiting, so that a process that finishes a call starts
    the next at once instead of idling for the round trip through the pipeline's threads (on a
    machine whose cores the processes fill, that round trip waits for a core: 10-15% of the
    throughput of 10 ms calls on 2 cores).
    """
    return spec.workers + 1 if spec.executor == PROCESSES else spec.workers


def _pickler_for(executor: Executor) -> Callable[[Any], bytes] | None:
    """The serialiser ``executor`` sends functions with, when it is known; else None."""
    if _is_process_pool(executor):
        import pickle  # here, not at the top: only stages on an executor pickle

        return pickle.dumps
    if type(executor).__module__.startswith("distributed."):
        # Dask serialises with pickle, falling back to cloudpickle (which it depends on), so
        # cloudpickle's verdict is Dask's. Imported here: Dask is an optional extra.
        try:
            cloudpickle = importlib.import_module("cloudpickle")
        except ImportError:  # pragma: no cover - distributed always brings it
            return None
        dumps: Callable[[Any], bytes] = cloudpickle.dumps
        return dumps
    return None


class _Call:
    """One submitted item: its future, and when it was submitted and finished."""

    __slots__ = ("future", "item", "ready", "seconds", "submitted")

    def __init__(self, item: Any, future: Future[Any], submitted: float) -> None:
        self.item = item
        self.future = future
        self.submitted = submitted
        self.seconds = 0.0
        self.ready = False


class ExecutorStage(Runtime):
    """One stage of a run whose calls go to an executor: its two threads and its futures.

    It has the interface of :class:`~threadpipe._stage.Stage` that a run and its statistics use:
    ``spec``, ``inp``, ``out``, ``spawned`` (threads started), ``counters`` and ``start()``. It is
    also a member of its scope: cancelling the scope calls :meth:`abort`.

    Args:
        spec: what to run; ``spec.executor`` is an ``Executor`` or ``"processes"``.
        inp: the channel the dispatcher reads.
        out: the channel the collector writes.
        run: the run's shared state (error, thread accounting).
        scope: the stage's segment scope.
    """

    def __init__(
        self, spec: StageSpec, inp: Channel, out: Channel, run: RunState, scope: Scope
    ) -> None:
        super().__init__(spec, inp, out, run, scope, on_last=self._last_out)
        # One set of counters, written by the collector alone as it hands calls on: items_in counts
        # the items whose calls have returned (the statistics' in-flight count is the input
        # buffer's ``taken`` minus this), busy_seconds the seconds each call spent between its
        # submit and its completion. cpu_seconds stays None: the calls do not run on our threads.
        self.counters: list[_Counters] = [_Counters(), _Counters()]
        self.permits = permits(spec)
        self.executor: Executor | None = None
        # The pool this stage created for "processes"; shut down when the stage's threads end.
        self._owned: ProcessPoolExecutor | None = None
        # Lock discipline: ``_lock`` guards every field below. It is held only for bookkeeping,
        # never across a submit, a put, a future's cancel or ``run.fail`` (which calls ``abort``,
        # which takes it): each of those may block, or call back into this stage.
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # dispatcher: permits came back, or stop
        self._news = threading.Condition(self._lock)  # collector: a call finished, end, or stop
        self._calls: dict[int, _Call] = {}  # submitted, not yet taken by the collector
        self._ready: deque[int] = deque()  # unordered stage: finished calls, in finishing order
        self._head = 0  # ordered stage: the number of the next call to hand on
        self._held = 0  # permits in use: items taken from the input and not yet handed on
        self._dispatching = True
        self._input_ended = False
        self.peak = 0  # the most calls submitted and not yet handed on, at once
        scope.add(self)

    @classmethod
    def held(cls, spec: StageSpec, next_capacity: int) -> int:
        """The most items the stage holds: one permit per item, returned only once its output is
        in the next buffer. (A ``flat_map`` call's outputs come back as one list, made where the
        call ran: they count as the one item they came from.)"""
        return permits(spec)


    def __repr__(self) -> str:
        return f"<ExecutorStage {self.spec.name!r} on {describe(self.spec.executor)}>"

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Check the function can travel, set up the executor, and start the two threads.

        A function that the executor would have to pickle and cannot fails the run here, before
        any item is taken, with a note saying why.
        """
        # Here, not at the top: only stages on an executor need these (see check_executor).
        import pickle
        from concurrent.futures import Executor

        spec = self.spec
        executor = spec.executor
        assert executor is not None
        try:
            dumps = pickle.dumps if isinstance(executor, str) else _pickler_for(executor)
            if dumps is not None:
                resource = spec.options.resource
                for what, obj in (("function", spec.fn), ("resource factory", resource)):
                    if obj is None:
                        continue
                    try:
                        dumps(obj)
                    except Exception as exc:
                        exc.add_note(
                            f"threadpipe: stage {spec.name!r} runs its calls in other processes, "
                            f"and its {what} {describe(obj)} cannot be pickled to send there; "
                            "define it at module level (lambdas, nested functions and objects "
                            "holding locks, files or sockets do not pickle)"
                        )
                        raise
            if isinstance(executor, Executor):
                self.executor = executor
            else:
                from concurrent.futures import ProcessPoolExecutor

                _GUARD.acquire()
                try:
                    factory = spec.options.resource
                    if factory is None:
                        self._owned = ProcessPoolExecutor(spec.workers, mp_context=process_context())
                    else:
                        self._owned = ProcessPoolExecutor(
                            spec.workers,
                            mp_context=process_context(),
                            initializer=open_process_resource,
                            initargs=(factory,),
                        )
                except BaseException:
                    _GUARD.release()
                    raise
                self.executor = self._owned
        except Exception as exc:
            if not any(
                str(note).startswith("threadpipe: ") for note in getattr(exc, "__notes__", ())
            ):
                exc.add_note(
                    f"threadpipe: raised in stage {spec.name!r} while setting up its executor"
                )
            self.run.fail(exc, self.scope, spec.name, None, has_item=False)
            return
        self.crew.start_all(self._dispatch, self._collect)
        if not self.crew.spawned:  # cancelled before the threads started: nobody else will
            self._last_out()

    def abort(self) -> None:
        """Stop because the scope was cancelled: wake both threads, cancel the calls not started.

        Called by the scope's cancel, from whichever thread cancels it. Never blocks on a running
        call and never raises: the scope's other members are aborted after this one.
        """
        with self._lock:
            calls = list(self._calls.values())
            self._room.notify_all()
            self._news.notify_all()
        # Outside the lock: a cancel runs the future's done-callbacks (ours takes the lock) at once.
        for call in calls:
            try:
                call.future.cancel()
            except Exception:  # an executor's cancel hook failing must not stop the cancel
                pass
        self._shutdown(wait=False)

    def _shutdown(self, wait: bool) -> None:
        """Shut down the pool this stage created, if any; without waiting for calls unless told."""
        pool = self._owned
        if pool is None:
            return
        try:
            if wait:
                pool.shutdown(wait=True)
            else:
                pool.shutdown(wait=False, cancel_futures=True)
        except Exception:  # pragma: no cover - shutdown does not raise on a live pool
            pass

    def _last_out(self) -> None:
        """The last of the two threads out: drop what is left, close the pool this stage made."""
        with self._lock:
            # After a stop, calls may be left that nobody will hand on. Drop them: a failed
            # run's exception keeps the run reachable, and with it every future we hold (and
            # a Dask future keeps its result in the cluster's memory while it is referenced).
            self._calls.clear()
            self._ready.clear()
        # After a complete run every call has returned, so waiting only joins the idle
        # processes, and ``join()`` leaves none behind.
        self._shutdown(wait=not self.scope.cancelled[0])
        if self._owned is not None:
            _GUARD.release()

    # ------------------------------------------------------------------ the dispatcher

    def _dispatch(self, index: int) -> bool:
        spec = self.spec
        fn = spec.fn
        executor = self.executor
        assert executor is not None
        submit = executor.submit
        # What runs where the call runs: the function itself, or a module-level wrapper that
        # passes the process's resource, or collects a flat_map's outputs (a generator cannot
        # travel between processes).
        call: Callable[..., Any] | None
        if spec.options.resource is not None:
            call = flatten_with_resource if spec.kind is FLAT_MAP else call_with_resource
        else:
            call = flatten if spec.kind is FLAT_MAP else None
        inp = self.inp
        stop = self.scope.cancelled
        permits = self.permits
        room = self._room
        calls = self._calls
        done = self._done
        number = 0
        saw_end = False
        item: Any = _NO_ITEM
        try:
            while True:
                with self._lock:
                    while self._held >= permits:
                        if stop[0]:
                            raise Cancelled
                        room.wait()
                    free = permits - self._held
                got = inp.get_many(free)
                assert got is not None  # no timeout given
                items = got[0]
                if not items:
                    saw_end = True
                    return False  # the collector sends the end, once it has handed all on
                # Take the permits before submitting, so the collector never sees the count at
                # zero while some of these items are still on their way to the executor.
                with self._lock:
                    self._held += len(items)
                    self.peak = max(self._held, self.peak or 0)
                for item in items:
                    if stop[0]:
                        raise Cancelled
                    submitted = perf_counter()
                    try:
                        future = submit(call, fn, item) if call is not None else submit(fn, item)
                    except Exception as exc:
                        if stop[0]:
                            raise Cancelled from None  # the cancel shut the pool down under us
                        self._explain_submit(exc, item)
                        raise
                    with self._lock:
                        calls[number] = _Call(item, future, submitted)
                    future.add_done_callback(partial(done, number))
                    number += 1
                    if stop[0]:
                        # The stop may have come before ``close`` could see this future.
                        future.cancel()
                        raise Cancelled
                item = _NO_ITEM
                del items  # hand the references on: the calls hold the items now
        except Cancelled:
            return False
        except BaseException as exc:
            self.counters[1].errors += 1  # the dispatcher's own counters: one writer each
            self.run.fail(exc, self.scope, spec.name, item, has_item=item is not _NO_ITEM)
            return False
        finally:
            with self._lock:
                self._dispatching = False
                self._input_ended = saw_end
                self._news.notify()

    def _explain_submit(self, exc: Exception, item: Any) -> None:
        """Add a note to a submit's error when the item could not be serialised for the executor."""
        executor = self.executor
        assert executor is not None
        if not isinstance(exc, _pickle_errors()) or _pickler_for(executor) is None:
            return
        self._note_unpicklable_item(exc, item)

    def _note_unpicklable_item(self, exc: BaseException, item: Any) -> None:
        # Dask raises its own TypeError ("Could not serialize object of type ...") from pickle's:
        # name pickle's reason, which is the one that says what to fix. (A process pool's cause is
        # the text of the traceback in its feeder thread instead: the error itself says it.)
        cause = exc.__cause__
        if not isinstance(cause, _pickle_errors()):
            cause = exc
        exc.add_note(
            f"threadpipe: stage {self.spec.name!r} sends its items to other processes, and item "
            f"{describe(item)} cannot be pickled to send there ({type(cause).__name__}: {cause})"
        )

    # ------------------------------------------------------------------ completions

    def _done(self, number: int, future: Future[Any]) -> None:
        """Done-callback of call ``number``: record it and wake the collector. Never blocks.

        Runs on the executor's thread (or on the dispatcher's, for a future that finished before
        the callback was added).
        """
        finished = perf_counter()
        with self._lock:
            call = self._calls.get(number)
            if call is None:
                return  # dropped when the stage ended after a stop
            call.seconds = finished - call.submitted
            call.ready = True
            if not self.spec.ordered:
                self._ready.append(number)
                self._news.notify()
            elif number == self._head:
                self._news.notify()

    # ------------------------------------------------------------------ the collector

    def _take_finished(self) -> list[_Call]:
        """Remove and return the calls that can be handed on now. Call with ``_lock`` held."""
        calls = self._calls
        if self.spec.ordered:
            taken = []
            head = self._head
            while True:
                call = calls.get(head)
                if call is None or not call.ready:
                    break
                del calls[head]
                taken.append(call)
                head += 1
            self._head = head
            return taken
        ready = self._ready
        taken = [calls.pop(number) for number in ready]
        ready.clear()
        return taken

    def _collect(self, index: int) -> bool:
        spec = self.spec
        kind = spec.kind
        out = self.out
        stop = self.scope.cancelled
        counters = self.counters[0]
        news = self._news
        item: Any = _NO_ITEM
        try:
            while True:
                with self._lock:
                    while True:
                        if stop[0]:
                            raise Cancelled
                        finished = self._take_finished()
                        if finished:
                            break
                        if not self._dispatching and not self._held:
                            # Every item taken has been handed on and no more will be taken.
                            return self._input_ended
                        news.wait()
                outputs: list[Any] = []
                busy = 0.0
                for call in finished:
                    item = call.item
                    future = call.future
                    busy += call.seconds
                    if future.cancelled():
                        if stop[0]:
                            raise Cancelled
                        # Cancelled by someone else (the executor was shut down, a cluster
                        # cancelled it): a missing result is a failure, never a silent gap.
                        from concurrent.futures import CancelledError  # here: see check_executor

                        raise CancelledError(
                            f"the executor cancelled the call for item {describe(item)}"
                        )
                    error = future.exception()
                    if error is not None:
                        counters.errors += 1
                        self._fail_call(error, item)
                        raise Cancelled
                    outputs.extend(outputs_of(kind, item, future.result()))
                item = _NO_ITEM
                counters.items_in += len(finished)
                counters.items_out += len(outputs)
                counters.busy_seconds += busy
                if outputs:
                    out.put_many(outputs)
                # Only now, with the outputs in the next buffer, do the items stop counting
                # against the stage: this is what makes a full buffer hold the dispatcher back.
                with self._lock:
                    self._held -= len(finished)
                    self._room.notify()
                del finished, outputs, call, future
        except Cancelled:
            return False
        except BaseException as exc:
            counters.errors += 1
            self.run.fail(exc, self.scope, spec.name, item, has_item=item is not _NO_ITEM)
            return False

    def _fail_call(self, error: BaseException, item: Any) -> None:
        """Fail the run with a call's exception, as ``Future.result()`` would raise it."""
        executor = self.executor
        if (
            _is_process_pool(executor)
            and isinstance(error, _pickle_errors())
            and not _picklable(item)
        ):
            # A process pool pickles items in its own thread and reports a failure on the future.
            self._note_unpicklable_item(error, item)
        self.run.fail(error, self.scope, self.spec.name, item)


def _picklable(item: Any) -> bool:
    import pickle  # here, not at the top: only stages on an executor pickle

    try:
        pickle.dumps(item)
    except Exception:
        return False
    return True
