"""Which versions of a model to serve (Triton's version_policy), its numbered version
folders, and change detection for poll mode.

``version_policy`` in config.toml:

* ``"latest"`` (default) or ``{ latest = N }``: the N highest numbered versions;
* ``"all"``: every version folder;
* ``{ specific = [1, 3] }``: exactly those versions.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class VersionPolicy:
    kind: str = "latest"  # "latest" | "all" | "specific"
    latest: int = 1
    specific: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        available = sorted(available)
        if self.kind == "all":
            return available
        if self.kind == "specific":
            return [v for v in available if v in self.specific]
        return available[-self.latest :]


def parse_policy(raw: Any, where: str) -> VersionPolicy:
    fix = 'use "latest", "all", { latest = N } or { specific = [1, 2] }'
    if raw is None or raw == "latest":
        return VersionPolicy()
    if raw == "all":
        return VersionPolicy("all")
    if isinstance(raw, dict) and len(raw) == 1:
        (kind, value), = raw.items()
        if kind == "latest" and type(value) is int and value >= 1:
            return VersionPolicy("latest", latest=value)
        if kind == "specific" and isinstance(value, list) and value and all(type(v) is int and v >= 0 for v in value):
            return VersionPolicy("specific", specific=tuple(sorted(set(value))))
    raise ConfigError(f"{where}: version_policy = {raw!r} is not valid; {fix}", file=where, key="version_policy", value=repr(raw))


def fingerprint(folder: Path) -> str:
    """A digest of every file's path, size and mtime under a model folder: cheap to poll."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _generated(p)):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _generated(path: Path) -> bool:
    """Files trtserve or Python write themselves (engine caches, their temporary files,
    bytecode) are not model changes: counting them would reload a model after its first load."""
    name = path.name
    return "__pycache__" in path.parts or name.endswith(".trtcache") or (name.startswith(".") and name.endswith(".tmp"))


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
