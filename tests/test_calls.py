"""Error policies, retries with backoff, rate limits and per-worker resources."""

from __future__ import annotations

import threading
import time

import pytest

from threadpipe import Pipeline


class Flaky(Exception):
    pass


def failing_on(bad: set[int]):  # type: ignore[no-untyped-def]
    def fn(x: int) -> int:
        if x in bad:
            raise Flaky(x)
        return x

    return fn


@pytest.mark.parametrize("kind", ["map", "filter", "flat_map", "each"])
@pytest.mark.parametrize("workers", [1, 3])
def test_skip_drops_exactly_the_failed_items_and_records_them(kind: str, workers: int) -> None:
    bad = {3, 7, 8}

    def fn(x: int) -> object:
        if x in bad:
            raise Flaky(x)
        return {"map": x, "filter": True, "flat_map": [x], "each": None}[kind]

    run = getattr(Pipeline.from_iter(range(12)), kind)(fn, workers=workers, on_error="skip", name="work").start()
    out = list(run)
    run.join(10)
    assert out == [x for x in range(12) if x not in bad]
    assert sorted(e.item for e in run.errors) == sorted(bad)
    assert all(e.stage == "work" and isinstance(e.exception, Flaky) for e in run.errors)
    assert {s.name: s.errors for s in run.stats()}["work"] == len(bad)


def test_callable_policy_replaces_the_result_and_reraising_aborts() -> None:
    out = Pipeline.from_iter(range(5)).map(failing_on({2}), on_error=lambda exc, item: -item).to_list()
    assert out == [0, 1, -2, 3, 4]

    def strict(exc: BaseException, item: int) -> int:
        raise exc

    with pytest.raises(Flaky):
        Pipeline.from_iter(range(5)).map(failing_on({2}), on_error=strict).to_list()


def test_retries_then_succeeds_and_exhausted_retries_apply_the_policy() -> None:
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x: int) -> int:
        with lock:
            attempts[x] = attempts.get(x, 0) + 1
            n = attempts[x]
        if x % 2 and n <= 2:  # odd items fail twice, then work
            raise Flaky(x)
        if x == 4:
            raise Flaky("always")
        return x

    run = Pipeline.from_iter(range(6)).map(flaky, workers=2, retries=2, retry_delay=0.001, on_error="skip").start()
    assert list(run) == [0, 1, 2, 3, 5]
    run.join(10)
    assert attempts[1] == 3 and attempts[4] == 3 and attempts[0] == 1
    assert [e.item for e in run.errors] == [4]


def test_retry_on_limits_what_is_retried() -> None:
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        raise KeyError(x)

    with pytest.raises(KeyError):
        Pipeline.from_iter([1]).map(fn, retries=3, retry_delay=0.001, retry_on=(Flaky,)).run()
    assert calls == [1]


def test_rate_limit_holds_across_many_workers() -> None:
    starts: list[float] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            starts.append(time.monotonic())
        return x

    rate = 50.0
    Pipeline.from_iter(range(30)).map(fn, workers=16, rate=rate, ordered=False).run()
    starts.sort()
    # Calls start no earlier than their slots, spaced 1/rate apart whatever the worker count. A
    # call's thread may start it a little late (the interpreter lock), so allow 15 ms of that:
    # any 5 consecutive calls span at least 4 intervals, less the lateness of the first.
    spans = [b - a for a, b in zip(starts, starts[4:])]
    assert min(spans) >= 4 / rate - 0.015
    assert starts[-1] - starts[0] >= 29 / rate - 0.015


def test_each_worker_gets_its_own_resource_closed_on_exit_even_on_failure() -> None:
    made: list[object] = []
    closed: list[object] = []
    lock = threading.Lock()

    class Session:
        def __init__(self) -> None:
            with lock:
                made.append(self)

        def close(self) -> None:
            with lock:
                closed.append(self)

    seen: set[int] = set()

    def fetch(x: int, session: Session) -> int:
        seen.add(id(session))
        if x == 50:
            raise Flaky(x)
        return x

    run = Pipeline.from_iter(range(100)).map(fetch, workers=3, resource=Session).start()
    with pytest.raises(Flaky):
        list(run)
    with pytest.raises(Flaky):
        run.join(10)  # every worker has exited, so every resource is closed
    assert made and sorted(map(id, made)) == sorted(map(id, closed))
    assert seen <= {id(s) for s in made}


def test_a_context_manager_resource_is_entered_and_exited() -> None:
    events: list[str] = []

    class Conn:
        def __enter__(self) -> str:
            events.append("enter")
            return "conn"

        def __exit__(self, *exc: object) -> None:
            events.append("exit")

    assert Pipeline.from_iter([1, 2]).map(lambda x, c: (x, c), resource=Conn).to_list() == [(1, "conn"), (2, "conn")]
    assert events == ["enter", "exit"]


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"on_error": "ignore"}, ValueError, "on_error"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": 1.5}, TypeError, "retries"),
        ({"retry_delay": -1}, ValueError, "retry_delay"),
        ({"retry_on": ValueError("x")}, TypeError, "retry_on"),
        ({"rate": 0}, ValueError, "rate"),
        ({"rate": "fast"}, TypeError, "rate"),
        ({"resource": 3}, TypeError, "resource"),
    ],
)
def test_call_options_are_checked_at_build(kwargs, exc, word) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=word):
        Pipeline.from_iter([1]).map(lambda x: x, **kwargs)


def test_item_errors_and_call_options_behave_as_frozen_value_objects() -> None:
    import copy
    import dataclasses
    import pickle

    from threadpipe._calls import CallOptions, ItemError

    exc = ValueError("bad")
    error = ItemError("work", 3, exc)
    assert repr(error) == "ItemError(stage='work', item=3, exception=ValueError('bad'))"
    assert error == ItemError(stage="work", item=3, exception=exc) != ItemError("work", 4, exc)
    assert hash(error) == hash(ItemError("work", 3, exc))
    assert error != ("work", 3, exc) and ItemError.__match_args__ == ("stage", "item", "exception")
    with pytest.raises(TypeError, match="unhashable"):
        hash(ItemError("work", [3], exc))
    options = CallOptions("skip", 2, 0.5, (KeyError,), 3.0, None)
    assert repr(CallOptions()) == (
        "CallOptions(on_error='raise', retries=0, retry_delay=0.1, retry_on=(<class 'Exception'>,), "
        "rate=None, resource=None)"
    )
    assert options == CallOptions(on_error="skip", retries=2, retry_delay=0.5, retry_on=(KeyError,), rate=3.0)
    assert hash(options) == hash(copy.copy(options)) and options != CallOptions()
    assert CallOptions().plain and not options.plain
    for obj, name in ((error, "item"), (options, "rate"), (options, "unknown")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(obj, name)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(options, protocol)) == options
        back = pickle.loads(pickle.dumps(error, protocol))
        assert (type(back), back.stage, back.item, type(back.exception)) == (ItemError, "work", 3, ValueError)


def test_an_item_error_pickles_to_another_process() -> None:
    import base64
    import pickle
    import subprocess
    import sys

    from threadpipe._calls import ItemError

    sent = base64.b64encode(pickle.dumps(ItemError("work", (1, "a"), KeyError("k")))).decode()
    code = (
        "import base64, pickle; "
        f"e = pickle.loads(base64.b64decode({sent!r})); "
        "print(type(e).__name__, e.stage, e.item, repr(e.exception))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "ItemError work (1, 'a') KeyError('k')\n"
