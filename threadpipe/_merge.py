"""Merging pipelines: several pipelines' outputs as the source of one.

Each merged pipeline runs as a run of its own; one pump thread per run moves its outputs into the
merged pipeline's first buffer as they come, in batches. The merged source ends when every run has
ended; a failure in any of them fails the merged run with the very exception; cancelling the merged
run cancels them all.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from ._channel import Channel
from ._scope import Cancelled, Scope
from ._threads import Crew

if TYPE_CHECKING:
    from ._pipeline import Pipeline
    from ._run import Run, RunState

__all__ = ["MERGE_NAME", "MergeSource"]

MERGE_NAME = "merge"


class _Canceller:
    """Lets the merged run's cancel (or a cut) reach a merged-in run: a member of its scope."""

    def __init__(self, run: Run[Any]) -> None:
        self._run = run

    def abort(self) -> None:
        self._run.cancel()


class MergeSource:
    """A pipeline's source made of other pipelines, whose outputs are interleaved as they come.

    Args:
        pipelines: the pipelines to merge, at least one.

    Raises:
        TypeError: an argument is not a Pipeline, or none is given.
    """

    is_async = False  # iterated on the run's event loop

    in_memory = False
    iterable = None  # no length to show: progress bars count without a total

    def __init__(self, pipelines: tuple[Pipeline[Any], ...]) -> None:
        from ._pipeline import Pipeline

        if not pipelines:
            raise TypeError("merge() needs at least one pipeline")
        for i, pipeline in enumerate(pipelines):
            if not isinstance(pipeline, Pipeline):
                raise TypeError(
                    f"merge() takes pipelines; argument {i} is {type(pipeline).__qualname__}"
                )
        self.pipelines = pipelines

    @property
    def one_shot(self) -> bool:
        """Whether any merged pipeline has a one-shot source."""
        return any(p._source.one_shot for p in self.pipelines)

    def held(self, first_capacity: int) -> int:
        """The most items the merged runs hold: each pipeline's own bound.

        That bound counts each run's output buffer twice, the second time for the batch its pump
        takes from it and holds while it puts it on.
        """
        return sum(pipeline.buffer_bound() for pipeline in self.pipelines)

    def open(self) -> None:
        """Nothing to open here: each merged pipeline's source is opened when it starts."""

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
        crew.start_all(*(partial(_pump, run=run, out=out, state=state, scope=scope) for run in runs))


def _pump(index: int, run: Run[Any], out: Channel, state: RunState, scope: Scope) -> bool:
    """Move one merged run's outputs into ``out``; returns whether that run ended."""
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
        # Either the merged run was cancelled (cancelling this run too), or this run failed.
        error = run._state.error
        if error is not None:
            state.fail(error, scope, MERGE_NAME, None, has_item=False)
        run.cancel()
        return False
    finally:
        if not ended:
            run.cancel()
        # The merged run is done only when the runs it merged are.
        run._state.done.wait()
