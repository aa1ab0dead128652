"""Random chains of stages against plain Python (hypothesis)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadpipe import Pipeline

# Each operator: (kind, function, the plain-Python equivalent over a list).
OPS: dict[str, tuple[str, Callable[[int], Any], Callable[[list[int]], list[int]]]] = {
    "map": ("map", lambda x: x * 3 + 1, lambda xs: [x * 3 + 1 for x in xs]),
    "halve": ("map", lambda x: x // 2, lambda xs: [x // 2 for x in xs]),
    "filter": ("filter", lambda x: x % 3 != 0, lambda xs: [x for x in xs if x % 3 != 0]),
    "flat_map": ("flat_map", lambda x: [x] * (x % 3), lambda xs: [y for x in xs for y in [x] * (x % 3)]),
    "each": ("each", lambda x: None, lambda xs: list(xs)),
}

stage_st = st.tuples(
    st.sampled_from(sorted(OPS)),
    st.integers(1, 6),  # workers
    st.booleans(),  # ordered
    st.one_of(st.none(), st.integers(1, 5)),  # backpressure before the stage
)


def build(data: Iterable[int], stages: list[tuple[str, int, bool, int | None]]) -> Pipeline[int]:
    p = Pipeline.from_iter(data)
    for op, workers, ordered, buffer in stages:
        if buffer is not None:
            p = p.backpressure(buffer)
        kind, fn, _ = OPS[op]
        p = getattr(p, kind)(fn, workers=workers, ordered=ordered)
    return p


def reference(data: list[int], stages: list[tuple[str, int, bool, int | None]]) -> list[int]:
    out = list(data)
    for op, *_ in stages:
        out = OPS[op][2](out)
    return out


@pytest.mark.timeout(300)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(st.integers(0, 1000), max_size=200), stages=st.lists(stage_st, max_size=5))
def test_random_chains_match_plain_python(data: list[int], stages: list[tuple[str, int, bool, int | None]]) -> None:
    out = build(data, stages).to_list()
    expected = reference(data, stages)
    if all(ordered for _, _, ordered, _ in stages):
        assert out == expected
    else:
        assert Counter(out) == Counter(expected)


@pytest.mark.timeout(300)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(st.integers(0, 1000), min_size=1, max_size=200),
    stages=st.lists(stage_st, min_size=1, max_size=4),
    stop_after=st.integers(0, 50),
)
def test_breaking_out_early_gives_a_prefix_and_stops(
    data: list[int], stages: list[tuple[str, int, bool, int | None]], stop_after: int
) -> None:
    closed: list[bool] = []

    def source() -> Iterable[int]:
        try:
            yield from data
        finally:
            closed.append(True)

    run = build(source(), stages).start()
    got: list[int] = []
    with run:
        for x in run:
            if len(got) == stop_after:
                break
            got.append(x)
    expected = reference(data, stages)
    if all(ordered for _, _, ordered, _ in stages):
        assert got == expected[: len(got)]
    else:
        assert not Counter(got) - Counter(expected)
    assert run.done
    assert closed == [True]
