"""One thread for the whole process that wakes nodes at the times they ask for.

A node needs waking only when nothing else will happen in time: a partial batch whose
``batching_timeout`` window ends, or a queued request whose deadline passes while every
instance is busy.  One shared thread serves every node (a heap of wake-up times), started
when the first node starts (so a process's thread count is settled once its models are
loaded); a node costs no thread of its own for it.  ``wake()`` runs on this thread,
so it must be short: it fails expired requests and, for an ``inline`` node, runs the
batches that became due (microseconds each, by the definition of inline), a few at a time
(``node.COMBINE_LIMIT``) between other nodes' wake-ups.  The alarm
holds nodes weakly: a model unloaded while a wake-up is pending is freed all the same.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from typing import Protocol

log = logging.getLogger("trtserve.scheduler")


class Sleeper(Protocol):
    def wake(self) -> None: ...


class Alarm:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[Sleeper]]] = []
        self._order = itertools.count()  # ties never compare the sleepers
        self._changed = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread, once per process."""
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="trtserve-alarm", daemon=True)
                self._thread.start()

    def at(self, when: float, sleeper: Sleeper) -> None:
        """Call ``sleeper.wake()`` at ``when`` (``time.monotonic()``), or soon after."""
        self.start()
        with self._changed:
            first = not self._heap or when < self._heap[0][0]
            heapq.heappush(self._heap, (when, next(self._order), weakref.ref(sleeper)))
            if first:
                self._changed.notify()

    def _run(self) -> None:
        while True:
            sleeper = self._next()()
            if sleeper is None:  # its node is gone
                continue
            try:
                sleeper.wake()
            except BaseException:  # noqa: B036 - a bug (or a callback's sys.exit) in one node must not stop every node's wake-ups
                log.exception("waking a node failed")
            del sleeper

    def _next(self) -> weakref.ref[Sleeper]:
        with self._changed:
            while True:
                if self._heap:
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        return heapq.heappop(self._heap)[2]
                    self._changed.wait(delay)
                else:
                    self._changed.wait()


ALARM = Alarm()
