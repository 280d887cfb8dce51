"""The model repository: ``<root>/<name>/config.toml`` plus numbered version folders.

Each served version is a :class:`LoadedModel` (a started Pipeline).  The versions served
follow the model's ``version_policy`` (latest by default).  A model that fails to load is
UNAVAILABLE with the reason; the others keep serving.

Reload (Triton's semantics): the new versions are built and warmed up beside the old ones
and swapped in only when all succeeded.  The old pipelines then drain: what they accepted
finishes on them, and a request that raced the swap is re-sent to the new version.  A
failed reload keeps the old versions serving and reports the error in the index.

Loading runs backend inits (threads, sessions): event-loop callers use an executor.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from .backend import Signature, load_backend_file
from .config import ModelConfig, load_config, read_toml
from .errors import (
    ConfigError,
    ModelNotFoundError,
    ModelUnavailableError,
    ShuttingDownError,
    TrtserveError,
    VersionNotFoundError,
)
from .pipeline import ItemCallback, Pipeline
from .scheduler import Request
from .versions import fingerprint, parse_policy
from .warmup import run_warmup

log = logging.getLogger("trtserve.repository")
CONFIG_FILE = "config.toml"


class ModelState(str, Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


# A folder named like a version that is not one: ``v1``, ``version_2``, ``V3``.
_LOOKS_LIKE_VERSION = re.compile(r"^(v|ver|version)[-_]?(\d+)$", re.IGNORECASE)


def version_dirs(model_folder: Path) -> dict[int, Path]:
    """Numbered version folders of a model, by version number."""
    if not model_folder.is_dir():
        return {}
    return {int(p.name): p for p in model_folder.iterdir() if p.is_dir() and p.name.isdigit()}


def check_version_names(model_folder: Path) -> None:
    """A ``v1`` folder is not a version: the model would silently load from elsewhere."""
    for path in sorted(model_folder.iterdir()):
        match = _LOOKS_LIKE_VERSION.match(path.name) if path.is_dir() else None
        if match:
            number = int(match.group(2))
            raise ConfigError(
                f"{path}: folder {path.name!r} is not a version: version folders are named by their number "
                f"only (1, 2, ...); rename it to {model_folder / str(number)}",
                path=str(path),
                fix=str(number),
            )


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
    entry: "_Entry | None" = field(default=None, repr=False)

    def submit(
        self, item: dict[str, Any], on_done: ItemCallback, deadline: float | None = None, priority: int = 0
    ) -> Request:
        try:
            return self.pipeline.submit(item, on_done, deadline, priority)
        except ShuttingDownError:
            successor = self.entry.models.get(self.version) if self.entry else None
            if successor is None or successor is self:
                raise
            # This version was swapped out between lookup and submit: the new one answers.
            return successor.submit(item, on_done, deadline, priority)

    def is_ready(self) -> bool:
        """Whether this version can take requests now (a remote one may have lost its replicas)."""
        return True

    def metadata(self) -> dict[str, Any]:
        inputs, outputs = self.pipeline.io_spec()
        return {
            "name": self.name,
            "versions": sorted(self.entry.models) if self.entry else [self.version],
            "inputs": [t.to_dict() for t in inputs or []],
            "outputs": [t.to_dict() for t in outputs or []],
            "max_batch_size": self.pipeline.max_batch,
            "nodes": [
                {"name": n.node.name, "backend": str(n.node.expr), "instance_num": n.node.instance_num,
                 **_model_file(n.backend.signature(), self.folder)}
                for n in self.pipeline.nodes
            ],
        }

    def statistics(self) -> dict[str, Any]:
        stats = self.pipeline.stats.snapshot()
        stats.update(name=self.name, version=self.version)
        stats["nodes"] = {n.node.name: n.stats.snapshot() for n in self.pipeline.nodes}
        last = stats["nodes"][self.pipeline.nodes[-1].node.name]
        for key in ("batch_sizes", "model_calls", "call_rows"):  # the model node's, at the top
            stats[key] = last[key]
        return stats


def _model_file(signature: Signature | None, folder: Path) -> dict[str, Any]:
    """A node's model file (relative to the model folder) and the signature read from it
    (Triton's auto-complete shows this; declared tensors were checked against it at load)."""
    if signature is None:
        return {}
    path = Path(signature.file)
    shown = str(path.relative_to(folder.resolve())) if path.is_relative_to(folder.resolve()) else path.name

    def tensors(specs: Any) -> list[dict[str, Any]] | None:
        if specs is None:
            return None
        return [t.to_dict() if signature.typed else {"name": t.name} for t in specs]

    return {"model_file": shown, "model_inputs": tensors(signature.inputs), "model_outputs": tensors(signature.outputs)}


@dataclass
class _Entry:
    state: ModelState = ModelState.UNLOADED
    reason: str | None = None
    models: dict[int, LoadedModel] = field(default_factory=dict)  # served versions
    fingerprint: str | None = None  # of the model folder when last loaded (poll mode)
    failed_fingerprint: str | None = None  # of the files whose load failed: not retried unchanged
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def latest(self) -> LoadedModel | None:
        return self.models[max(self.models)] if self.models else None


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
        self._draining: list[threading.Thread] = []
        # Called with each newly built version after its warmup, before it serves (the
        # metrics exporter subscribes to its statistics here, so no request is missed).
        self.load_hooks: list[Callable[[LoadedModel], None]] = []

    # -- discovery ---------------------------------------------------------------------
    def scan(self) -> list[str]:
        """Names of the model folders that hold a config.toml."""
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file())

    def _on_disk(self, name: str) -> bool:
        """A model folder with a config.toml exists for ``name`` (a plain folder name only)."""
        if not name or len(name) > 255 or "/" in name or "\\" in name or name in (".", ".."):
            return False
        try:
            return (self.root / name / CONFIG_FILE).is_file()
        except OSError:
            return False

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
        """Load or reload ``name``; returns its latest served version.  Errors are recorded too."""
        folder = self.root / name
        if not name or "/" in name or name.startswith(".") or not (folder / CONFIG_FILE).is_file():
            raise ModelNotFoundError(
                f"no model {name!r} in repository {self.root}: expected {folder / CONFIG_FILE}; "
                f"models here are {self.scan()}",
                model=name,
            )
        entry = self._entry(name)
        with entry.lock:
            if not entry.models:
                entry.state, entry.reason = ModelState.LOADING, None
            # A served model keeps the reason of its last failed reload until one succeeds.
            stamp = fingerprint(folder)
            try:
                fresh = self._build_versions(name, folder, entry)
            except TrtserveError as exc:
                entry.reason = exc.message
                entry.state = ModelState.READY if entry.models else ModelState.UNAVAILABLE
                log.warning("model %s: load failed%s: %s", name, " (old versions keep serving)" if entry.models else "", exc.message)
                raise
            for model in fresh.values():
                for hook in self.load_hooks:
                    hook(model)
            old, entry.models = entry.models, fresh
            entry.state, entry.fingerprint, entry.failed_fingerprint = ModelState.READY, stamp, None
            entry.reason = None
        self._retire(list(old.values()))
        log.info("model %s versions %s are READY", name, sorted(fresh))
        return entry.latest

    def _build_versions(self, name: str, folder: Path, entry: _Entry) -> dict[int, LoadedModel]:
        if (folder / "backend.py").is_file():
            load_backend_file(folder / "backend.py")
        check_version_names(folder)
        on_disk = version_dirs(folder)
        config_path = folder / CONFIG_FILE
        policy = parse_policy(read_toml(config_path).get("version_policy"), str(config_path))
        # No numbered folder: the model folder itself is version 1 (docs/configuration.md).
        wanted = policy.select(list(on_disk)) if on_disk else [1]
        if not wanted:
            raise ModelUnavailableError(
                f"model {name!r}: version_policy selects none of the versions on disk {sorted(on_disk)}",
                model=name,
                on_disk=sorted(on_disk),
            )
        built: dict[int, LoadedModel] = {}
        try:
            for version in wanted:
                built[version] = self._build(name, folder, version, on_disk.get(version, folder), entry)
        except BaseException:
            self._retire(list(built.values()), drain=False)
            raise
        return built

    def _build(self, name: str, folder: Path, version: int, version_dir: Path, entry: _Entry) -> LoadedModel:
        try:
            config = load_config(folder / CONFIG_FILE, name=name, model_dir=version_dir)
            pipeline = Pipeline(config, dict(self.kwargs, version=version, model_dir=str(version_dir)))
            pipeline.start()
        except TrtserveError:
            raise
        except Exception as exc:  # an unexpected loader failure still only takes this model down
            raise ModelUnavailableError(f"model {name!r} failed to load: {type(exc).__name__}: {exc}", model=name) from exc
        try:
            run_warmup(pipeline, config.warmup, name)
        except BaseException:
            pipeline.close()
            raise
        return LoadedModel(name=name, version=version, folder=folder, config=config, pipeline=pipeline, entry=entry)

    def _retire(self, models: list[LoadedModel], drain: bool = True) -> None:
        """Close old pipelines; draining happens off the caller's thread."""
        if not models:
            return
        if not drain:
            for model in models:
                model.pipeline.close()
            return
        thread = threading.Thread(
            target=lambda: [m.pipeline.close(drain=True) for m in models], name="trtserve-retire", daemon=True
        )
        thread.start()
        with self._lock:
            self._draining = [t for t in self._draining if t.is_alive()] + [thread]

    def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests are refused, accepted ones finish first."""
        entry = self._entries.get(name)
        if entry is None or not entry.models:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded models are {self.loaded()}", model=name)
        with entry.lock:
            old, entry.models = entry.models, {}
            entry.state, entry.reason, entry.fingerprint = ModelState.UNLOADED, None, None
        for model in old.values():
            model.pipeline.close(drain=True)

    def poll(self) -> dict[str, list[str]]:
        """One poll-mode pass: load added models, unload removed ones, reload changed ones."""
        on_disk = set(self.scan())
        known = {n for n, e in self._entries.items() if e.models or e.state is ModelState.UNAVAILABLE}
        changes: dict[str, list[str]] = {"loaded": [], "unloaded": [], "reloaded": [], "failed": []}
        for name in sorted(known - on_disk):
            if self._entries[name].models:
                self.unload(name)
            self._entries.pop(name, None)
            changes["unloaded"].append(name)
        for name in sorted(on_disk):
            stamp = fingerprint(self.root / name)
            entry = self._entries.get(name)
            if entry is not None and stamp in (entry.fingerprint, entry.failed_fingerprint):
                continue  # unchanged since the last load, or the same broken files as last time
            kind = "reloaded" if entry is not None and entry.models else "loaded"
            try:
                self.load(name)
                changes[kind].append(name)
            except TrtserveError:
                self._entry(name).failed_fingerprint = stamp
                changes["failed"].append(name)
        return changes

    def close(self) -> None:
        for entry in list(self._entries.values()):
            models, entry.models = entry.models, {}
            for model in models.values():
                model.pipeline.close()
            entry.state = ModelState.UNLOADED
        for thread in self._draining:
            thread.join()

    # -- queries -----------------------------------------------------------------------
    def loaded(self) -> list[str]:
        return sorted(n for n, e in self._entries.items() if e.models)

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The served model (latest version unless named); typed errors otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            if self._on_disk(name):
                raise ModelUnavailableError(
                    f"model {name!r} is not loaded; start the server with --model-control poll, or with "
                    f"--model-control explicit and load it", model=name, state="UNLOADED", reason="not loaded")
            raise ModelNotFoundError(f"unknown model {name!r}; available models are {self.loaded()}", model=name)
        models = entry.models
        if not models:
            raise ModelUnavailableError(
                f"model {name!r} is {entry.state.value}" + (f": {entry.reason}" if entry.reason else ""),
                model=name,
                state=entry.state.value,
                reason=entry.reason,
            )
        if version is None:
            return models[max(models)]
        if version not in models:
            raise VersionNotFoundError(
                f"model {name!r} has no served version {version!r}; served versions are {sorted(models)}",
                model=name,
                version=version,
                served=sorted(models),
            )
        return models[version]

    def index(self) -> list[dict[str, Any]]:
        """Every model on disk or loaded, with its state and the reason when UNAVAILABLE."""
        names = sorted(set(self.scan()) | set(self._entries))
        rows = []
        for name in names:
            entry = self._entries.get(name) or _Entry()
            rows.append(
                {
                    "name": name,
                    "version": max(entry.models) if entry.models else None,
                    "versions": sorted(entry.models),
                    "versions_on_disk": sorted(version_dirs(self.root / name)),
                    "state": entry.state.value,
                    "reason": entry.reason,
                }
            )
        return rows
