"""A front door's infer operation: the request's frame relayed to a replica, not run here.

The front door checks what routing needs: the envelope (protocol.py and the dispatcher),
``model`` and ``version`` (the served version, or the typed error), and ``timeout_ms``
(its deadline also bounds the resends).  Everything else, inputs included, is the
replica's server to check: it is trtserve's own server over the same model, so a bad
input gets the same typed error, which comes back to the client as the replica wrote it
(forwarder.py).  Answers are counted in the front door's statistics and metrics as the
client sees them.

Shared-memory regions live in the front door's process, not in the replicas': a request
that names one is refused (INVALID_ARGUMENT); send such tensors in the frame.
"""
from __future__ import annotations

import time
from typing import Any

from ..errors import InvalidArgumentError, TrtserveError
from ..server.infer import InferHandler, timeout_seconds
from ..server.shm_io import is_reference
from .forwarder import RelayCall


class RelayHandler(InferHandler):
    """``InferHandler`` for a RayRepository's models (its model lookup, metrics and refusal
    counting); ``__call__`` relays instead of running the model here."""

    def __call__(self, message: dict[str, Any], connection: Any = None) -> RelayCall:
        started = time.perf_counter()
        io = None
        get = message.get
        try:
            name, model, io = self.resolve(message)
            if get("shm_outputs") is not None or (self.shm is not None and self.shm.lookup(connection) is not None
                                                   and _references(get("inputs"))):
                raise InvalidArgumentError(
                    f"model {name!r} runs in Ray replicas, which cannot read this front door's shared-memory "
                    "regions; send its inputs and take its outputs in the frame", field="shm_outputs", model=name)
            timeout_s = get("timeout_ms")
            if timeout_s is not None:
                timeout_s = timeout_seconds(message)
            pipeline = model.pipeline
            return pipeline.forwarder.relay(message, timeout_s, pipeline.stats, io.meter, started, self.loop)
        except TrtserveError as exc:
            if self.metrics is not None:
                self._count_refusal(message, io, exc)
            raise


def _references(inputs: Any) -> bool:
    return type(inputs) is dict and any(is_reference(value) for value in inputs.values())
