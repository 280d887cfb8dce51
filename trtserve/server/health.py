"""HTTP health endpoints for orchestrators, served beside ``/metrics`` on ``--metrics-port``.

* ``GET /healthz`` (liveness): 200 ``ok`` while the process can serve; 503 with the reason
  once a sticky CUDA error made its GPU unusable (only a restart helps: the same test as
  the protocol's ``live`` operation).
* ``GET /readyz`` (readiness): 200 ``ready`` while the server accepts work; 503 while it
  starts and from the moment it begins draining on SIGTERM (the protocol's ``ready``
  without a model), so a load balancer stops sending it new connections.

Any other path is the Prometheus exporter, as before.  Kubernetes probes
(deploy/kubernetes/) use these two paths.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

HEALTHZ, READYZ = "/healthz", "/readyz"
WsgiApp = Callable[[dict[str, Any], Callable], Iterable[bytes]]


def liveness_problem() -> str | None:
    """Why this process should be restarted, or None (a lazy import: no CUDA on CPU servers)."""
    from .handlers import cuda_poisoned

    poisoned = cuda_poisoned()
    return None if poisoned is None else poisoned.message


def with_health(metrics_app: WsgiApp, ready: Callable[[], bool]) -> WsgiApp:
    """``metrics_app`` with ``/healthz`` and ``/readyz`` in front of it."""

    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == HEALTHZ:
            problem = liveness_problem()
            return _answer(start_response, problem is None, "ok" if problem is None else f"not live: {problem}")
        if path == READYZ:
            serving = ready() and liveness_problem() is None
            return _answer(start_response, serving, "ready" if serving else "not ready: starting, draining or GPU lost")
        return metrics_app(environ, start_response)

    return app


def _answer(start_response: Callable, ok: bool, text: str) -> list[bytes]:
    body = (text + "\n").encode()
    status = "200 OK" if ok else "503 Service Unavailable"
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]
