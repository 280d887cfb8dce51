"""Warnings about peers, at a bounded rate.

A refused connection or a failed login is worth a log line; two thousand of them a second
are a denial of service against the log.  Each kind of event (``auth``, ``connection_limit``,
``idle``, ...) logs at most ``burst`` lines per ``interval_s``; what it suppresses is
summed into one line when the interval ends (``flush``, called by the reaper's timer, or
the next event of that kind).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

DEFAULT_BURST = 10
DEFAULT_INTERVAL_S = 10.0


class _Window:
    __slots__ = ("start", "logged", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.logged = 0
        self.suppressed = 0


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        burst: int = DEFAULT_BURST,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def warning(self, kind: str, message: str, *args: Any) -> None:
        now = self.clock()
        window = self._windows.get(kind)
        if window is None or now - window.start >= self.interval_s:
            if window is not None:
                self._summarise(kind, window)
            window = self._windows[kind] = _Window(now)
        if window.logged < self.burst:
            window.logged += 1
            self.logger.warning(message, *args)
        else:
            window.suppressed += 1

    def flush(self) -> None:
        """Report what ended intervals suppressed (a timer calls this: a burst may be the last)."""
        now = self.clock()
        for kind, window in list(self._windows.items()):
            if now - window.start >= self.interval_s:
                self._summarise(kind, window)
                del self._windows[kind]

    def _summarise(self, kind: str, window: _Window) -> None:
        if window.suppressed:
            self.logger.warning("%d more %r warnings like the above in %.0f s (at most %d are logged per %.0f s)",
                                window.suppressed, kind, self.interval_s, self.burst, self.interval_s)
