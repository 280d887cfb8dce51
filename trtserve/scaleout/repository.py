"""The front door's model repository: each model is a Ray Serve deployment, not a pipeline.

``RayRepository`` is a ``ModelRepository`` whose versions are built by deploying the
model, so the server (``Server``, ``Dispatcher``, ``InferHandler``), model control
(load, unload, poll), the version policy and the index work unchanged on top of it.  A
served version is a ``DeployedModel``: a ``LoadedModel`` whose pipeline is a
``RemotePipeline`` that forwards to the replicas' own servers (forwarder.py).

The repository folder must be readable at the same path on the front door and on every
Ray node (a shared volume, or the same image): the front door validates the config (so
typos fail at once, with the usual ConfigError) and the replicas load the model from it.

Each model is one Serve application, ``<app_prefix><model>``, whose one deployment is
named after the model and a digest of its folder, ``[ray]`` settings, load options and
the address its replicas' servers bind.
A front door that finds the application already running with that very deployment (a
second front door, or a restart) attaches to it instead of redeploying; any change to
the model's files or settings deploys it again, which Serve does replica by replica.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from .. import __version__
from ..backend import TensorSpec
from ..config import ModelConfig, load_config, read_toml
from ..errors import ConfigError, InternalError, ModelUnavailableError
from ..pipeline import ItemCallback
from ..served import Submitted
from ..repository import (
    CONFIG_FILE,
    LoadedModel,
    ModelRepository,
    _Entry,
    check_version_names,
    latest_version_dir,
)
from ..stats import ModelStats
from ..versions import fingerprint
from .deploy import REPLICA_DRAIN_S, deploy
from .forwarder import Forwarder
from .relay import RelayHandler
from .settings import (
    DEFAULT_APP_PREFIX,
    DEFAULT_DEPLOY_TIMEOUT_S,
    Override,
    RaySettings,
    apply_overrides,
    parse_ray_table,
)
from .status import DEFAULT_STATUS_INTERVAL_S, ClusterView, StatusMonitor, replica_rows

log = logging.getLogger("trtserve.scaleout")

METADATA_TIMEOUT_S = 120.0  # asked of a replica that already runs: its load is done


class RemotePipeline:
    """The part of ``Pipeline`` that the server uses, for one version served by Ray."""

    nodes: tuple[Any, ...] = ()  # no local nodes: the replicas' nodes report through statistics

    def __init__(self, forwarder: Forwarder, version: int, metadata: dict[str, Any]) -> None:
        self.forwarder = forwarder
        self.version = version
        self.remote_metadata = metadata
        self.stats = ModelStats()  # outcomes as this front door answered them

    def submit(self, item: dict[str, Any], on_done: ItemCallback, deadline: float | None = None,
               priority: int = 0) -> Submitted:
        """Items never run here: the front door relays infer frames (relay.py)."""
        raise InternalError(f"model {self.forwarder.model!r} runs in its Ray replicas; its requests are relayed")

    def io_spec(self) -> tuple[list[TensorSpec] | None, list[TensorSpec] | None]:
        def specs(rows: list[dict[str, Any]]) -> list[TensorSpec] | None:
            return [TensorSpec(r["name"], r["dtype"], tuple(r["shape"])) for r in rows] or None

        return specs(self.remote_metadata.get("inputs") or []), specs(self.remote_metadata.get("outputs") or [])

    @property
    def max_batch(self) -> int:
        return int(self.remote_metadata.get("max_batch_size") or 1)

    def close(self, drain: bool = False) -> None:
        self.forwarder.close(drain=drain)


@dataclass
class DeployedModel(LoadedModel):
    """A served version whose pipeline runs in the replicas of a Serve deployment."""

    pipeline: RemotePipeline
    view: ClusterView | None = field(default=None, repr=False)
    settings: RaySettings = field(default_factory=RaySettings)

    def is_ready(self) -> bool:
        """Ready while a replica runs (before the first status poll, the deploy said so)."""
        return self.view is None or self.view.updated == 0.0 or self.view.running_replicas > 0

    def metadata(self) -> dict[str, Any]:
        metadata = dict(self.pipeline.remote_metadata)
        metadata["versions"] = sorted(self.entry.models) if self.entry else [self.version]
        metadata["deployment"] = self._deployment()
        return metadata

    def statistics(self) -> dict[str, Any]:
        """The front door's outcomes, and each replica's own statistics of this version
        (queue and compute time, batches) summed over the replicas and row by row."""
        stats = self.pipeline.stats.snapshot()
        stats.update(name=self.name, version=self.version, nodes={}, deployment=self._deployment())
        replicas: list[dict[str, Any]] = []
        batch_sizes: dict[str, int] = {}
        queue_ns = compute_ns = 0
        for row in self.view.replicas if self.view else []:
            mine: dict[str, Any] = next((v for v in row.get("versions", []) if v.get("version") == self.version), {})
            for size, count in mine.get("batch_sizes", {}).items():
                batch_sizes[size] = batch_sizes.get(size, 0) + count
            queue_ns += mine.get("queue_ns") or 0
            compute_ns += mine.get("compute_ns") or 0
            replicas.append({
                **{k: row.get(k) for k in ("replica", "address", "pid", "node_ip", "in_flight")},
                **{k: mine.get(k) for k in ("success_count", "failure_count", "failure_by_reason", "queue_ns",
                                            "compute_ns", "nodes")},
            })
        stats.update(queue_ns=queue_ns, compute_ns=compute_ns, replicas=replicas,
                     batch_sizes=dict(sorted(batch_sizes.items(), key=lambda kv: int(kv[0]))))
        stats["resent_requests"] = self.pipeline.forwarder.resent  # of every version of this deployment generation
        return stats

    def _deployment(self) -> dict[str, Any]:
        summary = self.view.summary() if self.view else {}
        summary["settings"] = self.settings.as_table()
        return summary


class RayRepository(ModelRepository):
    """``ModelRepository`` that deploys each model to Ray Serve (see the module docstring)."""

    infer_handler = RelayHandler  # the server relays infer frames to the replicas

    def __init__(
        self,
        root: str | Path,
        kwargs: dict[str, Any] | None = None,
        *,
        overrides: Sequence[Override] = (),
        app_prefix: str = DEFAULT_APP_PREFIX,
        status_interval_s: float = DEFAULT_STATUS_INTERVAL_S,
        deploy_timeout_s: float = DEFAULT_DEPLOY_TIMEOUT_S,
        replica_host: str | None = None,
        replica_grace_s: float = REPLICA_DRAIN_S,
    ) -> None:
        super().__init__(root, kwargs)
        if not deploy_timeout_s > 0:
            raise ConfigError(f"--ray-deploy-timeout must be > 0 seconds, got {deploy_timeout_s!r}",
                              key="ray_deploy_timeout", value=repr(deploy_timeout_s))
        self.deploy_timeout_s = float(deploy_timeout_s)
        self.overrides = list(overrides)
        self.app_prefix = _check_prefix(app_prefix)
        unknown = sorted({o.model for o in self.overrides if o.model is not None} - set(self.scan()))
        if unknown:
            raise ConfigError(f"--ray-set names model {unknown[0]!r}, which is not in {self.root} (models there: "
                              f"{self.scan()})", key="ray_set", value=unknown[0])
        self.replica_host = replica_host  # None: each replica binds its node's IP
        self.replica_grace_s = float(replica_grace_s)
        self.views: dict[str, ClusterView] = {}
        self._handles: dict[str, Any] = {}  # model -> DeploymentHandle (control plane only)
        self.monitor = StatusMonitor(self, status_interval_s)
        self.monitor.start()

    # -- building = deploying ------------------------------------------------------------
    def _build_versions(self, name: str, folder: Path, entry: _Entry) -> dict[int, LoadedModel]:
        config, settings = self._validate(name, folder)
        app, deployment = self.app_prefix + name, f"{name}-{self._digest(folder, settings)}"
        init_args = (str(self.root.resolve()), name, dict(self.kwargs), self.replica_host, self.replica_grace_s)
        handle = deploy(app, deployment, settings, init_args, timeout_s=self.deploy_timeout_s,
                        replacing=bool(entry.models))
        try:
            metadata = handle.metadata.remote().result(timeout_s=METADATA_TIMEOUT_S)
        except Exception as exc:
            raise ModelUnavailableError(f"model {name!r}: its replicas did not report metadata: {exc}", model=name) from exc
        view = ClusterView(app=app, deployment=deployment)
        self.monitor.observe(view)
        view.set_replicas(replica_rows(handle, METADATA_TIMEOUT_S))  # their addresses, before serving
        self.views[name], self._handles[name] = view, handle
        forwarder = Forwarder(name, addresses=lambda: view.addresses, refresh=self.monitor.wake)
        log.info("model %s: Ray Serve application %s, deployment %s, versions %s, replicas on %s", name, app,
                 deployment, sorted(metadata), ", ".join(view.addresses))
        return {
            version: DeployedModel(name=name, version=version, folder=folder, config=config, entry=entry,
                                   pipeline=RemotePipeline(forwarder, version, meta), view=view, settings=settings)
            for version, meta in metadata.items()
        }

    def _validate(self, name: str, folder: Path) -> tuple[ModelConfig, RaySettings]:
        """The whole config as `trtserve serve` validates it, plus the overridden [ray] table (the
        model's backend.py is imported already, its backends in scope: repository._build_with_code)."""
        check_version_names(folder)
        path = folder / CONFIG_FILE
        config = load_config(path, name=name, model_dir=latest_version_dir(folder) or folder)
        table = apply_overrides(read_toml(path).get("ray"), name, self.overrides)
        where = str(path) if table is config.raw.get("ray") else f"{path} with --ray-set"
        return config, parse_ray_table(table, where)

    def _digest(self, folder: Path, settings: RaySettings) -> str:
        identity = json.dumps([fingerprint(folder), settings.as_table(), repr(sorted(self.kwargs.items())), __version__,
                               self.replica_host])
        return hashlib.sha256(identity.encode()).hexdigest()[:10]

    # -- lifecycle -----------------------------------------------------------------------
    def unload(self, name: str) -> None:
        """Stop serving ``name`` here and delete its Serve application (its replicas drain)."""
        super().unload(name)
        view = self.views.pop(name, None)
        self._handles.pop(name, None)
        if view is not None:
            serve.delete(view.app)

    def close(self) -> None:
        """Stop forwarding; the Serve applications stay for other front doors (cluster.py)."""
        self.monitor.stop()
        super().close()

    # -- queries -------------------------------------------------------------------------
    def deployment_handles(self) -> dict[str, Any]:
        loaded = set(self.loaded())
        return {name: handle for name, handle in list(self._handles.items()) if name in loaded}

    def index(self) -> list[dict[str, Any]]:
        rows = super().index()
        for row in rows:
            view = self.views.get(row["name"])
            if view is not None:
                row["deployment"] = view.summary()
        return rows


def _check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix or not all(c.isalnum() or c in "-_." for c in prefix):
        raise ConfigError(f"--ray-app-prefix {prefix!r}: use letters, digits, '-', '_' or '.', e.g. 'trtserve-'",
                          key="ray_app_prefix", value=repr(prefix))
    return prefix
