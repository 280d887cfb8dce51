"""One model load on a thread of its own, bounded by the model's ``load_timeout``.

A load runs the model's own code (backend.py, every backend's init, the warm-up), and any
of it may hang or raise anything.  So the build runs on a daemon thread and its caller
waits at most ``load_timeout`` seconds (a model-level key of config.toml, default
``DEFAULT_LOAD_TIMEOUT_S``):

* in time: the build's result, or its error; an error that is not a TrtserveError
  (``SystemExit`` from an init, say) becomes MODEL_UNAVAILABLE naming it;
* too late: MODEL_UNAVAILABLE saying so.  A thread cannot be stopped, so the build goes on
  in the background; whatever it builds when it ends is thrown away (``discard``), and
  ``running`` tells the repository to refuse another load of that model meanwhile.

``load_in_turn`` loads a list of models a few at a time, so one hung model never keeps the
others from loading.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConfigError, ModelUnavailableError, TrtserveError

log = logging.getLogger("trtserve.repository")

DEFAULT_LOAD_TIMEOUT_S = 600.0  # generous: a first TensorRT engine build can take minutes
PARALLEL_LOADS = 4  # models loading at once at start (Triton's --model-load-thread-count)


def load_timeout(raw: dict[str, Any], where: str) -> float:
    """The model's ``load_timeout`` (seconds) from its parsed config.toml."""
    value = raw.get("load_timeout", DEFAULT_LOAD_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{where}: load_timeout = {value!r} must be a number of seconds > 0 (how long loading the model "
            f"may take before it is UNAVAILABLE; default {DEFAULT_LOAD_TIMEOUT_S:g}), e.g. load_timeout = 120",
            file=where, key="load_timeout", value=repr(value),
        )
    return float(value)


class LoadJob:
    """``build()`` on a daemon thread; ``discard(result)`` if it finishes after its caller gave up."""

    def __init__(self, model: str, build: Callable[[], Any], discard: Callable[[Any], None]) -> None:
        self.model = model
        self._build = build
        self._discard = discard
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._result: Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"trtserve-load-{model[:40]}", daemon=True)

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def run(self, timeout: float) -> Any:
        self.thread.start()
        if not self._done.wait(timeout):
            with self._lock:
                self._abandoned = not self._done.is_set()
            if self._abandoned:
                raise ModelUnavailableError(
                    f"model {self.model!r} did not finish loading within load_timeout = {timeout:g} s (a backend's "
                    "init or the warm-up hangs, or needs longer: raise load_timeout in its config.toml); it "
                    "goes on in the background and is thrown away when it ends, and the model cannot be loaded "
                    "again until then",
                    model=self.model, load_timeout=timeout,
                )
        if self._error is not None:
            raise self._error
        return self._result

    def _run(self) -> None:
        try:
            result = self._build()
            error = None
        except TrtserveError as exc:
            result, error = None, exc
        except BaseException as exc:  # noqa: B036 - SystemExit from a model's init is the model's failure
            log.error("model %s: loading raised %s", self.model, type(exc).__name__, exc_info=exc)
            result, error = None, ModelUnavailableError(
                f"model {self.model!r} failed to load: {type(exc).__name__}: {exc}", model=self.model)
        with self._lock:
            self._result, self._error = result, error
            self._done.set()
            abandoned = self._abandoned
        if abandoned:
            log.warning("model %s: the load that timed out has ended; what it built is discarded", self.model)
            if result is not None:
                self._discard(result)


def load_in_turn(load: Callable[[str], Any], names: Iterable[str], parallel: int = PARALLEL_LOADS) -> None:
    """``load(name)`` for every name, ``parallel`` at a time, on daemon threads; returns when
    all are done.  Errors are the loader's to record: they are not raised here."""
    pending: queue.SimpleQueue[str] = queue.SimpleQueue()
    names = list(names)
    for name in names:
        pending.put(name)

    def work() -> None:
        while True:
            try:
                name = pending.get_nowait()
            except queue.Empty:
                return
            try:
                load(name)
            except TrtserveError:
                pass  # recorded as UNAVAILABLE with its reason

    threads = [threading.Thread(target=work, name="trtserve-start-load", daemon=True)
               for _ in range(min(parallel, len(names)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
