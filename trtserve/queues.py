"""The scheduler's request queue: FIFO within a priority level, higher levels first.

Priority levels follow Triton: level 1 is the highest, ``levels`` the lowest; a request
without a priority (0) gets the node's default level.  With one level this is a deque.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    priority: int
    enqueued: float


Q = TypeVar("Q", bound=Queued)


class PriorityQueue(Generic[Q]):
    """Of requests (request.Request in a node)."""

    def __init__(self, levels: int = 1) -> None:
        self._levels: list[collections.deque[Q]] = [collections.deque() for _ in range(max(levels, 1))]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Q]:
        for level in self._levels:
            yield from level

    def append(self, req: Q) -> None:
        self._levels[req.priority - 1].append(req)
        self._len += 1

    def popleft(self) -> Q:
        for level in self._levels:
            if level:
                self._len -= 1
                return level.popleft()
        raise IndexError("pop from an empty PriorityQueue")

    def oldest_enqueued(self) -> float:
        """When the longest-waiting request was queued (drives batching_timeout)."""
        return min(level[0].enqueued for level in self._levels if level)

    def remove_if(self, predicate: Callable[[Q], bool]) -> list[Q]:
        removed: list[Q] = []
        for index, level in enumerate(self._levels):
            if any(predicate(r) for r in level):
                keep: collections.deque[Q] = collections.deque()
                for req in level:
                    (removed if predicate(req) else keep).append(req)
                self._levels[index] = keep
        self._len -= len(removed)
        return removed

    def clear(self) -> list[Q]:
        everything = list(self)
        for level in self._levels:
            level.clear()
        self._len = 0
        return everything
