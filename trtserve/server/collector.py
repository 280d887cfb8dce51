"""Metrics read at scrape time: queue depth, busy instances, model state, connections.

These change on every request, so maintaining them as gauges would cost the serving path;
reading them when Prometheus asks costs one short scheduler-lock hold per node per scrape.
Runs on the metrics HTTP thread: everything it reads is either lock-protected
(``queue_depth``, ``busy_instances``) or a single read that the GIL keeps whole.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..errors import TrtserveError
from ..repository import LoadedModel, ModelRepository, ModelState
from .tracker import ConnectionTracker

NODE_LABELS = ["model", "version", "node"]


class LiveCollector(Collector):
    def __init__(self, repository: ModelRepository, trackers: list[ConnectionTracker], ready: Callable[[], bool]) -> None:
        self.repository = repository
        self.trackers = trackers  # one per I/O loop
        self.ready = ready

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._nodes()
        yield self._states()
        yield GaugeMetricFamily("trtserve_connections", "Open client connections", value=sum(len(t.connections) for t in self.trackers))
        yield GaugeMetricFamily("trtserve_requests_in_flight", "Requests read and not yet answered", value=sum(t.in_flight for t in self.trackers))
        yield GaugeMetricFamily("trtserve_ready", "1 while the server accepts work, 0 while starting or draining", value=float(self.ready()))

    def _nodes(self) -> Iterator[GaugeMetricFamily]:
        queued = GaugeMetricFamily("trtserve_queue_items", "Requests waiting in a node's queue", labels=NODE_LABELS)
        busy = GaugeMetricFamily("trtserve_instances_busy", "A node's instances running a batch now", labels=NODE_LABELS)
        total = GaugeMetricFamily("trtserve_instances", "A node's instances (instance_num)", labels=NODE_LABELS)
        for model in self._served():
            for node in model.pipeline.nodes:
                labels = [model.name, str(model.version), node.name]
                queued.add_metric(labels, node.queue_depth())
                busy.add_metric(labels, node.busy_instances())
                total.add_metric(labels, node.scheduling.instance_num)
        return iter((queued, busy, total))

    def _served(self) -> list[LoadedModel]:
        served = []
        for name in self.repository.loaded():
            try:
                latest = self.repository.get(name)
            except TrtserveError:
                continue  # unloaded between the listing and the lookup
            versions = dict(latest.entry.models) if latest.entry is not None else {latest.version: latest}
            served += [versions[v] for v in sorted(versions)]
        return served

    def _states(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "trtserve_model_state", "1 for each model's current state (READY, LOADING, UNAVAILABLE, UNLOADED), else 0",
            labels=["model", "state"],
        )
        for row in self.repository.index():
            for state in ModelState:
                family.add_metric([row["name"], state.value], 1.0 if row["state"] == state.value else 0.0)
        return family
