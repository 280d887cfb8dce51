"""Model repository layout helpers (the serving side lives in trtserve.server)."""
from __future__ import annotations

from pathlib import Path


def version_dirs(model_folder: Path) -> dict[int, Path]:
    """Numbered version folders of a model, by version number."""
    if not model_folder.is_dir():
        return {}
    return {int(p.name): p for p in model_folder.iterdir() if p.is_dir() and p.name.isdigit()}


def latest_version_dir(model_folder: Path) -> Path | None:
    versions = version_dirs(model_folder)
    return versions[max(versions)] if versions else None
