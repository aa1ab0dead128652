"""The threads of a stage: started counted and with rollback; the last one out ends the stage.

Every runtime (the worker pool, a one-thread operator, the two threads of a coroutine or executor
stage, a source's feeder, the pumps of a merge, the run's event loop) starts its threads through a
:class:`Crew`. The crew

* counts each thread in the run before it starts, and counts it out if ``Thread.start`` fails, so
  the run is done exactly when every thread it started has exited;
* names it ``threadpipe-<stage>-<i>``, so a thread dump reads like the pipeline;
* sends the end of input on when its last thread exits, if one of them saw the end and the stage's
  scope was not cancelled: ending is the sentinel, never a side effect of a cancel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._channel import Channel
    from ._run import RunState
    from ._scope import Scope

__all__ = ["PREFIX", "Crew", "in_library_thread"]

PREFIX = "threadpipe-"


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
    """

    __slots__ = ("_lock", "_on_last", "alive", "ended", "name", "out", "run", "scope", "spawned")

    def __init__(
        self,
        name: str,
        run: RunState,
        scope: Scope,
        out: Channel | None,
        on_last: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.run = run
        self.scope = scope
        self.out = out
        self._on_last = on_last
        # ``_lock`` guards the three counts: ``alive`` and ``ended`` change together, so the last
        # thread out is known exactly and the end goes on once.
        self._lock = threading.Lock()
        self.spawned = 0
        self.alive = 0
        self.ended = False

    def start(self, target: Callable[..., bool], *args: Any, limit: int | None = None) -> bool:
        """Start thread number ``i``, running ``target(i, *args)``; it returns whether it saw the end.

        Args:
            target: the thread's body.
            args: its arguments.
            limit: start nothing if this many threads were started already.

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

    def start_all(self, *targets: Callable[[int], bool]) -> None:
        """Start one thread per target, each as ``target(i)``, all counted alive before any starts.

        So that none of them can exit as the "last" thread (and end the stage) while the others
        have not started yet.

        Raises:
            RuntimeError: a thread could not start; those not started are counted out.
        """
        first = self._reserve(len(targets), None)
        if first is None:
            return
        for offset, target in enumerate(targets):
            try:
                self._launch(first + offset, target, ())
            except BaseException:
                for _ in targets[offset + 1 :]:
                    self._exit(False)
                raise

    def _reserve(self, count: int, limit: int | None) -> int | None:
        with self._lock:
            if self.ended or self.scope.cancelled[0]:
                return None
            if limit is not None and self.spawned + count > limit:
                return None
            index = self.spawned
            self.spawned += count
            self.alive += count
        for _ in range(count):
            self.run.thread_started()
        return index

    def _launch(self, index: int, target: Callable[..., bool], args: tuple[Any, ...]) -> None:
        thread = threading.Thread(
            target=self._main,
            args=(target, (index, *args)),
            name=f"{PREFIX}{self.name}-{index}",
            daemon=True,
        )
        try:
            thread.start()
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
            self._exit(saw_end)
            # This frame stays reachable (as ``f_back``) from any frame the thread left in a
            # traceback: it must not hold the crew, which holds the run.
            del self

    def _exit(self, saw_end: bool) -> None:
        with self._lock:
            self.alive -= 1
            last = self.alive == 0
            if saw_end:
                self.ended = True
            ended = self.ended
        try:
            if last:
                on_last, self._on_last = self._on_last, None  # it may hold the stage: no cycle
                if on_last is not None:
                    on_last()
                if ended and self.out is not None and not self.scope.cancelled[0]:
                    self.out.put_end()
        finally:
            self.run.thread_exited()
