"""The Ray Serve deployment of one model: each replica runs the model's trtserve server.

A replica loads the model exactly as ``trtserve serve`` does (``ModelRepository.load``:
``backend.py``, version policy, nodes, instances, warmup), so it batches the same way,
and serves it with trtserve's own server on an ephemeral port (replica_server.py): the
data plane.  Front doors learn that address from the replica (``endpoint``, called by
Serve's ``broadcast``) and send requests there with the client library.

Ray Serve keeps the control plane: placement and per-replica resources, replica counts,
health checks (``check_health``) and replacement, and autoscaling, which it feeds from
``record_autoscaling_stats``: the requests the replica's server has in flight (Serve's own
count of ongoing handle requests sees none of them).
"""
from __future__ import annotations

import os
from typing import Any

from ray import serve

from ..errors import DeviceError, ModelUnavailableError
from .autoscale import IN_FLIGHT_METRIC
from .replica_server import ReplicaServer


class ModelReplica:
    """Serve deployment class; ``serve.deployment(ModelReplica)`` is built by deploy.py.

    ``host``: the address the replica's server binds; None binds the replica node's IP
    (what other machines reach), ``127.0.0.1`` keeps a one-machine cluster on loopback.
    ``grace_s``: how long its drain lets requests in flight finish when Serve stops it."""

    def __init__(self, root: str, model: str, kwargs: dict[str, Any], host: str | None, grace_s: float) -> None:
        self.model = model
        self.replica_id = _replica_id()
        self.server = ReplicaServer(root, model, kwargs, host or _node_ip() or "127.0.0.1", grace_s).start()
        self.repository = self.server.repository

    # -- control plane (the front door, via broadcast) ---------------------------------------
    def endpoint(self) -> dict[str, Any]:
        """Where this replica's server listens: ``{"replica", "address"}``."""
        return {"replica": self.replica_id, "address": self.server.address}

    def metadata(self) -> dict[int, dict[str, Any]]:
        """``model_metadata`` of every version this replica serves."""
        served = self._served()
        return {version: model.metadata() for version, model in served.items()}

    def statistics(self) -> dict[str, Any]:
        served = self._served()
        return {
            **self.endpoint(),
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "in_flight": self.server.in_flight,
            "versions": [served[v].statistics() for v in sorted(served)],
        }

    def _served(self) -> dict[int, Any]:
        latest = self.repository.get(self.model)
        return dict(latest.entry.models) if latest.entry is not None else {latest.version: latest}

    # -- Serve's hooks ---------------------------------------------------------------------
    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (autoscale.py's policy reads it)."""
        return {IN_FLIGHT_METRIC: float(self.server.in_flight)}

    def check_health(self) -> None:
        """Serve's health check: a sticky CUDA error, a lost model or a dead server thread
        restarts the replica."""
        from ..server.handlers import cuda_poisoned

        poisoned = cuda_poisoned()
        if poisoned is not None:
            raise DeviceError(f"replica {self.replica_id}: the GPU is unusable: {poisoned.message}")
        if not self.server.alive():
            raise ModelUnavailableError(f"replica {self.replica_id}: its trtserve server stopped", model=self.model)
        if not self.repository.loaded():
            raise ModelUnavailableError(f"replica {self.replica_id}: model {self.model!r} is not loaded", model=self.model)

    def __del__(self) -> None:
        # Serve calls this when it stops the replica (scale-down, redeploy, delete): the
        # server drains as on SIGTERM, and front doors resend what it refused elsewhere.
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # built outside a Serve replica (a unit test): the process names it
        return f"pid-{os.getpid()}"


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return ""
