"""A generator run ahead of its consumer in a thread, bounded by the bytes of the items it holds."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()


class Prefetch:
    """Iterates `source` in a background thread, at most `limit_bytes` of items ahead (one item always
    fits, whatever its size). An exception in `source` is raised to the consumer at the point it occurred;
    `close()` (or leaving a ``with`` block) stops the thread and drops what it holds.

    Args:
        source: the generator to run ahead.
        limit_bytes: bytes of items held at most.
        size_of: an item's size in bytes.
        on_drop: called on each item `close()` drops unconsumed (to release what it holds).
    """

    def __init__(self, source: Iterator[Any], limit_bytes: int, size_of: Callable[[Any], int],
                 on_drop: Callable[[Any], None] | None = None) -> None:
        self._source, self._limit, self._size_of = source, max(0, int(limit_bytes)), size_of
        self._on_drop = on_drop
        self._items: deque[tuple[Any, int]] = deque()
        self._held = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="gigassl-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                size = self._size_of(item)
                with self._cond:
                    while not self._stop and self._items and self._held + size > self._limit:
                        self._cond.wait()
                    if self._stop:
                        if self._on_drop is not None:
                            self._on_drop(item)
                        return
                    self._items.append((item, size))
                    self._held += size
                    self._cond.notify_all()
            end: Any = _DONE
        except BaseException as err:  # handed to the consumer, raised there
            end = err
        with self._cond:
            self._items.append((end, 0))
            self._cond.notify_all()

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            item, size = self._items.popleft()
            self._held -= size
            self._cond.notify_all()
        if item is _DONE:
            self._items.append((_DONE, 0))  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            self._items.append((_DONE, 0))
            raise item
        return item

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        dropped = [item for item, _ in self._items if item is not _DONE and not isinstance(item, BaseException)]
        self._items.clear()
        self._held = 0
        with self._cond:
            self._items.append((_DONE, 0))  # a later next() ends the iteration instead of waiting
            self._cond.notify_all()
        if self._on_drop is not None:
            for item in dropped:
                self._on_drop(item)
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
