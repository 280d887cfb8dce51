"""Front door -> replicas: each request travels over trtserve's protocol, not through Ray.

Every replica serves its model with trtserve's own server (replica_server.py) and reports
its address; the status thread (status.py) keeps the list of those addresses current.  The
front door sends each request there with the client library: one ``AsyncClient`` per
front-door event loop, across every replica's address, so each request goes to the
replica with the fewest requests outstanding, and a replica whose connection fails is
skipped for a while.  A request whose connection dropped before its answer (a replica
killed, or one draining as Serve stops it) is sent again here, so the next pick is another
replica.  Tensors cross as the protocol's out-of-band buffers: the front door's received
arrays are referenced, never copied, when the request is sent on, and the replica's answer
is decoded into views of the received bytes.

When the replicas change (one added, replaced or removed), the next request builds a new
client over the new list; the previous one closes once its last request is answered.  A
request that failed on every replica the client knew waits for the list to change (a
replacement starting) and is sent again, up to ``RESEND_LIMIT`` times, while its deadline
allows.  This is safe because inference is idempotent.  After ``RESEND_LIMIT`` resends it
fails, with MODEL_UNAVAILABLE.

Everything here runs on front-door event loops, except ``close``.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from trtserve_client import AsyncClient
from trtserve_client.aio import ANONYMOUS_INPUT, RETRIABLE
from trtserve_client.wire import decode_value, encode_value

from ..errors import DeadlineExceededError, InternalError, ModelUnavailableError, ShuttingDownError, TrtserveError
from ..stats import ModelStats

log = logging.getLogger("trtserve.scaleout")

RESEND_LIMIT = 8  # a request is sent again at most this many times before it fails
REPLICA_WAIT_S = 30.0  # how long a request waits for a replica to report an address
WAIT_POLL_S = 0.05
DRAIN_POLL_S = 0.01
CONNECTIONS_PER_REPLICA = 1  # a connection pipelines; the replica reads many frames per wake-up


class Forward:
    """One forwarded request: the pipeline's ``Request`` counterpart (it can be cancelled)."""

    __slots__ = ("item", "on_done", "deadline", "priority", "version", "stats", "task", "finished", "started")

    def __init__(self, item, on_done, deadline, priority, version, stats) -> None:
        self.item = item
        self.on_done: Callable[[dict[str, Any], TrtserveError | None], None] = on_done
        self.deadline: float | None = deadline  # time.monotonic()
        self.priority = priority
        self.version = version
        self.stats: ModelStats = stats  # the served version's front-door statistics
        self.task: asyncio.Task | None = None
        self.finished = False
        self.started = time.perf_counter_ns()

    def cancel(self, error: TrtserveError | None = None) -> None:
        """The caller gave up (its deadline, or its connection): stop waiting for the replica."""
        if self.finished:
            return
        if self.task is not None:
            self.task.cancel()
        self.finish(error or ShuttingDownError("the request was cancelled before its replica answered"))

    def finish(self, error: TrtserveError | None) -> None:
        if self.finished:
            return
        self.finished = True
        outcome = error.name if error is not None else None
        self.stats.record(0, time.perf_counter_ns() - self.started, outcome)
        self.on_done(self.item, error)

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


class _LoopClient:
    """The client of one front-door loop, over one list of replica addresses."""

    __slots__ = ("addresses", "client", "in_flight", "retired")

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.addresses = addresses
        # retries=0: the forwarder resends (and counts) itself, across replica lists too.
        self.client = AsyncClient(endpoints=list(addresses), connections=CONNECTIONS_PER_REPLICA, retries=0)
        self.in_flight = 0
        self.retired = False

    def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            asyncio.get_running_loop().create_task(self.client.close())


class Forwarder:
    """Sends one model's requests to its replicas' servers (see the module docstring)."""

    def __init__(self, model: str, input_name: str | None, addresses: Callable[[], tuple[str, ...]],
                 refresh: Callable[[], None]) -> None:
        self.model = model
        self.input_name = input_name or ANONYMOUS_INPUT  # what a lone input is sent as
        self.addresses = addresses  # the replicas' addresses as last reported (a tuple, replaced on change)
        self.refresh = refresh  # asks the status thread to look for replicas now
        self.resent = 0  # requests sent again after every replica they were sent to failed
        self._clients: dict[asyncio.AbstractEventLoop, _LoopClient] = {}
        self._in_flight = 0
        self._closed = False
        self._lock = threading.Lock()  # close() runs on another thread

    @property
    def busy(self) -> bool:
        return self._in_flight > 0

    def submit(self, item: dict[str, Any], on_done, deadline: float | None, priority: int, version: int,
               stats: ModelStats) -> Forward:
        """Send ``item`` to a replica; must run on a front-door loop."""
        if self._closed:
            raise ShuttingDownError(f"model {self.model!r}: this deployment generation is retired", model=self.model)
        forward = Forward(item, on_done, deadline, priority, version, stats)
        self._in_flight += 1
        forward.task = asyncio.get_running_loop().create_task(self._forward(forward))
        # Counted down when the task ends, however: a task cancelled before its first step
        # never runs its body, so a `finally` there would not.
        forward.task.add_done_callback(self._ended)
        return forward

    def _ended(self, _task: asyncio.Task) -> None:
        self._in_flight -= 1

    async def _forward(self, forward: Forward) -> None:
        try:
            failed_here = 0  # consecutive failures on the current replica list
            for _attempt in range(RESEND_LIMIT + 1):
                client = await self._client(forward)
                if client is None:
                    return  # failed while waiting for a replica
                client.in_flight += 1
                try:
                    result = await client.client.request("infer", None, **self._fields(forward))
                except RETRIABLE as exc:
                    # The client marked that replica down: a resend picks another one.
                    self.resent += 1
                    failed_here += 1
                    log.info("model %s: a replica dropped a request (%s); sending it again", self.model,
                             type(exc).__name__)
                    if failed_here >= len(client.addresses):  # every replica it knows failed
                        failed_here = 0
                        if not await self._changed(client.addresses, forward):
                            return
                    continue
                finally:
                    client.release()
                self._deliver(forward, result)
                return
            forward.finish(ModelUnavailableError(
                f"model {self.model!r}: its replicas dropped this request {RESEND_LIMIT + 1} times; check the Ray "
                "cluster (serve status) and retry", model=self.model))
        except TrtserveError as exc:  # the replica's answer: the model's own error, passed on as it is
            forward.finish(exc)
        except asyncio.CancelledError:
            forward.finish(ShuttingDownError("the front door stopped before the replica answered"))
            raise
        except Exception as exc:  # a bug: answer, never leave the caller waiting
            log.exception("model %s: forwarding a request failed", self.model)
            forward.finish(InternalError(f"model {self.model!r}: forwarding to its replica failed: "
                                         f"{type(exc).__name__}: {exc}", model=self.model))

    def _fields(self, forward: Forward) -> dict[str, Any]:
        data = forward.item["data"]
        values = data if type(data) is dict else {self.input_name: data}
        fields: dict[str, Any] = {"model": self.model, "version": forward.version,
                                  "inputs": {name: encode_value(value) for name, value in values.items()}}
        if forward.priority:
            fields["priority"] = forward.priority
        left = forward.seconds_left()
        if left is not None:  # the replica drops what nobody waits for any more
            fields["timeout_ms"] = max(left, 1e-3) * 1000.0
        return fields

    @staticmethod
    def _deliver(forward: Forward, result: dict[str, Any]) -> None:
        outputs = result.get("outputs") or {}
        forward.item["result"] = {name: decode_value(value, f"outputs[{name!r}]") for name, value in outputs.items()}
        forward.finish(None)

    async def _client(self, forward: Forward) -> _LoopClient | None:
        """This loop's client over the current replica list (waiting for one to report)."""
        addresses = self.addresses()
        if not addresses:
            addresses = await self._changed((), forward)
            if not addresses:
                return None
        loop = asyncio.get_running_loop()
        current = self._clients.get(loop)
        if current is None or current.addresses is not addresses:
            if current is not None:
                current.retired = True
                if current.in_flight == 0:
                    loop.create_task(current.client.close())
            current = self._clients[loop] = _LoopClient(addresses)
        return current

    async def _changed(self, previous: tuple[str, ...], forward: Forward) -> tuple[str, ...]:
        """Wait until the replica list differs from ``previous`` (non-empty); the same list
        again after REPLICA_WAIT_S; () when there is none or the request's deadline passed,
        after failing the request."""
        self.refresh()
        left = forward.seconds_left()
        give_up = time.monotonic() + (REPLICA_WAIT_S if left is None else min(left, REPLICA_WAIT_S))
        while time.monotonic() < give_up:
            addresses = self.addresses()
            if addresses and addresses != previous:
                return addresses
            await asyncio.sleep(WAIT_POLL_S)
        left = forward.seconds_left()
        if left is not None and left <= 0:
            forward.finish(DeadlineExceededError("the request's deadline passed while its replicas were replaced",
                                                 timeout_ms=None))
            return ()
        addresses = self.addresses()
        if addresses:
            return addresses  # the same replicas: try them again
        forward.finish(ModelUnavailableError(
            f"model {self.model!r}: no replica reported an address within {REPLICA_WAIT_S:g} s; check the Ray "
            "cluster (serve status) and retry", model=self.model))
        return ()

    def close(self, drain: bool = False, timeout_s: float = 60.0) -> None:
        """Refuse new requests; with ``drain``, wait (off the loop) until those in flight ended;
        then close every loop's client."""
        with self._lock:
            self._closed = True
        give_up = time.monotonic() + timeout_s
        while drain and self.busy and time.monotonic() < give_up:
            time.sleep(DRAIN_POLL_S)
        for loop, current in list(self._clients.items()):
            try:
                asyncio.run_coroutine_threadsafe(current.client.close(), loop)
            except RuntimeError:
                pass  # that loop is closed: its connections went with it
