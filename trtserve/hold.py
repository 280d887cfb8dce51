"""Hold a burst of submissions to inline nodes, then dispatch them together.

An ``inline`` node runs its batches on the submitting thread.  Submitted one by one, every
request would be its own batch; a thread that knows it is about to submit several (the
server handling the frames of one socket read, ``pipe()`` given a list) wraps them in
``held_dispatch()``.  Inside it, a submit to an inline node only checks and counts the
request; when the burst ends, each node queues its requests under one lock acquisition,
forms batches as usual (``max``, ``min``) and runs them, here.  Requests that inline
stages pass to further inline nodes are held and released the same way, so a chain keeps
its batches.  A nested ``held_dispatch()`` (a forward that calls ``pipe()`` while a hold
is being released) is a hold of its own, released at its own end: a caller that waits for
its results never waits for a hold only its caller can release.

Held requests count as queued: toward ``max_queue_size``, and for a draining node, which
waits for them (``Scheduler.close``).

Threaded nodes are not affected: their requests are queued at once, since an instance
thread may be waiting for them.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import Request
    from .scheduler import Scheduler

log = logging.getLogger("trtserve.scheduler")
_local = threading.local()


class Hold:
    """The requests one thread's burst holds, by node, in submission order."""

    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes: dict[Scheduler, list[Request]] = {}

    def add(self, node: Scheduler, req: Request) -> None:
        held = self.nodes.get(node)
        if held is None:
            self.nodes[node] = [req]
        else:
            held.append(req)

    def count(self, node: Scheduler) -> int:
        held = self.nodes.get(node)
        return 0 if held is None else len(held)

    def release(self) -> None:
        """Dispatch everything held, including what the released batches hold in turn."""
        nodes = self.nodes
        while nodes:
            node = next(iter(nodes))
            requests = nodes.pop(node)
            try:
                node.submit_held(requests)
            except Exception:  # a bug must not strand the requests of the other nodes
                log.exception("dispatching held requests of node %r failed", node.node.name)


def current() -> Hold | None:
    """This thread's hold, when it is inside ``held_dispatch()``."""
    return getattr(_local, "hold", None)


class held_dispatch:  # noqa: N801 (used as a context manager, like contextlib's)
    """``with held_dispatch(): ...submits...``: released at the end; nested holds are separate."""

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        self._outer = current()
        _local.hold = Hold()

    def __exit__(self, *exc: object) -> None:
        try:
            _local.hold.release()
        finally:
            _local.hold = self._outer
