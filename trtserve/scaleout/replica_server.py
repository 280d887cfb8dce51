"""A replica's data plane: trtserve's own server, serving the replica's one model.

Each Serve replica runs the ordinary ``trtserve.server.Server`` on a thread of its own
(a uvloop loop), on an ephemeral port of the replica node's address.  Front doors send it
their requests with the client library over trtserve's protocol, so tensors never pass
through Ray calls; Ray Serve only places, counts, checks and replaces replicas.

The server serves exactly one model (``OneModelRepository``), in model-control mode
``none``: clients cannot load or unload anything on a replica.  Its only clients are
front doors, which keep their connections open for as long as the replica lives, so idle
connections are not reaped and one connection may carry many requests at once.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import uvloop

from ..errors import ModelUnavailableError
from ..repository import ModelRepository
from ..server.app import Server
from ..server.listener import LoopThread

log = logging.getLogger("trtserve.scaleout")

START_TIMEOUT_S = 3600.0  # loading and warming up a model; Serve's own timeouts bound it first
# A front door multiplexes all of its clients over one connection per replica.
MAX_IN_FLIGHT_PER_CONNECTION = 4096


class OneModelRepository(ModelRepository):
    """A repository that sees only ``model`` of its folder: a replica loads nothing else."""

    def __init__(self, root: str | Path, model: str, kwargs: dict[str, Any] | None = None) -> None:
        self.only = model
        super().__init__(root, kwargs)

    def scan(self) -> list[str]:
        return [name for name in super().scan() if name == self.only]


class ReplicaServer:
    """``Server`` for one model on its own thread; ``start`` returns once the model is READY
    (or raises ModelUnavailableError with the load's reason)."""

    def __init__(self, root: str, model: str, kwargs: dict[str, Any], host: str, grace_s: float) -> None:
        self.model = model
        self.repository = OneModelRepository(root, model, kwargs)
        self.server = Server(self.repository, host=host, port=0, model_control="none", grace_s=grace_s,
                             idle_timeout_s=0, max_in_flight_per_connection=MAX_IN_FLIGHT_PER_CONNECTION)
        self._thread: LoopThread | None = None

    @property
    def address(self) -> str:
        host, port = self.server.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def in_flight(self) -> int:
        """Requests read and not yet answered: the replica's load, as its autoscaler sees it."""
        return self.server.in_flight

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ReplicaServer:
        thread = self._thread = LoopThread(uvloop.new_event_loop, f"trtserve-replica-{self.model}")
        try:  # raises what the server's start raised (a port it cannot bind, ...)
            thread.submit(self.server.start()).result(START_TIMEOUT_S)
        except BaseException as exc:
            thread.stop(30)
            if isinstance(exc, TimeoutError):
                raise ModelUnavailableError(f"model {self.model!r}: the replica's server did not start",
                                            model=self.model) from None
            raise
        row = next((r for r in self.repository.index() if r["name"] == self.model), None)
        if row is None or row["state"] != "READY":
            reason = (row or {}).get("reason") or f"no model {self.model!r} in {self.repository.root}"
            self.stop(grace_s=0)
            raise ModelUnavailableError(f"model {self.model!r} failed to load in its replica: {reason}",
                                        model=self.model)
        log.info("replica of %s serving on %s", self.model, self.address)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """The server's drain: no new requests, those in flight answered (up to ``grace_s``),
        the model closed.  Front doors resend what it did not read to other replicas."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        grace = self.server.grace_s if grace_s is None else grace_s
        try:
            thread.submit(self.server.stop(grace)).result(grace + 60)
        finally:
            thread.stop(30)
