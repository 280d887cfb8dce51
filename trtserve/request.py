"""A request travelling through a node: its item, callback, deadlines and timings."""
from __future__ import annotations

from typing import Any, Protocol
from collections.abc import Callable

from .errors import TrtserveError

# Called with the request itself: Any, since a subclass's owner (pipeline._Flow) takes its own type.
DoneCallback = Callable[[Any, "TrtserveError | None"], None]


class Holder(Protocol):
    """The node whose queue holds a request (node.py ``Node``)."""

    def withdraw(self, req: Request) -> None: ...


class Request:
    """One item travelling through a node.  ``on_done`` is called at most once: exactly once,
    unless ``cancel()`` without an error drops the request unrun (its caller went away).

    ``deadline`` is the caller's, for the whole pipeline; ``expires`` is when it must leave
    the queue of the node holding it, the earlier of ``deadline`` and that node's
    ``queue_timeout`` (the node sets it at each submit, so one node's limit never applies
    at the next).
    """

    __slots__ = (
        "item", "size", "on_done", "enqueued", "deadline", "expires", "_cancelled", "cancel_error", "queue_ns", "compute_ns",
        "context", "priority", "owner",
    )

    def __init__(
        self,
        item: dict[str, Any],
        on_done: DoneCallback,
        deadline: float | None = None,
        context: Any = None,
        priority: int = 0,
    ):
        self.item = item
        self.priority = priority  # 1 = highest; 0 = the node's default level
        self.size = 1
        self.on_done = on_done
        self.enqueued = 0.0
        self.deadline = deadline  # the caller's: a time.monotonic() value, or None
        self.expires = deadline  # the node's queue deadline (Node.submit sets it)
        self._cancelled = False
        self.cancel_error: TrtserveError | None = None  # why the caller gave up, when it said
        self.owner: Holder | None = None  # the node whose queue holds it, while queued
        self.queue_ns = 0
        self.compute_ns = 0
        self.context = context  # the pipeline's bookkeeping (its position in the chain)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, error: TrtserveError | None = None) -> None:
        """The caller gave up: a request still queued (or not yet queued) is dropped unrun.
        Without ``error`` a dropped request is never finished: ``on_done`` is not called.  With
        ``error`` it is finished with it, so the pipeline counts the failure in its statistics
        (the caller, who gave up, ignores the late callback).  A request already running
        finishes as usual."""
        if self._cancelled:
            return
        self.cancel_error = error  # first: whoever sees _cancelled set also sees the reason
        self._cancelled = True
        owner = self.owner
        if owner is not None:
            owner.withdraw(self)
