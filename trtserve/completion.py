"""Deferred completion: a forward that returns before its batch's results are complete.

A backend's ``forward`` normally returns once every result is written.  A backend whose
work finishes elsewhere (SyncTensor with ``overlap = true``: the GPU is still running the
batch) may instead return a ``Completion``.  If the scheduler has more work for the
instance, the instance prepares its next batch first and only then waits for this one and
wakes its callers; otherwise it waits at once (scheduler.py ``_defer``).
"""
from __future__ import annotations

import threading
from typing import Callable


class Completion:
    """``wait()`` blocks until the batch is complete and raises its error, if any.

    Any thread may wait, any number of times: ``finish`` (the real wait, plus whatever
    must follow it) runs once, and later callers get the same outcome without touching the
    resources ``finish`` used (they may be freed by then).
    """

    def __init__(self, finish: Callable[[], None]) -> None:
        self._finish: Callable[[], None] | None = finish
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def wait(self) -> None:
        with self._lock:
            if self._finish is not None:
                finish, self._finish = self._finish, None
                try:
                    finish()
                except Exception as exc:  # reported to every waiter, not only the first
                    self._error = exc
        if self._error is not None:
            raise self._error
