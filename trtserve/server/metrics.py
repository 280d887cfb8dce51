"""Prometheus metrics on a private registry, served over HTTP on ``--metrics-port``.

Three sources, each as cheap as it can be on the serving path:

* **Answers** (``trtserve_request_success_total``, ``..._failure_total{reason}``,
  ``trtserve_request_duration_seconds``): counted by the infer path once per answer, as the
  client sees it, through a :class:`ModelMeter` cached per served model version (label
  lookups happen once, not per request).
* **Model statistics** (queue and compute time, batch sizes, rows per model call): listeners on each served
  version's ``ModelStats``/``NodeStats``, subscribed by a repository load hook when the
  version is built, before it serves.  A reload builds new pipelines with new statistics,
  so each is subscribed exactly once; the listeners hold only metric children, never the
  pipeline, so a retired version leaves nothing behind.
* **Live state** (queue depth, busy instances, model state, connections): read at scrape
  time by :class:`LiveCollector` (collector.py), never maintained on the serving path.

No global registry: every Server owns one, so tests can run several in one process.
"""
from __future__ import annotations

import functools
import logging
import socket
import threading
import weakref
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app

from ..repository import LoadedModel, ModelRepository
from .collector import LiveCollector
from .health import with_health
from .tracker import ConnectionTracker

log = logging.getLogger("trtserve.server")

# Seconds: from 100 us (an Identity round trip) to 10 s (a big batch on a slow model).
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REFUSAL_TYPES = ("auth", "connection_limit", "frame_too_large", "protocol_error", "permission_denied", "tls_handshake",
                 "unsupported_protocol", "memory")
PAUSE_CAUSES = ("in_flight", "write_buffer")


class ModelMeter:
    """One served model version's answer metrics, with its label children resolved once."""

    __slots__ = ("_success", "_duration", "_failure", "_labels", "_failures")

    def __init__(self, metrics: Metrics, model: LoadedModel) -> None:
        self._labels = (model.name, str(model.version))
        self._success = metrics.success.labels(*self._labels)
        self._duration = metrics.duration.labels(*self._labels)
        self._failure = metrics.failure
        self._failures: dict[str, Any] = {}  # reason -> child; error names are a small fixed set

    def done(self, reason: str | None, seconds: float) -> None:
        """An answered request: its outcome and its duration from read to answer."""
        self._duration.observe(seconds)
        if reason is None:
            self._success.inc()
        else:
            self.failed(reason)

    def failed(self, reason: str) -> None:
        child = self._failures.get(reason)
        if child is None:
            child = self._failures[reason] = self._failure.labels(*self._labels, reason)
        child.inc()


class Metrics:
    """Every metric of one server.  ``watch(repository)`` before models load; ``serve(host,
    port)`` once listening; ``close()`` at shutdown."""

    def __init__(self, trackers: list[ConnectionTracker], ready: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        model_version = ["model", "version"]
        self.success = Counter("trtserve_request_success", "Infer requests answered with a result", model_version, registry=r)
        self.failure = Counter(
            "trtserve_request_failure", "Infer requests answered with an error, by error name", model_version + ["reason"], registry=r
        )
        self.duration = Histogram(
            "trtserve_request_duration_seconds", "Infer requests from read to answer (end to end in the server)",
            model_version, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue = Histogram(
            "trtserve_request_queue_seconds", "Time successful requests waited in the model's queues",
            model_version, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compute = Histogram(
            "trtserve_request_compute_seconds", "Time successful requests spent in the model's backends",
            model_version, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "trtserve_batch_size", "Size of each batch a node ran (rows, counted as toward max)",
            model_version + ["node"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.call_rows = Histogram(
            "trtserve_model_call_rows", "Rows of each model call a node's backend made (a batch of mixed shapes may take several)",
            model_version + ["node"], buckets=BATCH_BUCKETS, registry=r,
        )
        self.refusals = Counter("trtserve_refusals", "Connections and requests refused, by type", ["type"], registry=r)
        self.pauses = Counter("trtserve_reading_paused", "Times the server stopped reading a connection, by cause", ["cause"], registry=r)
        for kind in REFUSAL_TYPES:  # every type shows, at 0, before the first refusal
            self.refusals.labels(kind)
        for cause in PAUSE_CAUSES:
            self.pauses.labels(cause)
        self._trackers = trackers
        self._ready = ready
        self._watched: weakref.WeakSet = weakref.WeakSet()
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self._refusal = {kind: self.refusals.labels(kind).inc for kind in REFUSAL_TYPES}
        self._pause = {cause: self.pauses.labels(cause).inc for cause in PAUSE_CAUSES}
        for tracker in trackers:  # one per I/O loop; prometheus_client's counters are thread-safe
            tracker.refused = self._refused
            tracker.paused = self._paused

    def _refused(self, kind: str) -> None:
        self._refusal[kind]()

    def _paused(self, cause: str) -> None:
        self._pause[cause]()

    # -- model statistics ----------------------------------------------------------------
    def watch(self, repository: ModelRepository) -> None:
        """Subscribe to every version the repository builds from now on; report its live state."""
        repository.load_hooks.append(self.subscribe)
        self.registry.register(LiveCollector(repository, self._trackers, self._ready))

    def subscribe(self, model: LoadedModel) -> None:
        pipeline = model.pipeline
        if pipeline in self._watched:
            return  # already listening: a second subscription would count everything twice
        self._watched.add(pipeline)
        labels = (model.name, str(model.version))
        queue, compute = self.queue.labels(*labels).observe, self.compute.labels(*labels).observe

        def on_request(queue_ns: int, compute_ns: int, error: str | None) -> None:
            if error is None:  # a refused request has no meaningful queue or compute time
                queue(queue_ns * 1e-9)
                compute(compute_ns * 1e-9)

        pipeline.stats.add_listener(on_request)
        for node in pipeline.nodes:
            observe = self.batch_size.labels(*labels, node.name).observe
            node.stats.add_listener(functools.partial(_observe_size, observe))
            node.stats.add_call_listener(self.call_rows.labels(*labels, node.name).observe)

    # -- answers -------------------------------------------------------------------------
    def meter(self, model: LoadedModel) -> ModelMeter:
        return ModelMeter(self, model)

    def refused_request(self, model: str, reason: str) -> None:
        """An infer refused before any served version was found (no version label)."""
        self.failure.labels(model, "", reason).inc()

    # -- HTTP ----------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` (any path but the health ones: health.py) on ``host:port`` from a
        daemon thread; the bound port."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

        class MetricsHTTPServer(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = family  # IPv4 or IPv6, as host resolves

        app = with_health(make_wsgi_app(self.registry), self._ready)  # /healthz, /readyz, else metrics
        self._http = http = make_server(host, port, app, MetricsHTTPServer, handler_class=_QuietHandler)
        self.port = http.server_port
        # A short poll interval: shutdown() waits for it, and tests stop many servers.
        self._thread = thread = threading.Thread(
            target=http.serve_forever, kwargs={"poll_interval": 0.05}, name="trtserve-metrics", daemon=True
        )
        thread.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        """Stop the HTTP server (blocks until its thread ends: call it off the event loop)."""
        if self._http is not None and self._thread is not None:
            self._http.shutdown()
            self._http.server_close()
            self._thread.join()
            self._http = None


def _observe_size(observe: Callable[[float], None], size: int, compute_ns: int, failed: bool) -> None:
    """A node's batch listener that records only the batch size."""
    observe(size)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes every few seconds would flood stderr; errors still reach the logger."""
