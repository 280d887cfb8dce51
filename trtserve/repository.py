"""The model repository: ``<root>/<name>/config.toml`` plus numbered version folders.

Each served version is a :class:`LoadedModel` (a started Pipeline).  The versions served
follow the model's ``version_policy`` (latest by default).  A model that fails to load is
UNAVAILABLE with the reason; the others keep serving.

Reload (Triton's semantics): the new versions are built and warmed up beside the old ones
and swapped in only when all succeeded.  The old pipelines then drain: what they accepted
finishes on them, and a request that raced the swap is re-sent to the new version.  A
failed reload keeps the old versions serving and reports the error in the index.

Each load runs the model's own code on a thread of its own, bounded by the model's
``load_timeout`` (loadjob.py); whatever that code raises makes the model UNAVAILABLE, never
the caller's failure.  A model's backend.py is private to it and released with it
(modelcode.py).  Loading blocks: event-loop callers use an executor.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from .config import load_config, read_toml
from .errors import (
    ConfigError,
    ModelNotFoundError,
    ModelUnavailableError,
    ShuttingDownError,
    TrtserveError,
    VersionNotFoundError,
)
from .loadjob import LoadJob, load_in_turn, load_timeout
from .modelcode import ModelCode, load_model_code
from .pipeline import Pipeline
from .served import LoadedModel
# check_version_names, latest_version_dir, version_dirs and LoadedModel are imported from
# here too (pipe.py, scaleout/repository.py, the server): they live in versions.py and served.py.
from .versions import check_version_names, fingerprint, latest_version_dir, parse_policy, version_dirs  # noqa: F401
from .warmup import run_warmup

log = logging.getLogger("trtserve.repository")
CONFIG_FILE = "config.toml"
MAX_NAME_BYTES = 255  # a model is a folder: longer names cannot exist on Linux filesystems


class ModelState(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"


@dataclass
class _Entry:
    state: ModelState = ModelState.UNLOADED
    reason: str | None = None
    models: dict[int, LoadedModel] = field(default_factory=dict)  # served versions
    fingerprint: str | None = None  # of the model folder when last loaded (poll mode)
    failed_fingerprint: str | None = None  # of the files whose load failed: not retried unchanged
    lock: threading.Lock = field(default_factory=threading.Lock)  # state changes (brief)
    load_lock: threading.Lock = field(default_factory=threading.Lock)  # one load of the model at a time
    code: ModelCode | None = None  # the served versions' backend.py
    hung: LoadJob | None = None  # a load that timed out and still runs

    @property
    def latest(self) -> LoadedModel | None:
        return self.models[max(self.models)] if self.models else None


class ModelRepository:
    # The server's infer operation for this repository's models, when not the usual one
    # (server/infer.InferHandler's signature): a Ray front door relays instead (scaleout/relay.py).
    infer_handler: Any = None

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
        self._closed = False
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
    def load_all(self, names: list[str] | None = None) -> None:
        """Load every model (or ``names``), a few at a time; failures are recorded as
        UNAVAILABLE, never raised, and a model that hangs delays no other.  Each is LOADING
        from the start, not only once its turn comes."""
        names = self.scan() if names is None else names
        for name in names:
            entry = self._entry(name)
            with entry.lock:
                if not entry.models:
                    entry.state, entry.reason = ModelState.LOADING, None
        load_in_turn(self.load, names)

    def folder(self, name: str) -> Path:
        """The folder of model ``name``; MODEL_NOT_FOUND for a name that cannot be one."""
        if type(name) is not str or name.startswith(".") or "\0" in name or not self._on_disk(name):
            # No paths and no listing: a caller learns nothing of the disk beyond this name.
            raise ModelNotFoundError(
                f"no model {name!r:.80} in the repository: a model is a folder of the repository holding a "
                f"{CONFIG_FILE} (names up to {MAX_NAME_BYTES} bytes, no '/', not starting with '.'); "
                "repository_index lists the models",
                model=name if type(name) is str and len(name) <= MAX_NAME_BYTES else repr(name)[:80],
            )
        return self.root / name

    def load(self, name: str) -> LoadedModel:
        """Load or reload ``name``; returns its latest served version.  Errors are recorded too."""
        try:
            folder = self.folder(name)
        except ModelNotFoundError as exc:
            entry = self._entries.get(name)  # marked LOADING by load_all, then its folder went
            if entry is not None and not entry.models and not entry.load_lock.locked():
                entry.state, entry.reason = ModelState.UNAVAILABLE, exc.message
            raise
        entry = self._entry(name)
        with entry.load_lock:
            if entry.hung is not None and entry.hung.running:
                raise ModelUnavailableError(
                    f"model {name!r}: an earlier load timed out and is still running (a backend's init hangs); "
                    "it cannot be loaded again until that load ends: fix the model, then restart the server",
                    model=name,
                )
            with entry.lock:
                if not entry.models:
                    entry.state, entry.reason = ModelState.LOADING, None
            # A served model keeps the reason of its last failed reload until one succeeds.
            stamp = fingerprint(folder)
            job = None
            try:
                timeout = load_timeout(read_toml(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
                job = LoadJob(name, lambda: self._build_with_code(name, folder, entry), _discard)
                fresh, code = job.run(timeout)
            except TrtserveError as exc:
                if job is not None and job.running:
                    entry.hung = job
                with entry.lock:
                    entry.reason = exc.message
                    entry.state = ModelState.READY if entry.models else ModelState.UNAVAILABLE
                log.warning("model %s: load failed%s: %s", name, " (old versions keep serving)" if entry.models else "", exc.message)
                raise
            return self._install(name, entry, fresh, code, stamp)

    def _install(self, name: str, entry: _Entry, fresh: dict[int, LoadedModel], code: ModelCode, stamp: str) -> LoadedModel:
        with entry.lock:
            if self._closed:  # the server shut down while this model loaded
                _discard((fresh, code))
                raise ShuttingDownError(f"model {name!r} finished loading after the repository closed", model=name)
            for model in fresh.values():
                for hook in self.load_hooks:
                    hook(model)
            old, entry.models = entry.models, fresh
            old_code, entry.code = entry.code, code
            entry.state, entry.fingerprint, entry.failed_fingerprint = ModelState.READY, stamp, None
            entry.reason = None
            latest = fresh[max(fresh)]
        self._retire(list(old.values()), code=old_code)
        log.info("model %s versions %s are READY", name, sorted(fresh))
        return latest

    def _build_with_code(self, name: str, folder: Path, entry: _Entry) -> tuple[dict[int, LoadedModel], ModelCode]:
        """The model's backend.py, then its versions, built where that code's backends are seen."""
        code = load_model_code(name, folder)
        try:
            with code.scope():
                return self._build_versions(name, folder, entry), code
        except BaseException:
            code.release()
            raise

    def _build_versions(self, name: str, folder: Path, entry: _Entry) -> dict[int, LoadedModel]:
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

    def _retire(self, models: list[LoadedModel], drain: bool = True, code: ModelCode | None = None) -> None:
        """Close old pipelines (then release their backend.py); draining happens off the
        caller's thread."""
        if not models:
            if code is not None:
                code.release()
            return
        if not drain:
            for model in models:
                model.pipeline.close()
            return

        def retire() -> None:
            for model in models:
                model.pipeline.close(drain=True)
            if code is not None:
                code.release()

        thread = threading.Thread(target=retire, name="trtserve-retire", daemon=True)
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
            code, entry.code = entry.code, None
            entry.state, entry.reason, entry.fingerprint = ModelState.UNLOADED, None, None
        for model in old.values():
            model.pipeline.close(drain=True)
        if code is not None:
            code.release()

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
        self._closed = True  # a load still running closes what it builds (_install)
        for entry in list(self._entries.values()):
            with entry.lock:
                models, entry.models = entry.models, {}
                code, entry.code = entry.code, None
                entry.state = ModelState.UNLOADED
            for model in models.values():
                model.pipeline.close()
            if code is not None:
                code.release()
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


def _discard(built: tuple[dict[int, LoadedModel], ModelCode]) -> None:
    """What a load built that will never serve: close it, then release its backend.py."""
    models, code = built
    for model in models.values():
        model.pipeline.close()
    code.release()
