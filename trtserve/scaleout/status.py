"""What the cluster says about each deployed model, refreshed off the serving path.

A status thread asks Ray Serve, once every ``interval_s``, for each application's state
(``serve.status()``) and for every replica's own statistics (a ``broadcast`` of the
replica's ``statistics`` method), which carry the address of the replica's server.
``repository_index``, ``ready``, ``model_metadata`` and ``statistics`` read the latest
answers, so they never block the front door's event loop on the cluster; they are at most
one interval old.  The forwarders read the replicas' addresses from the same answers, and
wake the thread (``wake``) when a request finds no replica that answers, so that a
replacement is found without waiting for the next interval.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("trtserve.scaleout")

DEFAULT_STATUS_INTERVAL_S = 1.0
SERVING_STATES = ("RUNNING",)  # replica states that take calls


@dataclass
class ClusterView:
    """One model's deployment as the cluster last reported it."""

    app: str
    deployment: str
    app_status: str = "UNKNOWN"  # until the first status poll
    deployment_status: str = "UNKNOWN"
    message: str = ""
    replica_states: dict[str, int] = field(default_factory=dict)
    replicas: list[dict[str, Any]] = field(default_factory=list)  # each replica's statistics()
    # The replicas' servers, "host:port"; replaced (never changed in place) when they change,
    # so a forwarder on an event loop compares by identity.
    addresses: tuple[str, ...] = ()
    updated: float = 0.0  # time.time() of the last successful poll

    def set_replicas(self, rows: list[dict[str, Any]]) -> None:
        self.replicas = rows
        addresses = tuple(sorted({row["address"] for row in rows if row.get("address")}))
        if addresses != self.addresses:
            log.info("deployment %s: replicas serve on %s", self.deployment, ", ".join(addresses) or "nothing")
            self.addresses = addresses

    @property
    def running_replicas(self) -> int:
        return sum(n for state, n in self.replica_states.items() if state in SERVING_STATES)

    def summary(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "deployment": self.deployment,
            "status": self.deployment_status,
            "app_status": self.app_status,
            "message": self.message,
            "replica_states": dict(self.replica_states),
            "running_replicas": self.running_replicas,
        }


class Watched(Protocol):
    """What the monitor reads of the repository it watches (repository.RayRepository)."""

    views: dict[str, ClusterView]

    def deployment_handles(self) -> dict[str, Any]: ...


class StatusMonitor:
    """The daemon thread that keeps every ClusterView of a RayRepository current."""

    def __init__(self, repository: Watched, interval_s: float = DEFAULT_STATUS_INTERVAL_S) -> None:
        self.repository = repository
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trtserve-ray-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def wake(self) -> None:
        """Poll now (any thread): a forwarder looks for a replica that answers."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:  # a cluster hiccup must not end the thread: the next poll retries
                log.warning("Ray status poll failed", exc_info=True)

    def observe(self, view: ClusterView) -> None:
        """Fill a new view at once, so the index is right from the model's first moment."""
        from ray import serve

        _apply_status(view, serve.status().applications.get(view.app))

    def refresh(self) -> None:
        """One poll: application states, then each deployed model's replica statistics."""
        from ray import serve

        applications = serve.status().applications
        for view in list(self.repository.views.values()):
            _apply_status(view, applications.get(view.app))
        for name, handle in self.repository.deployment_handles().items():
            deployed = self.repository.views.get(name)
            if deployed is not None and deployed.running_replicas:
                deployed.set_replicas(_replica_statistics(handle, self.interval_s, deployed.replicas))
            elif deployed is not None:
                deployed.set_replicas([])


def _apply_status(view: ClusterView, app: Any) -> None:
    view.updated = time.time()
    if app is None:
        view.app_status, view.deployment_status, view.replica_states, view.message = "NOT_FOUND", "NOT_FOUND", {}, ""
        return
    view.app_status = str(getattr(app.status, "value", app.status))
    view.message = app.message or ""
    deployment = app.deployments.get(view.deployment)
    if deployment is None:
        view.deployment_status, view.replica_states = "NOT_FOUND", {}
        return
    view.deployment_status = str(getattr(deployment.status, "value", deployment.status))
    view.replica_states = {str(getattr(k, "value", k)): int(v) for k, v in deployment.replica_states.items()}
    view.message = deployment.message or view.message


def replica_rows(handle: Any, timeout_s: float) -> list[dict[str, Any]]:
    """Every running replica's ``statistics()`` (its address among them), by replica id;
    a replica that fails to answer (it is being stopped, or died) is left out."""
    rows = handle.broadcast("statistics").results(timeout_s=timeout_s, return_exceptions=True)
    return sorted((r for r in rows if isinstance(r, dict)), key=lambda r: r.get("replica", ""))


def _replica_statistics(handle: Any, timeout_s: float, previous: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """replica_rows, or the previous rows while none can answer (all of them being
    replaced, say): statistics then lag, they never vanish."""
    from ray.serve.exceptions import RayServeException

    try:
        return replica_rows(handle, max(timeout_s * 2, 1.0))
    except (RayServeException, TimeoutError) as exc:
        log.debug("replica statistics unavailable for now: %s", exc)
        return previous
