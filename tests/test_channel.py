"""The queue link: batches, the sentinel, closing wakes blocked threads."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from threadpipe._channel import END, Channel
from threadpipe._scope import Cancelled


def test_is_a_bounded_queue() -> None:
    ch = Channel(3, "x")
    assert isinstance(ch, queue.Queue)
    assert ch.maxsize == 3


def test_get_many_takes_what_is_there_up_to_the_limit_and_numbers_it() -> None:
    ch = Channel(10)
    assert ch.put_many(list(range(5))) == 5
    got = ch.get_many(3)
    assert got is not None
    items, number = got
    assert items == [0, 1, 2] and number == 0
    got = ch.get_many(10)
    assert got is not None and got[0] == [3, 4] and got[1] == 3


def test_none_is_data_and_the_sentinel_is_left_for_siblings() -> None:
    ch = Channel(10)
    ch.put_many([None, 0])
    ch.put_end()
    got = ch.get_many(10)
    assert got is not None and got[0] == [None, 0]
    for _ in range(3):  # every getter sees the end, none removes it
        got = ch.get_many(10)
        assert got is not None and got[0] == []
    assert list(ch.queue) == [END]


def test_put_many_waits_for_room_and_keeps_order() -> None:
    ch = Channel(2)
    done = threading.Event()

    def producer() -> None:
        ch.put_many(list(range(7)))
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    seen: list[int] = []
    while len(seen) < 7:
        got = ch.get_many(1)
        assert got is not None
        seen.extend(got[0])
        assert ch.qsize() <= 2
    t.join(5)
    assert done.is_set() and seen == list(range(7))


def test_put_many_timeout_reports_how_many_went_in() -> None:
    ch = Channel(2)
    assert ch.put_many([1, 2, 3], timeout=0.01) == 2


def test_get_many_timeout_returns_none() -> None:
    assert Channel(2).get_many(1, timeout=0.01) is None


def test_try_put_never_blocks() -> None:
    ch = Channel(1)
    assert ch.try_put("a") is True
    assert ch.try_put("b") is False


@pytest.mark.parametrize("side", ["getter", "putter"])
def test_close_wakes_blocked_threads(side: str) -> None:
    ch = Channel(1)
    if side == "putter":
        ch.put_many([0])
    waiting = threading.Event()
    raised: list[BaseException] = []

    def blocked() -> None:
        waiting.set()
        try:
            if side == "getter":
                ch.get_many(1)
            else:
                ch.put_many([1])
        except Cancelled as exc:
            raised.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    waiting.wait(5)
    ch.abort()
    t.join(5)
    assert not t.is_alive() and len(raised) == 1


def test_closed_channel_refuses_even_when_items_wait() -> None:
    ch = Channel(4)
    ch.put_many([1, 2])
    ch.abort()
    with pytest.raises(Cancelled):
        ch.get_many(1)
    with pytest.raises(Cancelled):
        ch.try_put(3)




def test_a_waiting_putter_is_woken_when_the_buffer_is_down_to_half() -> None:
    ch = Channel(4)
    ch.put_many([0, 1, 2, 3])
    putter = threading.Thread(target=ch.put_many, args=([4, 5],))
    putter.start()
    waiters = ch.not_full._waiters  # type: ignore[attr-defined]  # notify() removes the notified
    deadline = time.monotonic() + 10
    while ch.idle_putters != 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # waiting for the putter to block, not deciding anything
    assert ch.idle_putters == 1
    assert ch.get_many(1) == ([0], 0)
    assert len(waiters) == 1  # one slot free: not worth a wake-up
    assert ch.get_many(1) == ([1], 1)
    assert len(waiters) == 0  # down to half: woken, and room for everything it has
    putter.join(10)
    assert list(ch.queue) == [2, 3, 4, 5]
