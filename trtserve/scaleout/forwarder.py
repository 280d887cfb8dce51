"""Front door -> replicas: each infer frame is relayed over trtserve's protocol, not through Ray.

Every replica serves its model with trtserve's own server (replica_server.py) and reports
its address; the status thread (status.py) keeps the list of those addresses current.  On
each front-door event loop the forwarder keeps one connection per replica (link.py) and
sends each request to the replica with the fewest requests outstanding, skipping for a
while one whose connection failed (0.5 s, doubling up to 5 s, as the client library's
endpoints do).  The request travels as the client sent it, its map packed again with the
connection's id, and the replica's answer goes back to the client as it came, its id
swapped for the client's (relay_frames.py): the front door never turns tensors into
arrays, and the replica checks the inputs and answers typed errors as any server does.

A request whose connection dropped before its answer (a replica killed), or that a
draining replica refused (SHUTTING_DOWN), is sent again: first to the other replicas the
loop knows, then, once each of them failed it, after the list of replicas changes (a
replacement starting), up to ``RESEND_LIMIT`` resends, while its deadline allows.  This
is safe because inference is idempotent.  After ``RESEND_LIMIT`` resends it fails, with
MODEL_UNAVAILABLE.

Everything here runs on front-door event loops, except ``close``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from trtserve_client.endpoints import DEFAULT_DOWN_S, MAX_DOWN_S
from trtserve_client.frames import decode_frame
from trtserve_client.wire import DEFAULT_MAX_FRAME

from ..errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    ErrorCode,
    ModelUnavailableError,
    ShuttingDownError,
    TrtserveError,
    error_from_wire,
)
from ..server.reply import Framed, Reply
from ..stats import ModelStats
from .link import ReplicaLink
from .relay_frames import request_parts, with_id

log = logging.getLogger("trtserve.scaleout")

RESEND_LIMIT = 8  # a request is sent again at most this many times before it fails
REPLICA_WAIT_S = 30.0  # how long a request waits for a replica to report an address
WAIT_POLL_S = 0.05
DRAIN_POLL_S = 0.01
RETRIABLE = (ConnectionFailedError, ShuttingDownError)  # the replica did not answer; another may


class RelayCall(Reply):
    """One relayed infer request: the reply slot the front door's protocol waits on."""

    __slots__ = ("message", "forwarder", "loop", "deadline", "stats", "meter", "started", "link", "link_id",
                 "attempts", "failures", "timer")

    def __init__(self, message: dict[str, Any], forwarder: Forwarder, loop: asyncio.AbstractEventLoop,
                 deadline: float | None, stats: ModelStats, meter: Any, started: float) -> None:
        Reply.__init__(self)
        self.message = message  # the client's request, as unpacked
        self.forwarder = forwarder
        self.loop = loop  # the front-door loop that read it: its answer, resends and timer run there
        self.deadline = deadline  # time.monotonic(), from the client's timeout_ms
        self.stats = stats  # the served version's front-door statistics
        self.meter = meter  # its Prometheus meter (server/metrics.py), or None
        self.started = started  # time.perf_counter() when the front door read it
        self.link: ReplicaLink | None = None  # where it waits for its answer
        self.link_id = 0
        self.attempts = 0  # sends so far
        self.failures = 0  # consecutive failures on the current replica list
        self.timer: asyncio.TimerHandle | None = None

    # -- link.Relayed --------------------------------------------------------------------
    def frame(self, request_id: int) -> list[Any]:
        # The replica drops what nobody waits for any more: a resend carries what is left.
        deadline = self.deadline
        if self.attempts <= 1 or deadline is None:
            return request_parts(self.message, request_id)
        return request_parts(self.message, request_id, max(deadline - time.monotonic(), 1e-3) * 1000.0)

    def answered(self, frame: memoryview, id_end: int, error: bool) -> None:
        link, self.link = self.link, None
        reason = None
        if error:
            refusal = _error_of(frame)
            if isinstance(refusal, RETRIABLE):  # a draining replica: nothing ran there
                self.forwarder.resend(self, link, refusal)
                return
            reason = refusal.name
        self.finish(Framed(with_id(frame, id_end, self.message["id"])), reason)

    def failed(self, error: TrtserveError) -> None:
        link, self.link = self.link, None
        self.forwarder.resend(self, link, error)

    # -- outcome -------------------------------------------------------------------------
    def finish(self, answer: Framed | TrtserveError, reason: str | None) -> None:
        """Answer the client (an answer framed already, or an error of the front door's own)."""
        if self.done:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.forwarder.ended()
        seconds = time.perf_counter() - self.started
        self.stats.record(0, int(seconds * 1e9), reason)
        if self.meter is not None:
            self.meter.done(reason, seconds)
        if isinstance(answer, Framed):
            self.set_result(answer)
        else:
            self.set_exception(answer)

    def fail(self, error: TrtserveError) -> None:
        self.finish(error, error.name)

    def expire(self, timeout_s: float) -> None:
        """The client's timeout_ms passed: answer DEADLINE_EXCEEDED now, drop the late answer."""
        self._forget()
        self.fail(DeadlineExceededError(
            f"model {self.message.get('model')!r} gave no answer within timeout_ms={timeout_s * 1e3:g}; "
            "raise timeout_ms or lower the load", model=self.message.get("model"), timeout_ms=timeout_s * 1e3))

    def cancel(self) -> bool:
        """The client went away (or the front door stops): its answer is dropped."""
        self._forget()
        if self.timer is not None:
            self.timer.cancel()
        if not self.done:
            self.forwarder.ended()
            # Counted as the server counts a vanished client's request (server/infer.py).
            self.stats.record(0, int((time.perf_counter() - self.started) * 1e9), ErrorCode.CONNECTION_ERROR.name)
        return Reply.cancel(self)

    def _forget(self) -> None:
        if self.link is not None:
            self.link.forget(self.link_id)
            self.link = None

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class _Replica:
    """One replica's server as one loop sees it: its connection and its health."""

    __slots__ = ("host", "port", "link", "down_until", "failures")

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.link: ReplicaLink | None = None
        self.down_until = 0.0  # time.monotonic(); 0 = up
        self.failures = 0  # consecutive; sets the back-off

    @property
    def in_flight(self) -> int:
        return self.link.in_flight if self.link is not None else 0

    def connection(self) -> ReplicaLink:
        link = self.link
        if link is None or link.closed:
            link = self.link = ReplicaLink(self.host, self.port, DEFAULT_MAX_FRAME)
        return link

    def failed(self) -> None:
        self.failures += 1
        self.down_until = time.monotonic() + min(DEFAULT_DOWN_S * 2 ** (self.failures - 1), MAX_DOWN_S)

    def close_when_idle(self) -> None:
        if self.link is not None and not self.link.in_flight:
            self.link.close()


class _LoopReplicas:
    """One loop's replicas, for one list of addresses (replaced when the list changes)."""

    __slots__ = ("addresses", "replicas", "only", "turn")

    def __init__(self, addresses: tuple[str, ...], previous: _LoopReplicas | None) -> None:
        self.addresses = addresses
        kept: dict[str, _Replica] = previous.replicas if previous is not None else {}
        self.replicas: dict[str, _Replica] = {address: kept.get(address) or _Replica(address) for address in addresses}
        for address, replica in kept.items():
            if address not in self.replicas:  # gone from the list: close once its answers are in
                replica.close_when_idle()
        self.only = next(iter(self.replicas.values()))  # addresses are never empty
        self.turn = itertools.count()

    def pick(self) -> _Replica:
        """The replica with the fewest requests outstanding among those up (ties rotate);
        when all are down, the first to come back."""
        if len(self.replicas) == 1:
            return self.only
        replicas = list(self.replicas.values())
        if len(replicas) > 1:
            start = next(self.turn) % len(replicas)
            replicas = replicas[start:] + replicas[:start]
        now = time.monotonic()
        up = [r for r in replicas if r.down_until <= now]
        if not up:
            return min(replicas, key=lambda r: r.down_until)
        return up[0] if len(up) == 1 else min(up, key=lambda r: r.in_flight)


class Forwarder:
    """Relays one model's requests to its replicas' servers (see the module docstring)."""

    def __init__(self, model: str, addresses: Callable[[], tuple[str, ...]], refresh: Callable[[], None]) -> None:
        self.model = model
        self.addresses = addresses  # the replicas' addresses as last reported (a tuple, replaced on change)
        self.refresh = refresh  # asks the status thread to look for replicas now
        self.resent = 0  # requests sent again after a replica failed them
        self._loops: dict[asyncio.AbstractEventLoop, _LoopReplicas] = {}
        self._in_flight = 0
        self._closed = False
        self._lock = threading.Lock()  # close() runs on another thread

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    def relay(self, message: dict[str, Any], timeout_s: float | None, stats: ModelStats, meter: Any,
              started: float, loop: asyncio.AbstractEventLoop) -> RelayCall:
        """Send the client's infer ``message`` to a replica; runs on ``loop``, the front-door
        loop that read it (given, not looked up: Python 3.11's get_running_loop costs a
        getpid system call, once per request here)."""
        if self._closed:
            raise ShuttingDownError(f"model {self.model!r}: this deployment generation is retired", model=self.model)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        call = RelayCall(message, self, loop, deadline, stats, meter, started)
        self._in_flight += 1
        if timeout_s is not None:
            call.timer = loop.call_later(timeout_s, call.expire, timeout_s)
        self._send(call)
        return call

    def ended(self) -> None:
        self._in_flight -= 1

    def _send(self, call: RelayCall) -> None:
        if call.done:
            return
        if self._closed:  # a resend after close(): its connections are gone with it
            call.fail(ShuttingDownError(f"model {self.model!r}: this deployment generation was retired before "
                                        "a replica answered; retry", model=self.model))
            return
        if call.attempts > RESEND_LIMIT:
            call.fail(ModelUnavailableError(
                f"model {self.model!r}: its replicas dropped this request {RESEND_LIMIT + 1} times; check the Ray "
                "cluster (serve status) and retry", model=self.model))
            return
        replicas = self._replicas(call.loop)
        if replicas is None:
            self._wait(call, ())
            return
        link = replicas.pick().connection()
        call.attempts += 1
        call.link = link
        call.link_id = link.send(call)

    def resend(self, call: RelayCall, link: ReplicaLink | None, error: TrtserveError) -> None:
        """``call`` failed on ``link`` without an answer: send it to another replica."""
        if call.done:
            return
        self.resent += 1
        log.info("model %s: a replica dropped a request (%s); sending it again", self.model, type(error).__name__)
        replicas = self._replicas(call.loop)
        if replicas is not None:
            for replica in replicas.replicas.values():
                if replica.link is link and replica.down_until <= time.monotonic():
                    replica.failed()  # skipped for a while (once per failure, not per request it failed)
        call.failures += 1
        if replicas is None or call.failures >= len(replicas.addresses):  # every replica it knows failed
            call.failures = 0
            self._wait(call, replicas.addresses if replicas is not None else ())
        else:
            self._send(call)

    def _replicas(self, loop: asyncio.AbstractEventLoop) -> _LoopReplicas | None:
        """``loop``'s replicas for the current list of addresses; None when there is none."""
        addresses = self.addresses()
        if not addresses:
            return None
        current = self._loops.get(loop)
        if current is None or current.addresses is not addresses:
            current = self._loops[loop] = _LoopReplicas(addresses, current)
        return current

    def _wait(self, call: RelayCall, previous: tuple[str, ...]) -> None:
        call.loop.create_task(self._send_when_changed(call, previous))

    async def _send_when_changed(self, call: RelayCall, previous: tuple[str, ...]) -> None:
        """Wait until the replica list differs from ``previous`` (non-empty), then send; the
        same list again after REPLICA_WAIT_S; fail the call when there is none or its
        deadline passed."""
        self.refresh()
        left = call.seconds_left()
        give_up = time.monotonic() + (REPLICA_WAIT_S if left is None else min(left, REPLICA_WAIT_S))
        while time.monotonic() < give_up and not call.done and not self._closed:
            addresses = self.addresses()
            if addresses and addresses != previous:
                self._send(call)
                return
            await asyncio.sleep(WAIT_POLL_S)
        if call.done:
            return
        left = call.seconds_left()
        if left is not None and left <= 0:
            call.fail(DeadlineExceededError("the request's deadline passed while its replicas were replaced",
                                            timeout_ms=None))
        elif self.addresses():
            self._send(call)  # the same replicas: try them again
        else:
            call.fail(ModelUnavailableError(
                f"model {self.model!r}: no replica reported an address within {REPLICA_WAIT_S:g} s; check the Ray "
                "cluster (serve status) and retry", model=self.model))

    def close(self, drain: bool = False, timeout_s: float = 60.0) -> None:
        """Refuse new requests; with ``drain``, wait (off the loop) until those in flight ended;
        then close every loop's connections."""
        with self._lock:
            self._closed = True
        give_up = time.monotonic() + timeout_s
        while drain and self.busy and time.monotonic() < give_up:
            time.sleep(DRAIN_POLL_S)
        for loop, replicas in list(self._loops.items()):
            for replica in replicas.replicas.values():
                if replica.link is not None:
                    try:
                        loop.call_soon_threadsafe(replica.link.close)
                    except RuntimeError:
                        pass  # that loop is closed: its connections went with it


def _error_of(frame: memoryview) -> TrtserveError:
    """The error of an error answer (unpacked: errors are rare, and their type decides)."""
    message = decode_frame(frame)
    error = message.get("error") if isinstance(message, dict) else None
    return error_from_wire(error)
