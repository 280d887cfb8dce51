"""A model folder's ``backend.py``: imported once per load, private to that model, released
with it.

* **Private.** Each load imports the file as a module of its own (a fresh name, so a reload
  never disturbs the version still draining), inside ``backend.model_scope``: what it
  registers goes to that load's ``classes``, seen by that model's config and pipeline only.
  It cannot replace a built-in backend or another model's backends.
* **Contained.** Anything the import raises, ``SystemExit`` and ``KeyboardInterrupt``
  included, becomes a ConfigError naming the file: the model is UNAVAILABLE, the server
  goes on.
* **Released.** ``release()`` (once every pipeline built from it is closed) removes the
  module from ``sys.modules`` and clears its namespace.  A module's functions refer back to
  its namespace, so module and classes form reference cycles that only the cyclic
  collector frees, and module-level data (weights, tables) would wait with them; cleared,
  that data goes at once, and a collection frees the rest.
"""
from __future__ import annotations

import gc
import importlib.util
import itertools
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from .backend import Backend, model_scope
from .errors import ConfigError

_loads = itertools.count(1)
_collect_lock = threading.Lock()


class ModelCode:
    """The backends one load of a model registered (empty without a backend.py)."""

    def __init__(self, model: str, path: Path | None = None) -> None:
        self.model = model
        self.path = path
        self.classes: dict[str, type[Backend]] = {}
        self.module: ModuleType | None = None

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Names resolve in this model's backends first, on this thread, inside the block."""
        with model_scope(self.classes):
            yield

    def release(self) -> None:
        """Forget the module and its backends, and free what they held (idempotent)."""
        module, self.module = self.module, None
        self.classes.clear()
        if module is None:
            return
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
        module.__dict__.clear()
        with _collect_lock:  # one collection at a time, however many models unload together
            gc.collect()


def load_model_code(model: str, folder: Path) -> ModelCode:
    """Import ``folder/backend.py`` for one load of ``model`` (an empty ModelCode without one)."""
    path = folder / "backend.py"
    code = ModelCode(model, path if path.is_file() else None)
    if code.path is None:
        return code
    module_name = f"trtserve_model_{re.sub(r'[^0-9A-Za-z_]', '_', model)[:64]}_{next(_loads)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as a Python module", file=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # during the import too: dataclasses and pickle look it up
    code.module = module
    try:
        with code.scope():
            spec.loader.exec_module(module)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: still only this model's failure
        code.release()
        raise ConfigError(
            f"{path}: importing the model's backend.py failed: {type(exc).__name__}: {exc}",
            file=str(path),
        ) from exc
    return code
