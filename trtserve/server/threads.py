"""Threads for model control that can never hold the server up.

Loading runs a model's own code (its backend.py, each backend's init), which may hang.  A
``ThreadPoolExecutor`` would let two hung loads take both of its workers, so every later
load waits behind them, and its threads are joined when the interpreter exits, so a hung
load would also keep a stopping server from exiting.  A :class:`DaemonExecutor` runs each
job on a fresh daemon thread instead: no job waits for another, and the process exits
whatever its jobs are doing.  It is an ``Executor``, so ``loop.run_in_executor`` takes it.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class DaemonExecutor(Executor):
    """One daemon thread per job; ``shutdown`` refuses new jobs and never waits for old ones
    unless asked to."""

    def __init__(self, name: str = "trtserve-control") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work: the server is shutting down")
            thread = threading.Thread(target=self._run, args=(future, fn, args, kwargs), name=self._name, daemon=True)
            self._threads.add(thread)
        thread.start()
        return future

    def _run(self, future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        try:
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: B036 - handed to the waiter, whatever it is
                    future.set_exception(exc)
                else:
                    future.set_result(result)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._threads)

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """Refuse new jobs; with ``wait``, wait for the running ones (``join`` bounds the wait)."""
        with self._lock:
            self._closed = True
        if wait:
            self.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` for the running jobs; True when none is left running."""
        with self._lock:
            threads = list(self._threads)
        give_up = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if give_up is None else max(0.0, give_up - time.monotonic()))
        return self.running == 0
