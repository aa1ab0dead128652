"""Wiring a run: from a pipeline as built to its channels, scopes, runtimes and threads.

``Pipeline`` only describes (``_pipeline.py``); ``wire`` makes one run of that description:

* one bounded channel per link, the source's output first, the caller's input last;
* the scopes (``_scope.py``): the run's root, and a new segment at every operator that can end
  the run early; each channel joins the scope of the stage that writes it, so cutting a segment off
  wakes whoever waits on what that segment writes;
* one runtime per stage (``runtime_of``), all with the protocol of ``_stage.Runtime``, and the run's
  event loop if a stage or the source is async;
* the source launched, the stages started, the monitor (bars, samples) if asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ._channel import Channel, ReliefChannel
from ._executor import ExecutorStage
from ._operators import (
    BATCH,
    GROUP_BY,
    OPERATOR_KINDS,
    PIPE,
    SKIP_WHILE,
    TAKE,
    TAKE_WHILE,
    BatchStage,
    GroupStage,
    PipeStage,
    SkipWhileStage,
    TakeStage,
    TakeWhileStage,
)
from ._run import Run, RunState
from ._source import SOURCE_NAME
from ._stage import Runtime, Stage, StageSpec

if TYPE_CHECKING:
    from ._aio import LoopThread

__all__ = ["runtime_of", "wire"]

_OPERATOR_RUNTIMES: Final[dict[str, type[Runtime]]] = {
    PIPE: PipeStage,
    TAKE: TakeStage,
    TAKE_WHILE: TakeWhileStage,
    SKIP_WHILE: SkipWhileStage,
    BATCH: BatchStage,
    GROUP_BY: GroupStage,
}

# Stream operators that can end a run early: each starts a new segment (see ``_scope``).
_CUT_POINTS: Final = frozenset({PIPE, TAKE, TAKE_WHILE})


def runtime_of(spec: StageSpec) -> type[Any]:
    """The class that runs ``spec`` in a run: a pool of threads, the one thread of a stream
    operator, the two threads around an executor or around coroutines on the run's loop.

    Each has the protocol of ``_stage.Runtime``: made with ``(spec, inp, out, run, scope)`` (a
    coroutine stage is made by the run's loop, which it needs too), ``start()``, ``spawned``,
    ``counters``, and the class methods ``held``, ``held_outputs`` and ``weight``, its part of
    ``Pipeline.buffer_bound()``.
    """
    if spec.kind in OPERATOR_KINDS:
        return _OPERATOR_RUNTIMES[spec.kind]
    if spec.coroutine:
        from ._aio import CoroutineStage  # here, not at the top: only such runs import asyncio

        return CoroutineStage
    return Stage if spec.executor is None else ExecutorStage


def wire(
    source: Any,
    specs: tuple[StageSpec, ...],
    output_capacity: int,
    output_relief: bool,
    length: int | None,
    bar_options: Mapping[str, Any] | None,
    trace_cap: int,
    monitor: bool,
) -> Run[Any]:
    """Make and start one run.

    Args:
        source: the pipeline's source (``open()``, ``launch(...)``, ``held()``, ``is_async``).
        specs: the stages, in order.
        output_capacity: the capacity of the buffer the caller reads.
        output_relief: that buffer is a relief valve.
        length: how many outputs the run makes, when known (``len(run)``).
        bar_options: tqdm keyword arguments for progress bars, or None for none.
        trace_cap: the most calls to record, or 0 for no trace.
        monitor: sample the run for ``report()`` (implied by bars).

    Returns:
        The started run.

    Raises:
        SourceConsumedError: a one-shot source was consumed by an earlier run.
    """
    watcher = None
    if bar_options is not None or monitor:
        # Here, not at the top: only monitored runs import the monitor, the bars and statistics.
        from ._monitor import Monitor
        from ._progress import Bars, source_length

        # The bars are drawn now, in the caller's thread: a bad tqdm argument fails here.
        bars = None
        if bar_options is not None:
            bars = Bars(specs, bar_options, source_length(source.iterable))
        watcher = Monitor(bars)
    try:
        # Before any thread starts: a one-shot source used before fails here, cleanly.
        opened = source.open()
    except BaseException:
        if watcher is not None:
            watcher.close()
        raise
    state = RunState()
    if trace_cap:
        from ._trace import Tracer  # the recorder; the trace options were imported with the pipeline

        state.trace = Tracer(tuple(spec.name for spec in specs), trace_cap, state.clock.started)
    aio: LoopThread | None = None
    if source.is_async or any(spec.coroutine for spec in specs):
        from ._aio import LoopThread  # here, not at the top: only such runs import asyncio

        aio = LoopThread(state)
    capacities = [spec.capacity for spec in specs] + [output_capacity]
    names = [SOURCE_NAME, *(spec.name for spec in specs)]
    reliefs = [spec.relief for spec in specs] + [output_relief]
    # Who writes each channel, and who reads it, is on the loop: an async source, a coroutine stage.
    # A container in memory feeds a coroutine stage from the loop too: taking its items cannot block.
    feeds_loop = bool(specs) and bool(specs[0].coroutine) and getattr(source, "in_memory", False)
    writers_on_loop = [source.is_async or feeds_loop, *(bool(spec.coroutine) for spec in specs)]
    readers_on_loop = [*(bool(spec.coroutine) for spec in specs), False]
    channels: list[Channel] = []
    for cap, name, relief, writer_on_loop, reader_on_loop in zip(
        capacities, names, reliefs, writers_on_loop, readers_on_loop, strict=True
    ):
        if aio is not None and writer_on_loop and not relief:
            # Written on the loop, without a thread in between; read there too, when the reader
            # is on the loop: the items stay on it.
            from ._loopchannel import LoopChannel, LoopLink

            channels.append((LoopLink if reader_on_loop else LoopChannel)(cap, name, aio))
        else:
            channels.append((ReliefChannel if relief else Channel)(cap, name))
    state.channels = channels
    scopes = []
    scope = state.segments[0]
    for spec in specs:
        if spec.kind in _CUT_POINTS:
            scope = state.segment()
        scopes.append(scope)
    for channel, writer in zip(channels, [state.segments[0], *scopes], strict=True):
        writer.add(channel)
    stages = tuple(
        aio.stage(spec, channels[i], channels[i + 1], scopes[i])
        if aio is not None and spec.coroutine
        else runtime_of(spec)(spec, channels[i], channels[i + 1], state, scopes[i])
        for i, spec in enumerate(specs)
    )
    run: Run[Any] = Run(state, channels[-1], stages, watcher, length)
    # Count the starting itself as a live thread, so the run cannot look done (every thread
    # exited) between the feeder finishing a short source and the first worker starting.
    state.thread_started()
    try:
        if aio is not None:
            aio.start()
        source.launch(opened, channels[0], state, state.segments[0], aio)
        for stage in stages:
            stage.start()
        if watcher is not None:
            watcher.start(stages, channels[-1], state)
    except BaseException:
        state.cancel()
        if watcher is not None:
            watcher.close()
        raise
    finally:
        state.thread_exited()
    return run
