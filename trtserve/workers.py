"""The threads of a node: one per instance, and the finisher that wakes callers under load.

The dispatch decisions stay in scheduler.py; these threads only run what it hands them:
an instance runs ``scheduler._execute(instance, batch)`` for every batch put in its inbox,
the finisher runs ``scheduler._finish_batch(batch, error)`` for every batch handed off.
"""
from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

from .backend import Backend
from .errors import ModelUnavailableError, TrtserveError
from .expression import instantiate
from .request import Request

if TYPE_CHECKING:
    from .scheduler import Scheduler


class InstanceThread:
    """One instance of a node: its backend, built, initialised and run on its own thread."""

    def __init__(self, index: int, scheduler: Scheduler) -> None:
        self.index = index
        self.scheduler = scheduler
        self.inbox: queue.SimpleQueue[list[Request] | None] = queue.SimpleQueue()
        self.backend: Backend | None = None
        self.lo = self.hi = 1
        self.busy = False
        self.ready = threading.Event()
        self.init_error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"trtserve-{scheduler.node.name}-{index}", daemon=True
        )

    def _run(self) -> None:
        node = self.scheduler.node
        try:
            backend = instantiate(node.expr, node.options)
            backend.init(node.options, dict(self.scheduler.kwargs, instance_index=self.index))
            self.lo, self.hi = int(backend.min()), int(backend.max())
            if not 1 <= self.lo <= self.hi:
                raise ModelUnavailableError(
                    f"node {node.name!r}: backend {node.expr} reports min={self.lo} max={self.hi}; "
                    "it needs 1 <= min <= max",
                    node=node.name,
                )
            self.backend = backend
        except BaseException as exc:  # reported to start(), which raises it to the loader
            self.init_error = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            while (batch := self.inbox.get()) is not None:
                self.scheduler._execute(self, batch)
                del batch  # not held until the next get: see _Finisher._run
        finally:
            backend.close()


class Finisher:
    """A node's finisher thread: runs the callbacks of batches its instances handed off."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.inbox: queue.SimpleQueue[tuple[list[Request], TrtserveError | None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"trtserve-{scheduler.node.name}-finisher", daemon=True)
        self.busy = False  # a handed-off batch is not finished yet (the scheduler's lock guards it)

    def put(self, batch: list[Request], error: TrtserveError | None) -> None:
        self.inbox.put((batch, error))

    def _run(self) -> None:
        get, finish, idle = self.inbox.get, self.scheduler._finish_batch, self.scheduler._finisher_idle
        while True:
            work = get()
            if work is None:
                return
            finish(*work)
            # Let go of the batch now, not at the next get: its items may hold GPU buffers
            # that must be freed while their instance's stream still exists.
            del work
            idle()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.inbox.put(None)
            if self.thread is not threading.current_thread():  # close() from a callback
                self.thread.join()
