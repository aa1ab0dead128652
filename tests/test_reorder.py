"""The reorder buffer: output in number order, streamed, bounded by its gate."""

from __future__ import annotations

import threading

import pytest

from threadpipe._channel import Channel, Closed
from threadpipe._reorder import Gate, Reorder


def drain(ch: Channel) -> list[object]:
    out: list[object] = []
    while ch.qsize():
        got = ch.get_many(100)
        assert got is not None
        out.extend(got[0])
    return out


def test_emits_in_number_order_as_soon_as_the_head_is_done() -> None:
    ch = Channel(100)
    r = Reorder(ch, window=10)
    r.complete(2, 1, ["c"])
    r.complete(1, 1, ["b"])
    assert drain(ch) == []  # the head (0) is missing: nothing may pass
    r.complete(0, 1, ["a"])
    assert drain(ch) == ["a", "b", "c"]
    r.complete(3, 2, ["d", "e"])  # a batch of two numbers
    r.complete(5, 1, [])  # filtered out: produces nothing but advances the head
    r.complete(6, 1, ["g"])
    assert drain(ch) == ["d", "e", "g"]
    assert r.held() == 0


def test_gate_grants_up_to_what_is_free_and_blocks_at_zero() -> None:
    g = Gate(3)
    assert g.acquire(5) == 3
    acquired = threading.Event()

    def waiter() -> None:
        g.acquire(1)
        acquired.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not acquired.wait(0.05)
    g.release(1)
    t.join(5)
    assert acquired.is_set()


def test_gate_close_wakes_waiters() -> None:
    g = Gate(1)
    g.acquire(1)
    raised = threading.Event()

    def waiter() -> None:
        try:
            g.acquire(1)
        except Closed:
            raised.set()

    t = threading.Thread(target=waiter)
    t.start()
    g.close()
    t.join(5)
    assert raised.is_set()
    with pytest.raises(Closed):
        g.acquire(1)


def test_completing_the_head_returns_permits_for_everything_emitted() -> None:
    ch = Channel(100)
    r = Reorder(ch, window=3)
    assert r.gate.acquire(3) == 3
    r.complete(1, 1, ["b"])
    r.complete(2, 1, ["c"])
    r.complete(0, 1, ["a"])
    assert r.gate.acquire(3) == 3
