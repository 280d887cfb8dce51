"""The model repository: ``<root>/<name>/config.toml`` plus numbered version folders.

Each model is loaded into a :class:`LoadedModel` (a started Pipeline for one version).
A model that fails to load is UNAVAILABLE with the reason; the others keep serving.
Loading runs backend inits (threads, sessions), so callers on an event loop should call
``load``/``unload`` through an executor.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .backend import load_backend_file
from .config import ModelConfig, load_config
from .errors import (
    ConfigError,
    ModelNotFoundError,
    ModelUnavailableError,
    TrtserveError,
    VersionNotFoundError,
)
from .pipeline import ItemCallback, Pipeline
from .scheduler import Request

log = logging.getLogger("trtserve.repository")
CONFIG_FILE = "config.toml"


class ModelState(str, Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


def version_dirs(model_folder: Path) -> dict[int, Path]:
    """Numbered version folders of a model, by version number."""
    if not model_folder.is_dir():
        return {}
    return {int(p.name): p for p in model_folder.iterdir() if p.is_dir() and p.name.isdigit()}


def latest_version_dir(model_folder: Path) -> Path | None:
    versions = version_dirs(model_folder)
    return versions[max(versions)] if versions else None


@dataclass
class LoadedModel:
    """One served version of a model: its config and its running pipeline."""

    name: str
    version: int
    folder: Path
    config: ModelConfig
    pipeline: Pipeline

    def submit(self, item: dict[str, Any], on_done: ItemCallback, deadline: float | None = None) -> Request:
        return self.pipeline.submit(item, on_done, deadline)

    def metadata(self) -> dict[str, Any]:
        inputs, outputs = self.pipeline.io_spec()
        return {
            "name": self.name,
            "versions": [self.version],
            "inputs": [t.to_dict() for t in inputs or []],
            "outputs": [t.to_dict() for t in outputs or []],
            "max_batch_size": self.pipeline.max_batch,
            "nodes": [
                {"name": n.node.name, "backend": str(n.node.expr), "instance_num": n.node.instance_num}
                for n in self.pipeline.nodes
            ],
        }

    def statistics(self) -> dict[str, Any]:
        stats = self.pipeline.stats.snapshot()
        stats.update(name=self.name, version=self.version)
        stats["nodes"] = {n.node.name: n.stats.snapshot() for n in self.pipeline.nodes}
        stats["batch_sizes"] = self.pipeline.nodes[-1].stats.snapshot()["batch_sizes"]
        return stats


@dataclass
class _Entry:
    state: ModelState = ModelState.UNLOADED
    reason: str | None = None
    model: LoadedModel | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelRepository:
    def __init__(self, root: str | Path, kwargs: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(
                f"model repository {self.root} is not a directory; pass --repository PATH to a folder "
                "holding <model>/config.toml",
                path=str(self.root),
            )
        self.kwargs = dict(kwargs or {})
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    # -- discovery ---------------------------------------------------------------------
    def scan(self) -> list[str]:
        """Names of the model folders that hold a config.toml."""
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file())

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            return self._entries.setdefault(name, _Entry())

    # -- load / unload -----------------------------------------------------------------
    def load_all(self) -> None:
        """Load every model; failures are recorded as UNAVAILABLE, never raised."""
        for name in self.scan():
            try:
                self.load(name)
            except TrtserveError:
                pass  # already recorded with its reason

    def load(self, name: str) -> LoadedModel:
        """Load (or reload) ``name``'s latest version.  Raises the load error, recorded too."""
        folder = self.root / name
        if not name or "/" in name or name.startswith(".") or not (folder / CONFIG_FILE).is_file():
            raise ModelNotFoundError(
                f"no model {name!r} in repository {self.root}: expected {folder / CONFIG_FILE}; "
                f"models here are {self.scan()}",
                model=name,
            )
        entry = self._entry(name)
        with entry.lock:
            entry.state, entry.reason = ModelState.LOADING, None
            try:
                model = self._build(name, folder)
            except TrtserveError as exc:
                entry.state, entry.reason = ModelState.UNAVAILABLE, exc.message
                if entry.model is not None:  # a failed reload keeps the old version serving
                    entry.state = ModelState.READY
                log.warning("model %s is unavailable: %s", name, exc.message)
                raise
            old, entry.model = entry.model, model
            entry.state = ModelState.READY
        if old is not None:
            old.pipeline.close()
        log.info("model %s version %d is READY", name, model.version)
        return model

    def _build(self, name: str, folder: Path) -> LoadedModel:
        versions = version_dirs(folder)
        version = max(versions, default=1)
        version_dir = versions.get(version, folder)
        try:
            if (folder / "backend.py").is_file():
                load_backend_file(folder / "backend.py")
            config = load_config(folder / CONFIG_FILE, name=name, model_dir=version_dir)
            pipeline = Pipeline(config, dict(self.kwargs, version=version, model_dir=str(version_dir)))
            pipeline.start()
        except TrtserveError:
            raise
        except Exception as exc:  # an unexpected loader failure still only takes this model down
            raise ModelUnavailableError(f"model {name!r} failed to load: {type(exc).__name__}: {exc}", model=name) from exc
        return LoadedModel(name=name, version=version, folder=folder, config=config, pipeline=pipeline)

    def unload(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None or entry.state is ModelState.UNLOADED:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded models are {self.loaded()}", model=name)
        with entry.lock:
            model, entry.model = entry.model, None
            entry.state, entry.reason = ModelState.UNLOADED, None
        if model is not None:
            model.pipeline.close()

    def close(self) -> None:
        for name in list(self._entries):
            entry = self._entries[name]
            if entry.model is not None:
                entry.model.pipeline.close()
                entry.model = None
            entry.state = ModelState.UNLOADED

    # -- queries -----------------------------------------------------------------------
    def loaded(self) -> list[str]:
        return sorted(n for n, e in self._entries.items() if e.model is not None)

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The served model; typed errors for unknown names, versions and unavailable models."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFoundError(
                f"unknown model {name!r}; available models are {self.loaded()}",
                model=name,
            )
        model = entry.model
        if model is None:
            raise ModelUnavailableError(
                f"model {name!r} is {entry.state.value}" + (f": {entry.reason}" if entry.reason else ""),
                model=name,
                state=entry.state.value,
                reason=entry.reason,
            )
        if version is not None and version != model.version:
            raise VersionNotFoundError(
                f"model {name!r} has no served version {version!r}; served versions are [{model.version}]",
                model=name,
                version=version,
                served=[model.version],
            )
        return model

    def index(self) -> list[dict[str, Any]]:
        """Every model on disk or loaded, with its state and the reason when UNAVAILABLE."""
        names = sorted(set(self.scan()) | set(self._entries))
        rows = []
        for name in names:
            entry = self._entries.get(name) or _Entry()
            rows.append(
                {
                    "name": name,
                    "version": entry.model.version if entry.model else None,
                    "versions_on_disk": sorted(version_dirs(self.root / name)),
                    "state": entry.state.value,
                    "reason": entry.reason,
                }
            )
        return rows
