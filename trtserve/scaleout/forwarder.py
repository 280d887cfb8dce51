"""Front door -> replicas: the requests of one event-loop turn travel to Ray as one call.

A Ray Serve call costs milliseconds of work across processes whatever it carries, so
sending each request alone would cap a front door at a few hundred requests a second.
Instead every request submitted during one turn of the front door's event loop (the
frames that one epoll wake-up delivered, over every connection) is queued, and at the end
of the turn they leave as calls of at most ``max_per_call`` requests each; the replica
submits a call's requests together, so its nodes batch them as ``trtserve serve`` would.
A lone request leaves at the end of its own turn: no waiting at low load.

Calls in flight are capped at what the replicas can run at once (running replicas times
``max_ongoing_requests``): beyond that Serve's router would only queue them.  Requests
that arrive while every slot is taken wait here instead, and leave together when a call
returns, so calls fill up under load as batches do in a node whose instances are busy.

Replicas die (a node lost, ``ray.kill``, a failed health check).  Inference is
idempotent, so a call whose replica died before answering is sent again (Ray Serve routes
it to a live replica), up to ``RESEND_LIMIT`` times, for the requests whose deadline has
not passed.  Only then do its requests fail, with MODEL_UNAVAILABLE.

Everything here runs on the front door's event loop thread, except ``close``.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from ..errors import (
    DeadlineExceededError,
    InternalError,
    ModelUnavailableError,
    ShuttingDownError,
    TrtserveError,
)
from ..stats import ModelStats

log = logging.getLogger("trtserve.scaleout")

RESEND_LIMIT = 5  # a call outlives this many replica deaths before its requests fail
# What a replica that went away raises: the call may be sent again, elsewhere.
REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
DRAIN_POLL_S = 0.01


class Ticket:
    """One forwarded request: the pipeline's ``Request`` counterpart (it can be cancelled)."""

    __slots__ = ("item", "on_done", "deadline", "priority", "version", "stats", "cancelled", "cancel_error", "finished")

    def __init__(self, item, on_done, deadline, priority, version, stats) -> None:
        self.item = item
        self.on_done: Callable[[dict[str, Any], TrtserveError | None], None] = on_done
        self.deadline: float | None = deadline  # time.monotonic()
        self.priority = priority
        self.version = version
        self.stats: ModelStats = stats  # the served version's front-door statistics
        self.cancelled = False
        self.cancel_error: TrtserveError | None = None
        self.finished = False

    def cancel(self, error: TrtserveError | None = None) -> None:
        """The caller gave up.  Not yet sent: it never will be (and with ``error`` it is
        finished with it, so statistics count it).  Already sent: its answer is dropped."""
        if not self.finished and not self.cancelled:
            self.cancelled, self.cancel_error = True, error

    def finish(self, error: TrtserveError | None, queue_ns: int = 0, compute_ns: int = 0) -> None:
        if self.finished:
            return
        self.finished = True
        outcome = error.name if error is not None else None if "result" in self.item else "NO_RESULT"
        self.stats.record(queue_ns, compute_ns, outcome)
        self.on_done(self.item, error)

    def wire_form(self, now: float) -> tuple[Any, int | None, float | None, int]:
        """What crosses to the replica (replica.CallRequest): the deadline as seconds left,
        since monotonic clocks of two machines do not compare."""
        left = None if self.deadline is None else max(self.deadline - now, 1e-3)
        return self.item["data"], self.version, left, self.priority


class Forwarder:
    """Sends one model's requests to its Serve deployment, grouped per loop turn."""

    def __init__(self, handle: Any, model: str, max_per_call: int, max_calls: Callable[[], int]) -> None:
        self.handle = handle  # DeploymentHandle of the model's deployment
        self.max_calls = max_calls  # calls the replicas run at once, now (it follows autoscaling)
        self._infer = handle.options(method_name="infer")  # resolved once, not per call
        self.model = model
        self.max_per_call = max_per_call
        self.replica_requests: Counter[str] = Counter()  # requests answered, by replica id
        self.calls = 0  # calls sent (resends included): requests per call = answered / calls
        self.resent_calls = 0
        self._queued: list[Ticket] = []
        self._flush_scheduled = False
        self._calls_in_flight = 0
        self._closed = False
        self._lock = threading.Lock()  # close() runs on another thread

    @property
    def busy(self) -> bool:
        return bool(self._queued) or self._calls_in_flight > 0

    def submit(self, item: dict[str, Any], on_done, deadline: float | None, priority: int, version: int,
               stats: ModelStats) -> Ticket:
        """Queue ``item`` for the end of this loop turn; must run on the front door's loop."""
        if self._closed:
            raise ShuttingDownError(f"model {self.model!r}: this deployment generation is retired", model=self.model)
        ticket = Ticket(item, on_done, deadline, priority, version, stats)
        self._queued.append(ticket)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return ticket

    def _flush(self) -> None:
        """Send what is queued, as calls of at most max_per_call, while call slots are free."""
        self._flush_scheduled = False
        live = []
        for ticket in self._queued:
            if not ticket.cancelled:
                live.append(ticket)
            elif ticket.cancel_error is not None:
                ticket.finish(ticket.cancel_error)
        loop = asyncio.get_running_loop()
        slots = max(self.max_calls() - self._calls_in_flight, 0)
        sent = 0
        while sent < len(live) and slots > 0:
            self._calls_in_flight += 1
            slots -= 1
            loop.create_task(self._call(live[sent:sent + self.max_per_call]))
            sent += self.max_per_call
        self._queued = live[sent:]  # they leave when a call returns

    async def _call(self, tickets: list[Ticket]) -> None:
        try:
            for _attempt in range(RESEND_LIMIT + 1):
                tickets = _still_wanted(tickets)
                if not tickets:
                    return
                now = time.monotonic()
                self.calls += 1
                try:
                    replica, outcomes = await self._infer.remote([t.wire_form(now) for t in tickets])
                except REPLICA_LOST as exc:
                    self.resent_calls += 1
                    log.warning("model %s: a replica went away during a call of %d request(s) (%s); sending it again",
                                self.model, len(tickets), type(exc).__name__)
                    continue
                self._deliver(tickets, replica, outcomes)
                return
            _fail(tickets, ModelUnavailableError(
                f"model {self.model!r}: its replicas went away {RESEND_LIMIT + 1} times while running this request; "
                "check the Ray cluster (serve status) and retry",
                model=self.model,
            ))
        except Exception as exc:  # a bug or an unexpected Ray failure: answer, never hang the callers
            log.exception("model %s: a call to the deployment failed", self.model)
            _fail(tickets, InternalError(f"model {self.model!r}: the call to its Ray deployment failed: "
                                         f"{type(exc).__name__}: {exc}", model=self.model))
        finally:
            self._calls_in_flight -= 1
            if self._queued and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _deliver(self, tickets: list[Ticket], replica: str, outcomes: list[tuple]) -> None:
        self.replica_requests[replica] += len(tickets)
        for ticket, (error, has_result, result, queue_ns, compute_ns) in zip(tickets, outcomes):
            if has_result:
                ticket.item["result"] = result
            ticket.finish(error, queue_ns, compute_ns)

    def close(self, drain: bool = False, timeout_s: float = 60.0) -> None:
        """Refuse new requests; with ``drain``, wait (off the loop) until calls in flight ended."""
        with self._lock:
            self._closed = True
        give_up = time.monotonic() + timeout_s
        while drain and self.busy and time.monotonic() < give_up:
            time.sleep(DRAIN_POLL_S)


def _still_wanted(tickets: list[Ticket]) -> list[Ticket]:
    """Drop cancelled tickets and fail those whose deadline passed (before a resend)."""
    now = time.monotonic()
    wanted = []
    for ticket in tickets:
        if ticket.cancelled or ticket.finished:
            continue
        if ticket.deadline is not None and ticket.deadline <= now:
            ticket.finish(DeadlineExceededError("the request's deadline passed while its replica was replaced",
                                                timeout_ms=None))
            continue
        wanted.append(ticket)
    return wanted


def _fail(tickets: list[Ticket], error: TrtserveError) -> None:
    for ticket in tickets:
        ticket.finish(error)
