"""TensorRT support: pick the TensorRT module, build ONNX into engines, cache them, load plans.

Nothing here imports ``tensorrt`` at import time: the CPU-only paths of trtserve never pay
for it.  Two Python packages expose the same builder/runtime API and either one is accepted:

* ``tensorrt`` (``pip install tensorrt``): full TensorRT 10, data-centre GPUs;
* ``tensorrt_rtx`` (``pip install tensorrt-rtx-cu13``): TensorRT for RTX, whose builder also
  works on a machine without a GPU (ahead-of-time build, just-in-time specialisation at load).

See docs/tensorrt.md for the engine cache and what was tested where.
"""
from __future__ import annotations

import importlib
import logging
import threading
from contextlib import contextmanager
from types import ModuleType
from collections.abc import Iterator

from ..errors import ConfigError, ModelUnavailableError

MODULES = ("tensorrt", "tensorrt_rtx")
PREFERENCES = ("auto",) + MODULES
INSTALL_HINT = "pip install tensorrt  (full TensorRT 10)  or  pip install tensorrt-rtx-cu13  (TensorRT for RTX)"

log = logging.getLogger("trtserve.tensorrt")
_import_lock = threading.Lock()
_loggers: dict[str, object] = {}


def import_tensorrt(preference: str = "auto") -> ModuleType:
    """The TensorRT module to use: ``tensorrt`` first, then ``tensorrt_rtx`` (or exactly one).

    Raises ModelUnavailableError naming both packages and the install command when the
    wanted one (or, for "auto", neither) imports, with the import errors seen.
    """
    if preference not in PREFERENCES:
        raise ConfigError(
            f"trt_module = {preference!r} is not one of {list(PREFERENCES)}; "
            "use 'auto' to take whichever TensorRT package imports",
            key="trt_module",
            value=repr(preference),
        )
    candidates = MODULES if preference == "auto" else (preference,)
    failures = []
    for name in candidates:
        try:
            with _import_lock:
                return importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install raising OSError on its .so
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    wanted = "neither 'tensorrt' nor 'tensorrt_rtx' imports" if preference == "auto" else f"{preference!r} does not import"
    raise ModelUnavailableError(
        f"TensorRT is not available: {wanted} ({'; '.join(failures)}); install one: {INSTALL_HINT}",
        trt_module=preference,
        errors=failures,
    )


def module_identity(trt: ModuleType) -> str:
    """``"<module> <version>"``: part of the engine cache key, since plans are version-bound."""
    return f"{trt.__name__} {getattr(trt, '__version__', 'unknown')}"


def is_strongly_typed_only(trt: ModuleType) -> bool:
    """True when the builder has no FP16 flag: tensor types then come from the model itself.

    TensorRT-RTX (and TensorRT 11) build every network strongly typed; TensorRT 10 is weakly
    typed by default and lowers precision when BuilderFlag.FP16 is set.
    """
    return not hasattr(trt.BuilderFlag, "FP16")


def logger(trt: ModuleType):
    """The process-wide ILogger for ``trt`` (TensorRT expects one logger per process).

    It forwards messages to Python logging and lets a thread capture the errors of one
    operation, so typed errors can quote what TensorRT said.
    """
    with _import_lock:
        existing = _loggers.get(trt.__name__)
        if existing is None:
            existing = _loggers[trt.__name__] = _make_logger(trt)
        return existing


def _make_logger(trt: ModuleType):
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
    }

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._local = threading.local()

        def log(self, sev, msg):  # called by TensorRT, possibly from its own threads
            level = levels.get(sev)
            if level is None:  # VERBOSE: far too chatty even for DEBUG
                return
            captured = getattr(self._local, "errors", None)
            if level >= logging.ERROR and captured is not None:
                captured.append(str(msg))
            log.log(level, "[%s] %s", trt.__name__, msg)

        @contextmanager
        def capture(self) -> Iterator[list[str]]:
            """Collect the errors TensorRT logs on this thread inside the block."""
            previous = getattr(self._local, "errors", None)
            self._local.errors = errors = []
            try:
                yield errors
            finally:
                self._local.errors = previous

    return CapturingLogger()


def quote_errors(errors: list[str], limit: int = 5) -> str:
    """TensorRT's own error lines, shortened for an exception message."""
    if not errors:
        return "TensorRT logged no error"
    shown = [" ".join(e.split()) for e in errors[-limit:]]
    return "TensorRT said: " + " | ".join(shown)


from .io import EngineIO, TensorInfo  # noqa: E402  (pure Python; no tensorrt import)
from .build import BuildSpec, build_engine, parse_onnx  # noqa: E402
from .cache import EngineArtifact, build_target, ensure_engine, load_plan  # noqa: E402
from .runtime import deserialize_engine  # noqa: E402

__all__ = [
    "BuildSpec",
    "EngineArtifact",
    "EngineIO",
    "TensorInfo",
    "build_engine",
    "build_target",
    "deserialize_engine",
    "ensure_engine",
    "import_tensorrt",
    "is_strongly_typed_only",
    "load_plan",
    "logger",
    "module_identity",
    "parse_onnx",
]
