"""The one place that imports cuda-python, lazily, so ``import trtserve.cuda`` never does."""
from __future__ import annotations

import threading
from types import ModuleType

_lock = threading.Lock()
_modules: tuple[ModuleType, ModuleType, ModuleType] | None = None


def bindings() -> tuple[ModuleType, ModuleType, ModuleType]:
    """``(driver, runtime, nvrtc)`` from cuda-bindings; raises ImportError when absent.

    cuda-bindings >= 12.6 lives in ``cuda.bindings``; older cuda-python releases exposed
    the same modules as ``cuda.cuda``, ``cuda.cudart`` and ``cuda.nvrtc``.
    """
    global _modules
    if _modules is not None:
        return _modules
    with _lock:
        if _modules is None:
            try:
                from cuda.bindings import driver, nvrtc, runtime
            except ImportError:
                try:
                    from cuda import cuda as driver
                    from cuda import cudart as runtime
                    from cuda import nvrtc
                except ImportError as exc:
                    raise ImportError(
                        "cuda-python is not installed; install the GPU extra: pip install 'trtserve[gpu]' "
                        "(or pip install cuda-python)"
                    ) from exc
            _modules = (driver, runtime, nvrtc)
    return _modules
