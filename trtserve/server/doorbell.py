"""Hand work from scheduler threads to the event loop, one wake-up per burst.

``loop.call_soon_threadsafe`` per finished item costs a self-pipe write and a loop wake-up
each; a batch of 8 finishing together paid that 8 times, while the loop was already awake
for the first.  A doorbell queues the calls and rings only when it is not already ringing:
the loop runs everything queued since the ring in one callback.

A post made on the loop's own thread runs at once: the loop is awake already, and the
poster (an ``inline`` node finishing a request the loop submitted) is where the work must
run anyway.  Deferring it would cost a loop turn and the self-pipe write per burst.

Correctness under the GIL: a poster appends, then reads ``_rung``; the loop clears
``_rung``, then empties the queue.  A poster that sees ``_rung`` set appended before the
clear, so the running drain still finds its call; one that sees it clear rings again.  Two
posters may both ring; the second drain then finds nothing to do.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("trtserve.server")

class Doorbell:
    __slots__ = ("_loop", "_calls", "_rung", "_loop_thread")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._rung = False
        # Known at once when built on the running loop (the server's case), else at the first drain.
        self._loop_thread = threading.get_ident() if _running_loop() is loop else None

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Any thread: run ``fn(*args)`` on the loop soon (at once on the loop's thread)."""
        if threading.get_ident() == self._loop_thread:
            _call(fn, args)
            return
        self._calls.append((fn, args))
        if not self._rung:
            self._rung = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                pass  # the loop is closed: the server is gone and nobody waits for the answer

    def _drain(self) -> None:
        self._loop_thread = threading.get_ident()
        self._rung = False
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            _call(fn, args)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _call(fn: Callable[..., Any], args: tuple) -> None:
    try:
        fn(*args)
    except Exception:  # one bad call must not strand the calls queued behind it
        log.exception("a completion handed to the event loop failed")
