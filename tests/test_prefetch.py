"""The bounded read-ahead the encode pipeline runs its decoding in."""

import threading
import time

import pytest

from gigassl_fast.prefetch import Prefetch


def test_items_arrive_in_order_and_no_more_than_the_limit_is_held():
    produced = []
    consumed = 0
    ahead = []

    def source():
        for i in range(12):
            produced.append(i)
            ahead.append(len(produced) - consumed)
            yield i

    with Prefetch(source(), limit_bytes=30, size_of=lambda item: 10) as items:
        got = []
        for item in items:
            time.sleep(0.01)  # a slow consumer: the producer fills up to the limit and waits
            got.append(item)
            consumed += 1
    assert got == list(range(12))
    # three items of 10 bytes fit in 30; one more is with the consumer and one being produced
    assert 4 <= max(ahead) <= 5


def test_an_item_larger_than_the_limit_still_passes():
    with Prefetch(iter([b"x" * 100, b"y"]), limit_bytes=10, size_of=len) as items:
        assert list(items) == [b"x" * 100, b"y"]


def test_an_error_in_the_source_is_raised_to_the_consumer_where_it_occurred():
    def source():
        yield 1
        yield 2
        raise ValueError("slide 3 is broken")

    items = Prefetch(source(), limit_bytes=1 << 20, size_of=lambda item: 1)
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(ValueError, match="slide 3 is broken"):
        next(items)
    with pytest.raises(StopIteration):
        next(items)
    items.close()


def test_close_stops_the_thread_and_releases_what_was_not_consumed():
    released, finished = [], threading.Event()

    def source():
        try:
            yield from range(1000)
        finally:
            finished.set()

    items = Prefetch(source(), limit_bytes=5, size_of=lambda item: 1, on_drop=released.append)
    assert next(items) == 0
    time.sleep(0.05)
    items.close()
    assert finished.is_set() and not items._thread.is_alive()
    assert sorted(released) == list(range(1, 1 + len(released))) and len(released) >= 5  # held and in hand
    with pytest.raises(StopIteration):
        next(items)
