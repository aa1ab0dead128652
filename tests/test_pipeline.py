"""Building pipelines: results of each operator, argument checks, names, buffers, restarts."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from typing import Any

import pytest

import threadpipe as tp
from threadpipe import Pipeline


def double(x: int) -> int:
    return 2 * x


def test_map_filter_flat_map_each_give_what_plain_python_gives() -> None:
    seen: list[int] = []
    out = (
        Pipeline.from_iter(range(50))
        .map(double, workers=3)
        .filter(lambda x: x % 3 != 0, workers=2)
        .flat_map(lambda x: [x] * (x % 4), workers=2)
        .each(seen.append)
        .to_list()
    )
    expected = [y for x in range(50) for y in [2 * x] * ((2 * x) % 4) if (2 * x) % 3 != 0]
    assert out == expected
    assert seen == expected


def test_none_is_ordinary_data() -> None:
    assert Pipeline.from_iter([None, 0, None]).map(lambda x: x, workers=2).to_list() == [None, 0, None]
    assert Pipeline.from_iter([1, 2]).map(lambda x: None).to_list() == [None, None]


def test_empty_source_and_no_stages() -> None:
    assert Pipeline.from_iter([]).map(double, workers=4).to_list() == []
    assert Pipeline.from_iter("abc").to_list() == ["a", "b", "c"]
    assert Pipeline.from_iter([]).run() == 0


def test_run_returns_the_number_of_outputs() -> None:
    assert Pipeline.from_iter(range(1000)).filter(lambda x: x % 2, workers=2).run() == 500


def test_building_is_lazy_and_immutable() -> None:
    calls: list[int] = []
    base = Pipeline.from_iter(range(3))
    a = base.map(lambda x: calls.append(x) or x)
    assert calls == []
    b = base.map(double)
    assert a.to_list() == [0, 1, 2] and b.to_list() == [0, 2, 4]
    assert base.to_list() == [0, 1, 2]
    assert base.stage_names == ()


def test_reiterable_source_can_run_again_and_one_shot_source_cannot() -> None:
    p = Pipeline.from_iter(range(5)).map(double)
    assert p.to_list() == p.to_list() == [0, 2, 4, 6, 8]
    g = Pipeline.from_iter(x for x in range(3)).map(double)
    assert g.to_list() == [0, 2, 4]
    with pytest.raises(tp.SourceConsumedError, match="one-shot"):
        g.start()


@pytest.mark.parametrize(
    ("call", "exc", "words"),
    [
        (lambda p: p.map(double, workers=0), ValueError, ["workers", "0"]),
        (lambda p: p.map(double, workers=-3), ValueError, ["workers", "-3"]),
        (lambda p: p.map(double, workers=2.0), TypeError, ["workers", "2.0"]),
        (lambda p: p.map(double, workers=True), TypeError, ["workers", "True"]),
        (lambda p: p.map(double, workers="4"), TypeError, ["workers", "'4'"]),
        (lambda p: p.map(3), TypeError, ["fn", "3"]),
        (lambda p: p.each(None), TypeError, ["fn", "None"]),
        (lambda p: p.map(double, ordered="yes"), TypeError, ["ordered", "'yes'"]),
        (lambda p: p.map(double, name=""), TypeError, ["name", "''"]),
        (lambda p: p.backpressure(0), ValueError, ["n", "0"]),
        (lambda p: p.backpressure(None), TypeError, ["n", "None"]),
    ],
)
def test_bad_arguments_fail_at_build_naming_parameter_and_value(call, exc, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc) as info:
        call(Pipeline.from_iter([1]))
    for word in words:
        assert word in str(info.value)


def test_from_iter_needs_an_iterable() -> None:
    with pytest.raises(TypeError, match="iterable.*42"):
        Pipeline.from_iter(42)  # type: ignore[arg-type]


def test_stage_names_default_to_the_function_and_are_unique() -> None:
    p = Pipeline.from_iter([1]).map(double).map(double).map(lambda x: x).filter(bool, name="keep")
    assert p.stage_names == ("double", "double2", "map", "keep")
    with pytest.raises(ValueError, match="'keep'"):
        p.map(double, name="keep")


def test_backpressure_sizes_the_next_buffer_and_the_bound_adds_up() -> None:
    p = Pipeline.from_iter([1]).backpressure(5).map(double).backpressure(7).map(double, workers=3)
    assert p.output_capacity == tp.DEFAULT_BUFFER
    with p.start() as run:
        assert [s.inp.maxsize for s in run._stages] == [5, 7]
        assert list(run) == [4]
    q = p.backpressure(2)
    assert q.output_capacity == 2
    # buffer 5 + its worker 5; buffer 7 + workers ceil(7/1) + ceil(7/2) + ceil(7/3), twice for
    # reordering; the output buffer and the batch the caller took from it; the feeder takes a
    # buffer's worth (5) at a time from a list, one item at a time from a generator.
    assert q.buffer_bound() == (5 + 5) + (7 + 2 * (7 + 4 + 3)) + 2 * 2 + 5
    g = Pipeline.from_iter(iter([1])).flat_map(lambda x: [x], workers=2).backpressure(3)
    # buffer 32 + workers 32 + 16, + 2 workers streaming 3 outputs each and up to one buffer's
    # worth (3) parked in the reorder buffer (more waits its turn); output 3 x 2
    assert g.buffer_bound() == 1 + (32 + 48 + 2 * 3 + 3) + 2 * 3


def test_a_buffer_not_sized_next_to_a_coroutine_stage_holds_its_workers_items() -> None:
    # DEFAULT_BUFFER at least; more when a coroutine stage writes it or reads it, so that all its
    # coroutines can hand on or be given an item in the same turn of the loop. A thread stage's
    # input buffer stays at DEFAULT_BUFFER.
    async def adouble(x: int) -> int:
        return 2 * x

    p = (
        Pipeline.from_iter(range(100))
        .map(adouble, workers=50)  # source -> 50 coroutines: 50
        .map(double, workers=64)  # 50 coroutines -> 64 threads: 50
        .map(double, workers=64)  # threads -> threads: 32
        .map(adouble, workers=40)  # threads -> 40 coroutines: 40
        .backpressure(6)
        .map(adouble, workers=70)  # sized: 6
    )  # 70 coroutines -> the caller: 70
    assert p.output_capacity == 70
    with p.start() as run:
        assert [s.inp.maxsize for s in run._stages] == [50, 50, 32, 40, 6]
        assert run._output.maxsize == 70
        assert sorted(run) == [32 * x for x in range(100)]
    threads = Pipeline.from_iter(range(3)).map(double, workers=200).map(double, workers=300)
    assert [s.capacity for s in threads._stages] == [32, 32]
    assert threads.output_capacity == 300  # the caller's: see the next test


def test_the_callers_buffer_holds_by_default_as_many_items_as_the_last_stage_has_workers() -> None:
    p = Pipeline.from_iter(range(100)).map(double, workers=50).map(double, workers=2)
    assert p.output_capacity == tp.DEFAULT_BUFFER
    wide = p.map(double, workers=40)
    assert wide.output_capacity == 40
    assert wide.backpressure(3).output_capacity == 3
    assert wide.buffer_bound() == p.map(double, workers=40).backpressure(40).buffer_bound()
    with wide.start() as run:
        # Between stages, the default: only the caller's buffer follows the stage's width.
        assert [s.inp.maxsize for s in run._stages] == [tp.DEFAULT_BUFFER] * 3
        assert run._output.maxsize == 40
        assert sorted(run) == [8 * x for x in range(100)]


def test_memory_stays_within_the_documented_bound() -> None:
    pulled = itertools.count()
    release = __import__("threading").Event()

    def source() -> Iterator[int]:
        for i in itertools.count():
            next(pulled)
            yield i

    p = Pipeline.from_iter(source()).map(double, workers=2).backpressure(4).map(double, workers=3).backpressure(3)
    run = p.start()
    # Nobody reads the output: the run must stop pulling the source once every buffer is full.
    import time

    deadline = time.monotonic() + 10
    channels = [stage.inp for stage in run._stages] + [run._output]
    while any(ch.qsize() < ch.maxsize for ch in channels) and time.monotonic() < deadline:
        release.wait(0.01)
    n1 = next(pulled)  # the source's pulls so far
    release.wait(0.2)  # give a runaway source the chance to show itself
    n2 = next(pulled)  # the source's pulls so far, plus this test's first
    run.cancel()
    run.join(10)
    assert n1 <= p.buffer_bound() + 1
    # Every buffer seen full is not the run at rest: a worker still holding a batch then goes on
    # until it blocks, and the source may be pulled a few more times (CI saw 16). Never past the
    # bound, which a source pulled with nowhere for its items to go passes within the 0.2 s.
    assert n2 - 1 <= p.buffer_bound() + 1, "the source kept being pulled past the bound"


def test_repr_names_the_stages() -> None:
    p = Pipeline.from_iter([1]).map(double, workers=2)
    assert "double" in repr(p) and "workers=2" in repr(p)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: p.take(-1), "take(): n must be an int >= 0, got -1"),
        (lambda p: p.skip(-2), "skip(): n must be an int >= 0, got -2"),
        (lambda p: p.backpressure(0), "backpressure(): n must be an int >= 1, got 0"),
        (lambda p: p.relief_valve(0), "relief_valve(): n must be an int >= 1, got 0"),
        (lambda p: p.batch(0), "batch(): n must be an int >= 1, got 0"),
        (lambda p: p.map(abs, workers=0), "map(): workers must be an int >= 1, got 0"),
        (lambda p: p.flat_map(abs, workers=-1), "flat_map(): workers must be an int >= 1, got -1"),
    ],
)
def test_a_count_out_of_range_names_the_call_the_parameter_the_bound_and_the_value(
    build: Any, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        build(Pipeline.from_iter([1]))
    assert str(info.value) == message


def test_a_count_of_the_wrong_type_names_the_call() -> None:
    with pytest.raises(TypeError, match=r"^take\(\): n must be an int >= 0, got 1.5 \(float\)$"):
        Pipeline.from_iter([1]).take(1.5)  # type: ignore[arg-type]


def test_len_is_known_when_the_source_has_one_and_every_stage_keeps_the_count() -> None:
    base = Pipeline.from_iter(range(10))
    assert len(base.map(str, workers=2).each(print).map(len)) == 10
    assert len(base.map(str).take(3)) == 3
    assert len(base.take(30)) == 10
    assert operator.length_hint(base.map(str)) == 10
    for unknown in (
        base.filter(bool),
        base.flat_map(lambda x: [x]),
        base.map(str, on_error="skip"),
        Pipeline.from_iter(x for x in range(10)),
    ):
        with pytest.raises(TypeError, match="length is not known"):
            len(unknown)
        assert operator.length_hint(unknown, -1) == -1
        assert unknown  # never false, whatever its length


def test_tqdm_over_a_pipeline_or_a_run_shows_the_total(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from tqdm import tqdm

    monkeypatch.setattr(tqdm, "monitor_interval", 0)  # no tqdm monitor thread to outlive the test

    p = Pipeline.from_iter(range(7)).map(lambda x: x * 2)
    with tqdm(p, file=io.StringIO(), disable=False) as bar:
        assert bar.total == 7
        assert list(bar) == [0, 2, 4, 6, 8, 10, 12]
    run = p.start()
    assert len(run) == 7
    with tqdm(run, file=io.StringIO(), disable=False) as bar:
        assert bar.total == 7
        assert sum(1 for _ in bar) == 7


def test_over_runs_the_same_stages_over_other_inputs() -> None:
    chain = Pipeline.from_iter([]).map(double, workers=3).filter(lambda x: x % 3 != 0).backpressure(4)
    assert chain.to_list() == []
    assert chain.over([1, 2, 3]).to_list() == [2, 4]
    assert chain.over(range(10)).to_list() == [2 * x for x in range(10) if 2 * x % 3 != 0]
    over_gen = chain.over(x for x in range(7))
    assert over_gen.to_list() == [2, 4, 8, 10]
    with pytest.raises(tp.SourceConsumedError):
        over_gen.start()  # a one-shot source feeds one run of the pipeline over it
    assert chain.over(x for x in range(7)).to_list() == [2, 4, 8, 10]  # a fresh one: fine
    over = chain.over(range(3))
    assert over.stage_names == chain.stage_names and over.output_capacity == 4
    assert chain.to_list() == []  # unchanged


def test_over_needs_an_iterable_and_says_so() -> None:
    with pytest.raises(TypeError, match=r"over\(iterable\) needs an iterable, got 42"):
        Pipeline.from_iter([]).over(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "each"])
def test_the_call_options_are_spelled_out_in_the_signature_and_the_docs(method: str) -> None:
    import inspect

    params = inspect.signature(getattr(Pipeline, method)).parameters
    for option in ("retries", "retry_delay", "retry_on", "rate", "on_error", "resource",
                   "timeout", "executor", "workers", "ordered", "name"):
        assert option in params, option
        assert params[option].kind is inspect.Parameter.KEYWORD_ONLY
    doc = Pipeline.map.__doc__ or ""
    for option in ("retries:", "retry_delay:", "retry_on:", "rate:", "on_error:", "resource:"):
        assert option in doc, option


def test_the_internal_constructor_stays_out_of_sight() -> None:
    import pydoc

    text = pydoc.render_doc(Pipeline, renderer=pydoc.plaintext)
    # The class's signature is the bare Pipeline(), not the source/stages constructor.
    assert "Pipeline(source" not in text and "next_capacity: int" not in text
    with pytest.raises(TypeError, match=r"Pipeline\.from_iter"):
        Pipeline()  # type: ignore[call-arg]


def test_call_options_with_their_defaults_do_not_count_as_given() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        p = Pipeline.from_iter([1, 2]).map(abs, executor=pool, retries=0, rate=None)
        assert p.to_list() == [1, 2]
        with pytest.raises(TypeError, match="retries: not available with executor="):
            Pipeline.from_iter([1]).map(abs, executor=pool, retries=1)
