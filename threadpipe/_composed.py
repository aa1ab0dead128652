"""Sources made of other pipelines: merged (interleaved as they come) or concatenated (in turn).

Each pipeline a composed source is made of runs as a run of its own, and a pump thread moves that
run's outputs into the composed pipeline's first buffer, in batches:

* :class:`MergeSource` starts every run at once, one pump each; their outputs interleave as they
  arrive, and the source ends when every run has ended.
* :class:`ConcatSource` has one pump that starts the runs one after another: the next pipeline
  starts only once the run before it has ended (delivered its last output and its threads exited),
  so the outputs come pipeline by pipeline, each in its own order.

Either way a failure in any of them fails the composed run with the very exception, and cancelling
the composed run (or a ``take()`` after it cutting it off) cancels the runs under way and starts
no other.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import TYPE_CHECKING, Any

from ._channel import Channel
from ._scope import Cancelled, Scope
from ._threads import Crew

if TYPE_CHECKING:
    from ._pipeline import Pipeline
    from ._run import Run, RunState

__all__ = ["CONCAT_NAME", "MERGE_NAME", "ConcatSource", "MergeSource"]

MERGE_NAME = "merge"
CONCAT_NAME = "concat"


class _Composed:
    """What merged and concatenated sources share: the pipelines, checked, and the source facts.

    Args:
        pipelines: the pipelines, at least one.

    Raises:
        TypeError: an argument is not a Pipeline, or none is given.
    """

    name = ""  # the building call's name, for messages and the pump threads' names

    is_async = False  # iterated on the run's event loop

    in_memory = False
    iterable = None  # no length to show: progress bars count without a total

    def __init__(self, pipelines: tuple[Pipeline[Any], ...]) -> None:
        from ._pipeline import Pipeline

        if not pipelines:
            raise TypeError(f"{self.name}() needs at least one pipeline")
        for i, pipeline in enumerate(pipelines):
            if not isinstance(pipeline, Pipeline):
                raise TypeError(
                    f"{self.name}() takes pipelines; argument {i} is {type(pipeline).__qualname__}"
                )
        self.pipelines = pipelines

    @property
    def one_shot(self) -> bool:
        """Whether any of the pipelines has a one-shot source."""
        return any(p._source.one_shot for p in self.pipelines)

    def open(self) -> None:
        """Nothing to open here: each pipeline's source is opened when its run starts."""


class _Canceller:
    """Lets the composed run's cancel (or a cut) reach a run of its own: a member of its scope."""

    def __init__(self, run: Run[Any]) -> None:
        self._run = run

    def abort(self) -> None:
        self._run.cancel()


class MergeSource(_Composed):
    """A pipeline's source made of other pipelines, whose outputs are interleaved as they come.

    Made from the pipelines to merge (see :class:`_Composed` for the arguments and errors).
    """

    name = MERGE_NAME

    def held(self, first_capacity: int) -> int:
        """The most items the merged runs hold: each pipeline's own bound.

        That bound counts each run's output buffer twice, the second time for the batch its pump
        takes from it and holds while it puts it on.
        """
        return sum(pipeline.buffer_bound() for pipeline in self.pipelines)

    def launch(self, opened: None, out: Channel, state: RunState, scope: Scope, aio: Any) -> None:
        """Start every merged pipeline and a pump thread for each.

        Raises:
            SourceConsumedError: a merged pipeline's one-shot source was already used.
        """
        runs: list[Run[Any]] = []
        try:
            for pipeline in self.pipelines:
                runs.append(pipeline.start())
        except BaseException:
            for run in runs:
                run.cancel()
            raise
        for run in runs:
            scope.add(_Canceller(run))
        # The last pump out sends the end, if its run ended (see Crew).
        crew = Crew(MERGE_NAME, state, scope, out)
        crew.start_all(
            *(partial(_pump, run=run, out=out, state=state, scope=scope) for run in runs)
        )


class ConcatSource(_Composed):
    """A pipeline's source made of other pipelines, all outputs of one before any of the next.

    Made from the pipelines to concatenate (see :class:`_Composed` for the arguments and errors).
    """

    name = CONCAT_NAME

    def held(self, first_capacity: int) -> int:
        """The most items the runs hold: the largest bound of one pipeline, since one runs at a
        time (the one before it has ended, holding nothing, when the next starts)."""
        return max(pipeline.buffer_bound() for pipeline in self.pipelines)

    def launch(self, opened: None, out: Channel, state: RunState, scope: Scope, aio: Any) -> None:
        """Start the pump thread, which starts the pipelines in turn."""
        turn = _Turn()
        scope.add(turn)
        crew = Crew(CONCAT_NAME, state, scope, out)
        crew.start(_concat, self.pipelines, turn, out, state, scope)


class _Turn:
    """The run of the concatenated pipeline whose turn it is: a member of the composed scope.

    Lock discipline: ``_lock`` makes "start the next run" and "abort" exclusive, so a cancel that
    comes while the pump starts a run either finds that run (and cancels it) or is seen by the pump
    (which then cancels the run it just started).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: Run[Any] | None = None
        self._aborted = False

    def start(self, pipeline: Pipeline[Any]) -> Run[Any] | None:
        """Start ``pipeline``'s run, or return None if the composed run was cancelled.

        Raises:
            SourceConsumedError: its one-shot source was already used.
        """
        if self._aborted:
            return None
        run = pipeline.start()
        with self._lock:
            if not self._aborted:
                self._run = run
                return run
        run.cancel()
        run._state.done.wait()
        return None

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            run, self._run = self._run, None
        if run is not None:
            run.cancel()


def _concat(
    index: int,
    pipelines: tuple[Pipeline[Any], ...],
    turn: _Turn,
    out: Channel,
    state: RunState,
    scope: Scope,
) -> bool:
    """Run the pipelines one after another into ``out``; returns whether the last one ended."""
    for pipeline in pipelines:
        try:
            run = turn.start(pipeline)
        except BaseException as exc:
            state.fail(exc, scope, CONCAT_NAME, None, has_item=False)
            return False
        if run is None or not _pump(index, run, out, state, scope, CONCAT_NAME):
            return False
        del run
    return True


def _pump(
    index: int, run: Run[Any], out: Channel, state: RunState, scope: Scope, name: str = MERGE_NAME
) -> bool:
    """Move one run's outputs into ``out``; returns whether that run ended.

    It returns once the run is done (every thread of it exited): the composed run is done only
    when the runs it is made of are, and a concatenated run starts the next one only then.
    """
    channel = run._output
    ended = False
    try:
        while True:
            got = channel.get_many(channel.maxsize)
            assert got is not None
            items = got[0]
            if not items:
                ended = True
                return True
            out.put_many(items)
            del items, got
    except Cancelled:
        # Either the composed run was cancelled (cancelling this run too), or this run failed.
        error = run._state.error
        if error is not None:
            state.fail(error, scope, name, None, has_item=False)
        run.cancel()
        return False
    finally:
        if not ended:
            run.cancel()
        run._state.done.wait()
