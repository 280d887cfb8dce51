"""Which versions of a model to serve (Triton's version_policy) and change detection for poll mode.

``version_policy`` in config.toml:

* ``"latest"`` (default) or ``{ latest = N }``: the N highest numbered versions;
* ``"all"``: every version folder;
* ``{ specific = [1, 3] }``: exactly those versions.
"""
from __future__ import annotations

import hashlib
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
