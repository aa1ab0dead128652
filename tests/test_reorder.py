"""The reorder buffer: output in number order, streamed, and bounded by the input's window."""

from __future__ import annotations

import threading

from threadpipe._channel import Channel
from threadpipe._scope import Cancelled
from threadpipe._reorder import Reorder


def drain(ch: Channel) -> list[object]:
    out: list[object] = []
    while ch.qsize():
        got = ch.get_many(100)
        assert got is not None
        out.extend(got[0])
    return out


def test_emits_in_number_order_as_soon_as_the_head_is_done() -> None:
    ch = Channel(100)
    r = Reorder(Channel(100), ch, window=10)
    r.complete(2, 1, ["c"])
    r.complete(1, 1, ["b"])
    assert drain(ch) == []  # the head (0) is missing: nothing may pass
    r.complete(0, 1, ["a"])
    assert drain(ch) == ["a", "b", "c"]
    r.complete(3, 2, ["d", "e"])  # a batch of two numbers
    r.complete(5, 1, [])  # filtered out: produces nothing but moves the head on
    r.complete(6, 1, ["g"])
    assert drain(ch) == ["d", "e", "g"]
    assert r.held() == 0


def test_the_window_limits_what_can_be_taken_until_the_head_leaves() -> None:
    inp = Channel(100)
    inp.put_many(list(range(10)))
    r = Reorder(inp, Channel(100), window=3)
    got = inp.get_many(10)
    assert got is not None and got[0] == [0, 1, 2]  # no more than the window
    taken = threading.Event()

    def getter() -> None:
        inp.get_many(10)
        taken.set()

    t = threading.Thread(target=getter)
    t.start()
    assert not taken.wait(0.05)  # window full: the getter waits
    r.complete(1, 2, ["b", "c"])
    assert not taken.wait(0.05)  # the head (0) has not left: still full
    r.complete(0, 1, ["a"])
    t.join(5)
    assert taken.is_set()


def test_close_wakes_a_getter_waiting_on_the_window() -> None:
    inp = Channel(10)
    inp.put_many([1, 2])
    Reorder(inp, Channel(10), window=1)
    assert inp.get_many(5) is not None
    raised = threading.Event()

    def getter() -> None:
        try:
            inp.get_many(5)
        except Cancelled:
            raised.set()

    t = threading.Thread(target=getter)
    t.start()
    inp.abort()
    t.join(5)
    assert raised.is_set()
