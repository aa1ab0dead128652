"""A failure is raised to the caller as the very object raised, labelled, and stops everything."""

from __future__ import annotations

import itertools
import threading
import traceback
from collections.abc import Iterator

import pytest

from threadpipe import Pipeline


class Boom(Exception):
    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg, code)
        self.code = code


class Fatal(BaseException):
    pass


def failing_at(bad: int, raised: list[BaseException], exc_type: type[BaseException] = Boom):  # type: ignore[no-untyped-def]
    def fn(x: int) -> int:
        if x == bad:
            exc = exc_type("bad item", 7) if exc_type is Boom else exc_type("fatal")
            raised.append(exc)
            raise exc
        return x

    return fn


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("ordered", [True, False])
def test_worker_exception_is_the_same_object_with_a_note(workers: int, ordered: bool) -> None:
    raised: list[BaseException] = []
    p = Pipeline.from_iter(range(100)).map(failing_at(37, raised), workers=workers, ordered=ordered, name="check")
    with pytest.raises(Boom) as info:
        p.to_list()
    assert info.value is raised[0]
    assert info.value.args == ("bad item", 7) and info.value.code == 7
    assert info.value.__notes__ == ["threadpipe: raised in stage 'check' while processing item 37"]
    # The original traceback is kept: the frame of the failing function is in it.
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "fn" in frames


def test_join_raises_the_same_object_again() -> None:
    raised: list[BaseException] = []
    run = Pipeline.from_iter(range(10)).map(failing_at(3, raised)).start()
    with pytest.raises(Boom) as first:
        list(run)
    with pytest.raises(Boom) as second:
        run.join(10)
    assert first.value is second.value is raised[0]
    assert len(first.value.__notes__) == 1
    assert run.exception is raised[0]


def test_base_exceptions_are_carried_too() -> None:
    raised: list[BaseException] = []
    with pytest.raises(Fatal) as info:
        Pipeline.from_iter(range(10)).map(failing_at(2, raised, Fatal), workers=2).run()
    assert info.value is raised[0]


def test_source_exception_is_raised_as_itself() -> None:
    err = Boom("source broke", 1)

    def source() -> Iterator[int]:
        yield 1
        raise err

    with pytest.raises(Boom) as info:
        Pipeline.from_iter(source()).map(lambda x: x).to_list()
    assert info.value is err
    assert info.value.__notes__ == ["threadpipe: raised by the 'source' iterator"]


def test_note_cuts_a_long_item_short_and_survives_a_broken_repr() -> None:
    class BadRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    def fail(x: object) -> None:
        raise ValueError("x")

    with pytest.raises(ValueError) as info:
        Pipeline.from_iter(["y" * 10_000]).map(fail).run()
    assert len(info.value.__notes__[0]) < 200
    with pytest.raises(ValueError) as info:
        Pipeline.from_iter([BadRepr()]).map(fail).run()
    assert "BadRepr" in info.value.__notes__[0]


def test_a_downstream_failure_stops_an_infinite_source_blocked_on_a_full_buffer() -> None:
    closed = threading.Event()
    raised: list[BaseException] = []

    def source() -> Iterator[int]:
        try:
            yield from itertools.count()
        finally:
            closed.set()

    p = (
        Pipeline.from_iter(source())
        .map(lambda x: x, workers=2)
        .backpressure(1)
        .map(lambda x: x, workers=3, ordered=False)
        .backpressure(1)
        .map(failing_at(500, raised))
    )
    with pytest.raises(Boom) as info:
        for _ in p:
            pass
    assert info.value is raised[0]
    assert closed.wait(10), "the source generator was not closed"


def test_first_failure_wins_and_no_function_runs_after_it() -> None:
    started = threading.Barrier(3, timeout=10)
    release = threading.Event()
    calls: list[int] = []
    first = Boom("first", 1)

    def fn(x: int) -> int:
        calls.append(x)
        if x == 0:
            started.wait()
            raise first
        if x in (1, 2):
            started.wait()
            release.wait(10)
            raise Boom("later", 2)
        return x

    run = Pipeline.from_iter(range(100)).map(fn, workers=3, ordered=False).backpressure(1).start()
    with pytest.raises(Boom) as info:
        list(run)
    assert info.value is first
    release.set()
    with pytest.raises(Boom) as again:
        run.join(10)
    assert again.value is first
    assert sorted(calls) == [0, 1, 2]
