"""The threads of a stage: started counted and with rollback; the last one out ends the stage.

Every runtime (the worker pool, a one-thread operator, the two threads of a coroutine or executor
stage, a source's feeder, the pumps of a merge, the run's event loop) starts its threads through a
:class:`Crew`. The crew

* counts each thread in the run before it starts, and counts it out if ``Thread.start`` fails, so
  the run is done exactly when every thread it started has exited;
* names it ``threadpipe-<stage>-<i>``, so a thread dump reads like the pipeline;
* sends the end of input on when its last thread exits, if one of them saw the end and the stage's
  scope was not cancelled: ending is the sentinel, never a side effect of a cancel.

A pooled crew (the worker pools and the feeders) does not start an OS thread for each of its
threads: it hands the body to a thread parked in the process-wide :class:`_Pool`, and starts a new
one only when none is parked. A thread parks when its body returns (the run has counted it out by
then), named ``threadpipe.idle``, and exits after ``IDLE_SECONDS`` without work. Starting a thread
costs ~100 us of CPU and a start-up handshake that, with hundreds of threads waiting for the
interpreter lock, held the thread that asked for it (a stage's producer, between two items) for
milliseconds; waking a parked one costs one lock release. So a run's threads are started once per
process, not once per run, and a stage that grows to 256 workers takes them from the threads the
previous run (of any pipeline) left parked.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._channel import Channel
    from ._run import RunState
    from ._scope import Scope

__all__ = ["IDLE_NAME", "IDLE_SECONDS", "PREFIX", "Crew", "drain", "in_library_thread", "settle"]

PREFIX = "threadpipe-"

# A parked thread's name: not a stage's (it serves none), and not under PREFIX, so that nobody
# mistakes it for a thread of a run.
IDLE_NAME: Final = "threadpipe.idle"

# How long a parked thread waits for work before it exits.
IDLE_SECONDS: Final = 5.0

_Job = tuple[str, Callable[..., None], tuple[Any, ...]]


class _Parked:
    """One pooled thread: its wake-up lock (held while it has nothing to do) and its next job."""

    __slots__ = ("job", "thread", "wake")

    def __init__(self, job: _Job) -> None:
        self.job: _Job | None = job
        self.wake = threading.Lock()
        self.wake.acquire()
        self.thread: threading.Thread | None = None


class _Pool:
    """The process's parked threads, reused by every pooled crew of every run.

    A stack: the thread parked last is woken first, so the threads a burst needed and the next one
    does not are the ones at the bottom, which time out and exit.

    Lock discipline: ``_lock`` guards ``_idle`` and ``_serving``. A thread is in ``_idle``
    exactly while it may be handed a job: the launcher pops it and sets its job under the lock,
    then releases its ``wake`` outside it. A thread whose wait timed out removes itself under the
    lock; if it is no longer there, a launcher popped it, and its job is on the way (the wake is
    released): it waits for it instead of exiting. ``_serving`` counts the jobs handed out and not
    yet returned from: a thread counts itself out of its run before its job returns (and the
    job's frames, which hold the run, are gone only then), so :meth:`settle` waits on this.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._idle: list[_Parked] = []
        self._serving = 0

    def launch(self, name: str, body: Callable[..., None], args: tuple[Any, ...]) -> None:
        """Run ``body(*args)`` in a parked thread named ``name``, or in a new one if none is parked.

        Raises:
            RuntimeError: no thread was parked and a new one could not start.
        """
        job = (name, body, args)
        with self._lock:
            self._serving += 1
            parked = self._idle.pop() if self._idle else None
            if parked is not None:
                parked.job = job
        if parked is not None:
            parked.wake.release()
            return
        parked = _Parked(job)
        thread = threading.Thread(target=self._serve, args=(parked,), name=name, daemon=True)
        parked.thread = thread
        try:
            thread.start()
        except BaseException:
            self._returned(None)
            raise

    def _returned(self, parked: _Parked | None) -> None:
        """A job returned (or never started): park its thread (``parked``), count the job out."""
        with self._lock:
            if parked is not None:
                self._idle.append(parked)
            self._serving -= 1
            if not self._serving:
                self._settled.notify_all()

    def _serve(self, parked: _Parked) -> None:
        thread = threading.current_thread()
        while True:
            job = parked.job
            if job is None:
                return  # retired by drain()
            parked.job = None
            name, body, args = job
            del job
            thread.name = name
            try:
                body(*args)  # an exception ends the thread (threading.excepthook reports it)
            except BaseException:
                del body, args
                self._returned(None)
                raise
            # This frame outlives the body in any traceback the body left (as f_back): it must
            # not hold the body, whose crew holds the run.
            del body, args
            thread.name = IDLE_NAME
            self._returned(parked)
            if parked.wake.acquire(timeout=IDLE_SECONDS):
                continue
            with self._lock:
                try:
                    self._idle.remove(parked)
                except ValueError:
                    pass  # popped by a launcher after the timeout: its job is coming
                else:
                    return
            parked.wake.acquire()

    def drain(self, timeout: float | None = None) -> int:
        """Make every thread parked now exit, and wait up to ``timeout`` for them; return how many."""
        with self._lock:
            retired, self._idle = self._idle, []
        for parked in retired:
            parked.job = None
            parked.wake.release()
        for parked in retired:
            if parked.thread is not None:
                parked.thread.join(timeout)
        return len(retired)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` until no job is running; return whether none is."""
        with self._settled:
            return self._settled.wait_for(lambda: not self._serving, timeout)

    def forked(self) -> None:
        """In a child process: the parked threads are the parent's, not here."""
        self._lock = threading.Lock()  # the parent's may have been held by a thread that is gone
        self._settled = threading.Condition(self._lock)
        self._idle = []
        self._serving = 0


_POOL = _Pool()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forked)


def drain(timeout: float | None = None) -> int:
    """Make the threads parked now exit (and wait up to ``timeout`` for them); a private hook for
    tests and programs that must see no idle thread. Threads still serving a run park when done.

    Returns:
        How many threads were parked.
    """
    return _POOL.drain(timeout)


def settle(timeout: float | None = None) -> bool:
    """Wait up to ``timeout`` until every pooled thread has returned from its job (parked or
    exited); a private hook for tests. A pooled thread counts itself out of its run, and takes
    its run's name off, before its frames let go of the run: a test that checks a finished run
    is freed waits for this too, not only for the threads named after the run's stages.

    Returns:
        Whether every job had returned.
    """
    return _POOL.settle(timeout)


def in_library_thread() -> bool:
    """Whether the calling thread is one of threadpipe's own (it may hold a channel's lock)."""
    return threading.current_thread().name.startswith(PREFIX)


class Crew:
    """The counted threads of one stage.

    Args:
        name: the stage's name, for the threads' names.
        run: the run's state, which counts every thread of the run.
        scope: the stage's scope: a cancelled scope sends no end on.
        out: where the end goes when the last thread exits having seen it; None for none.
        on_last: called once, by the last thread out, before the end is sent on (a pool's
            shutdown, the loop's release).
        pooled: run the threads on the process's parked threads (see :class:`_Pool`). Only for
            bodies that do not read per-thread totals such as ``thread_time()`` as their own.
    """

    __slots__ = (
        "_lock",
        "_on_last",
        "_place",
        "_returning",
        "alive",
        "away",
        "borrowed",
        "ended",
        "most",
        "name",
        "out",
        "pooled",
        "run",
        "scope",
        "spawned",
    )

    def __init__(
        self,
        name: str,
        run: RunState,
        scope: Scope,
        out: Channel | None,
        on_last: Callable[[], None] | None = None,
        pooled: bool = False,
    ) -> None:
        self.name = name
        self.pooled = pooled
        self.run = run
        self.scope = scope
        self.out = out
        self._on_last = on_last
        # ``_lock`` guards the counts: ``alive`` and ``ended`` change together, so the last
        # thread out is known exactly and the end goes on once. ``borrowed`` counts the threads
        # of the stage before that run one of this stage's calls (see ``borrow``): they count
        # against ``limit`` like its own; ``away`` counts its own threads that run the next
        # stage's calls, which do not. ``busy`` (``alive - away + borrowed``) is what is held to
        # ``limit``, and ``most`` is its peak. A thread back from away while another took its
        # place waits on ``_place``, still counted away, until a place frees; ``_returning``
        # counts the waiting ones, and the places they wait for are not given to anyone else.
        self._lock = threading.Lock()
        self._place = threading.Condition(self._lock)
        self._returning = 0
        self.spawned = 0
        self.alive = 0
        self.away = 0
        self.borrowed = 0
        self.most = 0
        self.ended = False

    def start(self, target: Callable[..., bool], *args: Any, limit: int | None = None) -> bool:
        """Start thread number ``i``, running ``target(i, *args)``; it returns whether it saw the end.

        Args:
            target: the thread's body.
            args: its arguments.
            limit: start nothing if this many threads are running (started and not exited).

        Returns:
            Whether a thread was started: not once the stage ended, was cancelled or is full.

        Raises:
            RuntimeError: the thread could not start (the run is then cancelled by the caller).
        """
        index = self._reserve(1, limit)
        if index is None:
            return False
        self._launch(index, target, args)
        return True

    def start_all(self, *targets: Callable[[int], bool], pieces: int = 0) -> bool:
        """Start one thread per target, each as ``target(i)``, all counted alive before any starts.

        So that none of them can exit as the "last" thread (and end the stage) while the others
        have not started yet.

        Args:
            targets: the threads' bodies.
            pieces: how many more members to count alive that are not threads: parts of the stage
                that run as callbacks and tasks on the run's event loop. Each one counts itself
                out with :meth:`leave`, and the last member out, thread or not, ends the stage.

        Returns:
            Whether anything was started: not once the stage ended or was cancelled.

        Raises:
            RuntimeError: a thread could not start; those not started, and the pieces, are
                counted out.
        """
        first = self._reserve(len(targets), None, pieces)
        if first is None:
            return False
        for offset, target in enumerate(targets):
            try:
                self._launch(first + offset, target, ())
            except BaseException:
                for _ in targets[offset + 1 :]:
                    self._exit(False)
                for _ in range(pieces):
                    self._exit(False, thread=False)
                raise
        return True

    def leave(self, saw_end: bool) -> None:
        """Count out one of the ``pieces`` of :meth:`start_all` (it saw the end, or not)."""
        self._exit(saw_end, thread=False)

    def _reserve(self, count: int, limit: int | None, pieces: int = 0) -> int | None:
        with self._lock:
            if self.ended or self.scope.cancelled[0]:
                return None
            if limit is not None and self.busy + self._returning + count > limit:
                return None
            index = self.spawned
            self.spawned += count
            self.alive += count + pieces
            if self.busy > self.most:
                self.most = self.busy
        for _ in range(count):
            self.run.thread_started()
        return index

    @property
    def busy(self) -> int:
        """The places under ``limit`` taken: own threads not away, and borrowed ones."""
        return self.alive - self.away + self.borrowed

    @property
    def awaited(self) -> bool:
        """Whether a thread of this crew waits in :meth:`come_back` for a place: the next place
        given up goes to it. An unlocked read, a hint: it may be stale by the time it is used."""
        return self._returning > 0

    def full(self, limit: int) -> bool:
        """Whether every place under ``limit`` is taken (or waited for)."""
        with self._lock:
            return self.busy + self._returning >= limit

    def borrow(self, limit: int) -> bool:
        """Count a thread of another crew in as one of this crew's, for one batch of calls.

        The thread stays its own crew's (it is counted in the run there, and that crew's end
        waits for it); here it takes a place under ``limit`` while it runs this stage's calls.
        Refused once the stage ended, was cancelled or is full.
        """
        with self._lock:
            if self.ended or self.scope.cancelled[0] or self.busy + self._returning >= limit:
                return False
            self.borrowed += 1
            if self.busy > self.most:
                self.most = self.busy
        return True

    def go_away(self) -> None:
        """Count one of this crew's threads away (borrowed by the next stage's crew) until it
        calls :meth:`come_back`, so that the stage may start another thread in its place, or let
        one waiting in :meth:`come_back` go on."""
        with self._lock:
            self.away += 1
            if self._returning:
                self._place.notify()

    def give_back(self) -> None:
        """End a :meth:`borrow`."""
        with self._lock:
            self.borrowed -= 1
            if self._returning:
                self._place.notify()

    def come_back(self, limit: int) -> None:
        """A thread of this crew counted away by :meth:`go_away` is back.

        If another thread took its place meanwhile (the crew is over ``limit`` with it), it waits
        until a place frees: a thread goes away, leaves, or gives a borrowed place back (each
        notifies), or the stage ends or is cancelled (its threads leave). It does not leave
        itself: the next thread to go away finds it there instead of starting one.
        """
        with self._lock:
            while self.busy >= limit and not self.ended and not self.scope.cancelled[0]:
                self._returning += 1
                try:
                    self._place.wait()
                finally:
                    self._returning -= 1
            self.away -= 1
            # Back after the end or a cancel without waiting for a place, it only sees the end
            # and runs no call: it takes no place, and does not count in the peak.
            if self.busy > self.most and not self.ended and not self.scope.cancelled[0]:
                self.most = self.busy

    def _launch(self, index: int, target: Callable[..., bool], args: tuple[Any, ...]) -> None:
        name = f"{PREFIX}{self.name}-{index}"
        try:
            if self.pooled:
                _POOL.launch(name, self._main, (target, (index, *args)))
            else:
                threading.Thread(
                    target=self._main, args=(target, (index, *args)), name=name, daemon=True
                ).start()
        except BaseException:
            # No thread, so nobody runs _main's exit accounting: undo it here.
            self._exit(False)
            raise

    def _main(self, target: Callable[..., bool], args: tuple[Any, ...]) -> None:
        from ._run import release_frames

        saw_end = False
        try:
            saw_end = target(*args)
        finally:
            del target, args
            release_frames()
            if self.pooled:
                # Renamed before it is counted out: once the run is done, no thread bears its
                # stages' names, though this one lives on, parked.
                threading.current_thread().name = IDLE_NAME
            self._exit(saw_end)
            # This frame stays reachable (as ``f_back``) from any frame the thread left in a
            # traceback: it must not hold the crew, which holds the run.
            del self

    def _exit(self, saw_end: bool, thread: bool = True) -> None:
        with self._lock:
            self.alive -= 1
            last = self.alive == 0
            if saw_end:
                self.ended = True
            ended = self.ended
            if self._returning:
                self._place.notify_all()
        try:
            if last:
                on_last, self._on_last = self._on_last, None  # it may hold the stage: no cycle
                if on_last is not None:
                    on_last()
                if ended and self.out is not None and not self.scope.cancelled[0]:
                    self.out.put_end()
        finally:
            if thread:
                # A piece on the loop is not one of the run's threads: the loop thread, which the
                # stage holds until its last member is out, counts for it.
                self.run.thread_exited()
