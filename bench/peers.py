"""One runner per library: the same chain of stages, written in each library's own API.

Every runner has the same shape, ``(stage_fns, items, concurrency, buffer) -> Iterator``:
it builds the pipeline, yields every output as the library delivers it and, once the
outputs are exhausted, has joined the library's threads. Timing the exhaustion of the
iterator therefore covers "building the pipeline" to "last output consumed, run joined".

``buffer`` is the bound on the queue between consecutive stages; ``None`` means the
library's default, which is what a user gets without tuning. Libraries are imported inside
their runner so that a missing one fails only its own rows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

StageFn = Callable[[Any], Any]
Runner = Callable[[Sequence[StageFn], Iterable[Any], int, "int | None"], Iterator[Any]]


class NotApplicable(Exception):
    """Raised when a library has no way to express the requested configuration."""


def build_threadpipe(
    stage_fns: Sequence[StageFn],
    items: Iterable[Any],
    concurrency: int,
    buffer: int | None,
    first_buffer: int | None = None,
) -> Any:
    """Builds (without starting) the threadpipe Pipeline that ``run_threadpipe`` runs.

    Args:
        stage_fns: One function per stage, each a ``map`` with ``concurrency`` unordered workers.
        items: The source items.
        concurrency: Workers per stage.
        buffer: If given, ``.backpressure(buffer)`` before every stage and after the last.
        first_buffer: If given, the buffer before the first stage holds this many items instead.

    Returns:
        The ``threadpipe.Pipeline``.
    """
    import threadpipe as tp

    pipeline = tp.Pipeline.from_iter(items)
    for index, fn in enumerate(stage_fns):
        size = first_buffer if index == 0 and first_buffer is not None else buffer
        if size is not None:
            pipeline = pipeline.backpressure(size)
        pipeline = pipeline.map(fn, workers=concurrency, ordered=False, name=f"s{index + 1}")
    if buffer is not None:
        pipeline = pipeline.backpressure(buffer)
    return pipeline


def threadpipe_bound(
    stage_fns: Sequence[StageFn], concurrency: int, buffer: int | None
) -> int | None:
    """The documented item bound of that pipeline, if this threadpipe has ``buffer_bound()``."""
    bound = getattr(build_threadpipe(stage_fns, (), concurrency, buffer), "buffer_bound", None)
    return None if bound is None else int(bound())


def run_threadpipe(
    stage_fns: Sequence[StageFn],
    items: Iterable[Any],
    concurrency: int,
    buffer: int | None,
    first_buffer: int | None = None,
) -> Iterator[Any]:
    """Runs the stages as a threadpipe Pipeline (see ``build_threadpipe``), unordered.

    Yields:
        The outputs of the last stage, in completion order.
    """
    run = build_threadpipe(stage_fns, items, concurrency, buffer, first_buffer).start()
    with run:
        yield from run
        run.join()


def run_pypeln(
    stage_fns: Sequence[StageFn], items: Iterable[Any], concurrency: int, buffer: int | None
) -> Iterator[Any]:
    """Runs the stages with ``pypeln.thread.map`` (completion order).

    Args:
        stage_fns: One function per stage.
        items: The source items.
        concurrency: ``workers`` per stage.
        buffer: ``maxsize`` of every stage; ``None`` keeps pypeln's default 0 (unbounded).

    Yields:
        The outputs of the last stage.
    """
    import pypeln as pl

    stage: Any = items
    for fn in stage_fns:
        stage = pl.thread.map(fn, stage, workers=concurrency, maxsize=buffer or 0)
    yield from stage


def run_streamable(
    stage_fns: Sequence[StageFn], items: Iterable[Any], concurrency: int, buffer: int | None
) -> Iterator[Any]:
    """Runs the stages as ``stream(...).map(fn, concurrency=c, as_completed=True)`` (2.x API).

    streamable keeps at most ``concurrency`` items in flight per map, so it is bounded
    without a buffer; with one, ``.buffer(buffer)`` is added around every stage.

    Args:
        stage_fns: One function per stage.
        items: The source items.
        concurrency: ``concurrency`` per map (1 runs the map in the consuming thread).
        buffer: If given, ``.buffer(buffer)`` before every stage and after the last.

    Yields:
        The outputs of the last stage.
    """
    from streamable import stream

    chain: Any = stream(items)
    for fn in stage_fns:
        if buffer is not None:
            chain = chain.buffer(buffer)
        chain = chain.map(fn, concurrency=concurrency, as_completed=True)
    if buffer is not None:
        chain = chain.buffer(buffer)
    yield from chain


def _pyper_source(items: Iterable[Any]) -> Iterable[Any]:
    """Hands the items to pyper's first (branching, single-worker) task."""
    return items


def run_pyper(
    stage_fns: Sequence[StageFn], items: Iterable[Any], concurrency: int, buffer: int | None
) -> Iterator[Any]:
    """Runs the stages as ``task(f, workers=c, throttle=c)`` tasks composed with ``|``.

    pyper's first task must have one worker, so a branching source task feeds the stages.

    Args:
        stage_fns: One function per stage.
        items: The source items.
        concurrency: ``workers`` per task.
        buffer: ``throttle`` of every task; ``None`` uses ``concurrency`` as prescribed.

    Yields:
        The outputs of the last task.
    """
    from pyper import task

    throttle = concurrency if buffer is None else buffer
    pipeline = task(_pyper_source, branch=True, throttle=throttle)
    for fn in stage_fns:
        pipeline = pipeline | task(fn, workers=concurrency, throttle=throttle)
    yield from pipeline(items)


def run_executor(
    stage_fns: Sequence[StageFn], items: Iterable[Any], concurrency: int, buffer: int | None
) -> Iterator[Any]:
    """Chains ``ThreadPoolExecutor.map``, one executor of ``concurrency`` threads per stage.

    ``Executor.map`` submits its whole input before returning and yields in input order:
    that is the behaviour being measured, there is no way to bound it.

    Args:
        stage_fns: One function per stage.
        items: The source items.
        concurrency: ``max_workers`` of each executor.
        buffer: Must be ``None``.

    Yields:
        The outputs of the last stage, in input order.

    Raises:
        NotApplicable: If a buffer bound is requested.
    """
    if buffer is not None:
        raise NotApplicable("Executor.map has no buffer bound")
    with ExitStack() as stack:
        outputs: Iterable[Any] = items
        for fn in stage_fns:
            executor = stack.enter_context(ThreadPoolExecutor(max_workers=concurrency))
            outputs = executor.map(fn, outputs)
        yield from outputs


# The pattern always bounds its queues; this is threadpipe.DEFAULT_BUFFER, so that with
# default settings the reference differs from threadpipe in implementation only.
HANDWRITTEN_BUFFER = 32

# Private, so no user item can be mistaken for the end of the stream (None can).
_SENTINEL = object()


class _Stage:
    """One hand-written stage: ``concurrency`` threads between two bounded queues."""

    def __init__(self, fn: StageFn, q_in: queue.Queue[Any], q_out: queue.Queue[Any], workers: int):
        self.fn = fn
        self.q_in = q_in
        self.q_out = q_out
        self.errors: list[BaseException] = []
        self._running = workers
        self._lock = threading.Lock()

    def work(self) -> None:
        """Worker loop: plain get/put per item until the sentinel arrives."""
        while True:
            item = self.q_in.get()
            if item is _SENTINEL:
                # Re-put so every sibling sees it; the last worker out forwards it downstream.
                self.q_in.put(item)
                with self._lock:
                    self._running -= 1
                    last = self._running == 0
                if last:
                    self.q_out.put(_SENTINEL)
                return
            try:
                result = self.fn(item)
            except BaseException as exc:  # noqa: BLE001 - carried to the consumer; the stage drains
                self.errors.append(exc)
                continue
            del item
            self.q_out.put(result)
            del result  # handed on: a worker waiting for its next item holds nothing


def _feed(items: Iterable[Any], q_out: queue.Queue[Any]) -> None:
    """Source thread: puts every item, then the sentinel."""
    for item in items:
        q_out.put(item)
        del item  # handed on: don't hold it while the source makes the next one
    q_out.put(_SENTINEL)


def run_handwritten(
    stage_fns: Sequence[StageFn], items: Iterable[Any], concurrency: int, buffer: int | None
) -> Iterator[Any]:
    """The pattern written by hand: per stage ``concurrency`` threads and a bounded queue.

    Args:
        stage_fns: One function per stage.
        items: The source items.
        concurrency: Threads per stage.
        buffer: ``maxsize`` of every queue; ``None`` uses ``HANDWRITTEN_BUFFER``.

    Yields:
        The outputs of the last stage, in completion order.

    Raises:
        BaseException: The first exception raised by a stage function, after the drain.
    """
    maxsize = HANDWRITTEN_BUFFER if buffer is None else buffer
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize) for _ in range(len(stage_fns) + 1)]
    stages = [_Stage(fn, queues[i], queues[i + 1], concurrency) for i, fn in enumerate(stage_fns)]
    threads = [threading.Thread(target=_feed, args=(items, queues[0]), name="hand-source")]
    for index, stage in enumerate(stages):
        threads += [
            threading.Thread(target=stage.work, name=f"hand-s{index + 1}-{w}")
            for w in range(concurrency)
        ]
    for thread in threads:
        thread.start()
    while (item := queues[-1].get()) is not _SENTINEL:
        yield item
    for thread in threads:
        thread.join()
    for stage in stages:
        if stage.errors:
            raise stage.errors[0]


def run_sequential(
    stage_fns: Sequence[StageFn], items: Iterable[Any], concurrency: int, buffer: int | None
) -> Iterator[Any]:
    """A plain loop: every stage of an item, one item after the other.

    Raises:
        NotApplicable: For any concurrency but 1 or any buffer.
    """
    if concurrency != 1 or buffer is not None:
        raise NotApplicable("a sequential loop has no workers or buffers")
    for item in items:
        for fn in stage_fns:
            item = fn(item)
        yield item


@dataclass(frozen=True)
class Peer:
    """A library under benchmark.

    Attributes:
        name: Short name used on the command line and in tables.
        runner: The runner function.
        dist: Distribution whose version is reported ("" for the standard library).
    """

    name: str
    runner: Runner
    dist: str


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("threadpipe", run_threadpipe, "threadpipe"),
        Peer("handwritten", run_handwritten, ""),
        Peer("pypeln", run_pypeln, "pypeln"),
        Peer("streamable", run_streamable, "streamable"),
        Peer("pyper", run_pyper, "python-pyper"),
        Peer("executor", run_executor, ""),
        Peer("sequential", run_sequential, ""),
    )
}
