"""Merging pipelines: several pipelines' outputs as the source of one.

Each merged pipeline runs as a run of its own; one pump thread per run moves its outputs into the
merged pipeline's first buffer as they come, in batches. The merged source ends when every run has
ended; a failure in any of them fails the merged run with the very exception; cancelling the merged
run cancels them all.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from ._channel import Channel, Closed

if TYPE_CHECKING:
    from ._pipeline import Pipeline
    from ._run import Run, RunState

__all__ = ["MERGE_NAME", "MergeSource"]

MERGE_NAME = "merge"


class _Canceller:
    """Lets the merged run's cancel reach a merged-in run (the run state closes its closables)."""

    def __init__(self, run: Run[Any]) -> None:
        self._run = run

    def close(self) -> None:
        self._run.cancel()


class MergeSource:
    """A pipeline's source made of other pipelines, whose outputs are interleaved as they come.

    Args:
        pipelines: the pipelines to merge, at least one.

    Raises:
        TypeError: an argument is not a Pipeline, or none is given.
    """

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

    def launch(self, out: Channel, state: RunState) -> None:
        """Start every merged pipeline and a pump thread for each; called by ``Pipeline.start``.

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
        state.closables.extend(_Canceller(run) for run in runs)
        remaining = [len(runs)]
        lock = threading.Lock()
        for i, run in enumerate(runs):
            state.thread_started()
            thread = threading.Thread(
                target=_pump,
                args=(run, out, state, remaining, lock),
                name=f"threadpipe-{MERGE_NAME}-{i}",
                daemon=True,
            )
            try:
                thread.start()
            except BaseException:
                state.thread_exited()
                state.cancel()
                raise


def _pump(run: Run[Any], out: Channel, state: RunState, remaining: list[int], lock: threading.Lock) -> None:
    """Move one merged run's outputs into ``out``; the last pump to see its run end sends the end."""
    channel = run._output
    ended = False
    try:
        while True:
            got = channel.get_many(channel.maxsize)
            assert got is not None
            items = got[0]
            if not items:
                ended = True
                break
            out.put_many(items)
            del items, got
    except Closed:
        # Either the merged run was cancelled (closing this run too), or this run failed.
        error = run._state.error
        if error is not None:
            state.fail(error, MERGE_NAME, None, has_item=False)
        run.cancel()
    finally:
        try:
            if ended:
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last and not state.stop[0]:
                    out.put_end()
            # The merged run is done only when the runs it merged are.
            run._state.done.wait()
        finally:
            state.thread_exited()
