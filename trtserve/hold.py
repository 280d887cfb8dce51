"""``held_dispatch()``: a thread's burst of submits to inline nodes forms batches.

An ``inline`` node runs a due batch on the thread that made it due, so requests submitted
one by one would each be a batch of their own.  A thread that knows it is about to submit
several (the server handling the frames of one socket read) wraps them in
``held_dispatch()``: inside it, a submit to an inline node is queued in the node like any
other but not dispatched; when the burst ends, each node it touched dispatches once, as if
no more work were coming (``Node.flush``), and runs the due batches here.

The requests wait in their node's queue, so they count toward ``max_queue_size``, a
cancel withdraws them, and a closing node runs (drain) or fails them as any queued
request.  The burst ends before the nodes flush, so a forward that submits again (a
``pipe()`` inside a forward) is not held.  Threaded nodes dispatch at once as always.
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger("trtserve.scheduler")
_local = threading.local()


class Flushable(Protocol):
    def flush(self) -> None: ...


def current() -> dict[Flushable, None] | None:
    """The nodes this thread's burst touched (an ordered set), inside ``held_dispatch()``."""
    return getattr(_local, "nodes", None)


class held_dispatch:  # noqa: N801 (used as a context manager, like contextlib's)
    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        self._outer = current()
        _local.nodes = {}

    def __exit__(self, *exc: object) -> None:
        nodes, _local.nodes = _local.nodes, self._outer
        for node in nodes:
            try:
                node.flush()
            except Exception:  # a bug must not strand the requests of the other nodes
                log.exception("dispatching a burst's requests failed")
