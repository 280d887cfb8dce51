"""The TensorRT module in use and what every other tensorrt/ module needs of it: picking
``tensorrt`` or ``tensorrt_rtx``, the cache key's module identity, whether the builder is
strongly typed only, and the process-wide logger that captures TensorRT's errors.

Its own module, below build, cache and runtime, so that they import it and the package's
``__init__`` only re-exports.  Nothing here imports ``tensorrt`` at import time.
"""
from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType
from typing import Any, Protocol

from ..errors import ConfigError, ModelUnavailableError

MODULES = ("tensorrt", "tensorrt_rtx")
PREFERENCES = ("auto",) + MODULES
INSTALL_HINT = "pip install tensorrt  (full TensorRT 10)  or  pip install tensorrt-rtx-cu13  (TensorRT for RTX)"

log = logging.getLogger("trtserve.tensorrt")
_import_lock = threading.Lock()


class CapturingLogger(Protocol):
    """A ``trt.ILogger`` (passed to TensorRT's Builder and Runtime) that can also collect the
    errors TensorRT logs on this thread inside a ``with capture() as errors:`` block."""

    def capture(self) -> AbstractContextManager[list[str]]: ...


_loggers: dict[str, CapturingLogger] = {}


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


def logger(trt: ModuleType) -> CapturingLogger:
    """The process-wide ILogger for ``trt`` (TensorRT expects one logger per process).

    It forwards messages to Python logging and lets a thread capture the errors of one
    operation, so typed errors can quote what TensorRT said.
    """
    with _import_lock:
        existing = _loggers.get(trt.__name__)
        if existing is None:
            existing = _loggers[trt.__name__] = _make_logger(trt)
        return existing


def _make_logger(trt: ModuleType) -> CapturingLogger:
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
    }

    ilogger: Any = trt.ILogger  # a class of the module picked at run time

    class ForwardingLogger(ilogger):
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
            errors: list[str] = []
            self._local.errors = errors
            try:
                yield errors
            finally:
                self._local.errors = previous

    return ForwardingLogger()


def quote_errors(errors: list[str], limit: int = 5) -> str:
    """TensorRT's own error lines, shortened for an exception message."""
    if not errors:
        return "TensorRT logged no error"
    shown = [" ".join(e.split()) for e in errors[-limit:]]
    return "TensorRT said: " + " | ".join(shown)
