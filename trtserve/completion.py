"""How a batch ends: a forward's outcome, now or later.

A backend's ``forward`` normally returns once every result is written.  A backend whose
work finishes elsewhere (SyncTensor with ``overlap = true``: the GPU is still running the
batch) may instead return a ``Completion``.  Either way the batch ends in one place,
``Node.complete`` (count it, wake its callers); a ``Completion`` only decides *when*: if
the node has more work for the instance, the instance launches its next batch first and
then waits for this one (instances.py), otherwise it waits at once.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import BackendError, TrtserveError


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
                except BaseException as exc:  # noqa: B036 - raised below: to every waiter, not only the first
                    self._error = exc
        if self._error is not None:
            raise self._error


def batch_error(exc: BaseException, node: str, what: str, size: int) -> TrtserveError:
    """A backend's exception as its batch's error: typed errors as they are, others wrapped."""
    if isinstance(exc, TrtserveError):
        return exc
    return BackendError(
        f"node {node!r}: {what} a batch of {size}: {type(exc).__name__}: {exc}",
        node=node,
        exception=type(exc).__name__,
        batch_size=size,
    )
