"""The infer operation: wire inputs to an item, the item through the model, outputs back.

There is one core: the model's callback pipeline.  ``InferCall.on_done`` runs on whichever
scheduler thread finished the item and hands the item to the event loop through the
handler's doorbell (server/doorbell.py: one loop wake-up per burst of finished items),
where the outputs are encoded and the call's reply (server/reply.py) is set.  No thread
pool hop, no per-request task.

``timeout_ms`` becomes both the scheduler deadline (a queued request is failed by the
scheduler's timer and never runs) and a loop timer (the client gets DEADLINE_EXCEEDED on
time even when the item is already running; its late result is dropped).

A request that uses shared-memory regions (server/shm_io.py) carries a ``ShmRequest``: its
outputs named in ``shm_outputs`` are written into their regions in ``on_done``, on the thread
that finished the item (never on the loop), and its regions are let go in ``_resolve``.

With metrics on, every answer is counted once, as the client sees it (success, or failure
by error name) and its duration observed, through the served model's meter
(server/metrics.py), which ``ModelIO`` caches next to the model's inputs.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from ..errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    InvalidArgumentError,
    ModelUnavailableError,
    TrtserveError,
    VersionNotFoundError,
)
from ..repository import LoadedModel, ModelRepository
from ..served import Submitted
from .doorbell import Doorbell
from .modelio import DEFAULT_OUTPUT, ModelIO
from .reply import Reply
from .shm_io import ShmRequest

__all__ = ["DEFAULT_OUTPUT", "InferCall", "InferHandler", "ModelIO", "optional_priority", "optional_version",
           "require_model", "timeout_seconds"]


# --------------------------------------------------------------------------- fields


def require_model(message: dict[str, Any]) -> str:
    name = message.get("model")
    if type(name) is not str or not name:
        raise InvalidArgumentError(
            f"field 'model' must be a non-empty string naming the model, got {type(name).__name__} {name!r}",
            field="model",
            value=repr(name),
        )
    return name


def optional_version(message: dict[str, Any]) -> int | None:
    version = message.get("version")
    if version is None or (type(version) is int and version >= 1):
        return version
    raise InvalidArgumentError(
        f"field 'version' must be a positive integer (or absent for the served version), got {version!r}",
        field="version",
        value=repr(version),
    )


def optional_priority(message: dict[str, Any]) -> int:
    """0 (absent) = the model's default level; the scheduler checks the range (1 = highest)."""
    priority = message.get("priority")
    if priority is None:
        return 0
    if type(priority) is int and priority >= 0:
        return priority
    raise InvalidArgumentError(
        f"field 'priority' must be an integer level >= 0 (1 = highest, 0 = the model's default), got {priority!r}",
        field="priority",
        value=repr(priority),
    )


def timeout_seconds(message: dict[str, Any]) -> float | None:
    value = message.get("timeout_ms")
    if value is None:
        return None
    if type(value) in (int, float) and value > 0 and math.isfinite(value):
        return value / 1000.0
    raise InvalidArgumentError(
        f"field 'timeout_ms' must be a number of milliseconds > 0, got {value!r}",
        field="timeout_ms",
        value=repr(value),
    )


# --------------------------------------------------------------------------- the call

# Why a queued request of a vanished client failed, as the model's statistics count it.
_DISCONNECTED = ConnectionFailedError("the client disconnected (or the server shut down) before the request ran")


class InferCall(Reply):
    """One infer request in flight: the reply slot itself, plus its scheduler request and
    deadline timer."""

    __slots__ = ("bell", "request", "timer", "io", "model", "wanted", "started", "shm")

    def __init__(self, bell: Doorbell, model: LoadedModel, io: ModelIO, wanted: list[str] | None, started: float,
                 shm: ShmRequest | None = None):
        Reply.__init__(self)
        self.started = started  # time.perf_counter() when the request was read
        self.bell = bell
        self.request: Submitted | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.io = io
        self.model = model
        self.wanted = wanted
        self.shm = shm

    def on_done(self, item: dict[str, Any], error: TrtserveError | None) -> None:
        """A node's thread: write outputs into their regions, hand the finished item to the loop."""
        shm = self.shm
        if shm is not None and shm.slots and error is None and not self.done and "result" in item:
            try:
                shm.write(self.io.output_values(item, self.wanted))
            except TrtserveError as exc:
                error = exc
        self.bell.post(self._resolve, item, error)

    def _resolve(self, item: dict[str, Any], error: TrtserveError | None) -> None:
        # The request is finished: nothing to cancel any more.  Dropping it also breaks the
        # call <-> request cycle (its callback is this call's method), so both are freed by
        # reference counting now instead of by the cyclic collector later.
        self.request = None
        if self.timer is not None:
            self.timer.cancel()
        if self.shm is not None:
            self.shm.release()  # the item has left its model: its regions are free again
        if self.done:  # expired or cancelled: the late answer is dropped
            return
        if error is None:
            try:
                outputs = self.io.encode(item, self.wanted, self.shm.placed if self.shm is not None else None)
            except TrtserveError as exc:
                error = exc
        # Counted before the answer leaves: the write releases the GIL, and a client that has
        # its answer may read /metrics before this thread runs again.
        if error is not None:
            self._count(error.name)
            self.set_exception(error)
            return
        self._count(None)
        self.set_result({"model": self.model.name, "version": self.model.version, "outputs": outputs})

    def _count(self, reason: str | None) -> None:
        meter = self.io.meter
        if meter is not None:
            meter.done(reason, time.perf_counter() - self.started)

    def expire(self, timeout_s: float) -> None:
        if self.done:
            return
        error = DeadlineExceededError(
            f"model {self.model.name!r} gave no answer within timeout_ms={timeout_s * 1e3:g}; "
            "raise timeout_ms or lower the load",
            model=self.model.name,
            timeout_ms=timeout_s * 1e3,
        )
        self._count("DEADLINE_EXCEEDED")
        self.set_exception(error)
        if self.request is not None:
            self.request.cancel(error)  # still queued: never run it, and count the failure

    def cancel(self) -> bool:
        # The reply first: cancelling a queued request finishes it at once, and on the loop
        # that reaches _resolve now, which must find this call done (no answer, no metric).
        cancelled = Reply.cancel(self)
        if self.request is not None:
            self.request.cancel(_DISCONNECTED)  # still queued: never run it, count the failure
        if self.timer is not None:
            self.timer.cancel()
        return cancelled


class InferHandler:
    def __init__(self, repository: ModelRepository, loop: asyncio.AbstractEventLoop, metrics: Any = None,
                 shm: Any = None) -> None:
        self.repository = repository
        self.loop = loop
        self.metrics = metrics  # server/metrics.Metrics, or None when metrics are off
        self.shm = shm  # server/shm_ops.SharedMemory: each connection's regions
        self.bell = Doorbell(loop)
        self._io: dict[tuple[str, int], tuple[LoadedModel, ModelIO]] = {}

    def model_io(self, model: LoadedModel) -> ModelIO:
        """Known inputs/outputs, computed once per served model object (a reload replaces it)."""
        key = (model.name, model.version)
        cached = self._io.get(key)
        if cached is not None and cached[0] is model:
            return cached[1]
        io = ModelIO(model)
        if self.metrics is not None:
            io.meter = self.metrics.meter(model)
        self._io[key] = (model, io)
        return io

    def __call__(self, message: dict[str, Any], connection: Any = None) -> Reply:
        # The hot path: optional fields are parsed only when present (each parser raises
        # the typed error for a bad value).
        started = time.perf_counter()
        io = None
        get = message.get
        # Only a connection that registered regions, or a request that names shm_outputs, pays for this.
        table = self.shm.lookup(connection) if self.shm is not None else None
        shm = ShmRequest(table) if table is not None or get("shm_outputs") is not None else None
        try:
            _, model, io = self.resolve(message)
            item = {"data": io.item_data(get("inputs"), shm)}
            wanted = get("outputs")
            wanted = None if wanted is None else io.output_filter(wanted)
            if shm is not None:
                shm.plan_outputs(get("shm_outputs"), io.outputs, wanted)
                if not shm.leases:
                    shm = None  # no region referenced: the plain path
            call = InferCall(self.bell, model, io, wanted, started, shm)
            priority = get("priority")
            if priority is not None:
                priority = optional_priority(message)
            timeout_s = get("timeout_ms")
            if timeout_s is not None:
                timeout_s = timeout_seconds(message)
            # The scheduler keeps the earlier of this deadline and the model's queue_timeout.
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            request = model.submit(item, call.on_done, deadline, priority or 0)
            if not call.done:  # an inline model may have answered already
                call.request = request
        except TrtserveError as exc:
            if shm is not None:
                shm.release()
            if self.metrics is not None:
                self._count_refusal(message, io, exc)
            raise
        if timeout_s is not None and not call.done:  # an inline model may have answered already
            call.timer = self.loop.call_later(timeout_s, call.expire, timeout_s)
        return call

    def resolve(self, message: dict[str, Any]) -> tuple[str, Any, ModelIO]:
        """The request's model name, its served model and their ModelIO (typed errors for a
        bad name or version, or a model that is not serving)."""
        name, version = message.get("model"), message.get("version")
        if type(name) is not str or not name or version is not None:  # the common case checks nothing more
            name, version = require_model(message), optional_version(message)
        model = self.repository.get(name, version)
        return name, model, self.model_io(model)

    def _count_refusal(self, message: dict[str, Any], io: ModelIO | None, exc: TrtserveError) -> None:
        """A request refused before it was queued.  Only names the server knows become label
        values, so a peer sending made-up model names cannot grow the metrics without bound."""
        if io is not None:
            io.meter.failed(exc.name)
            return
        known = isinstance(exc, (ModelUnavailableError, VersionNotFoundError))
        self.metrics.refused_request(message.get("model") if known else "", exc.name)
