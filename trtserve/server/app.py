"""The server: load the repository, listen, serve, shut down gracefully.

Shutdown (``stop``, or SIGINT/SIGTERM under ``serve_forever``):

1. stop accepting connections; ``ready`` turns false; new infer/load/unload requests on
   open connections get SHUTTING_DOWN (cheap queries are still answered);
2. wait up to ``grace_s`` for every request in flight to be answered;
3. answer whatever is still in flight with SHUTTING_DOWN, flush and close every connection;
4. close the models (queued work fails, running batches finish, instance threads join).

A second signal skips the rest of the grace period.

Model control modes live in control.py, access control in auth.py and protocol.py, the
Prometheus exporter in metrics.py, shared-memory regions in shm_ops.py; docs/operations.md
describes them for operators.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from trtserve_client.wire import DEFAULT_MAX_FRAME

from ..errors import ConfigError, ShuttingDownError
from ..repository import ModelRepository, ModelState
from .auth import DEFAULT_AUTH_TIMEOUT_S, PRE_AUTH_MAX_FRAME, Authenticator
from .control import ModelControl, poll_forever
from .handlers import Dispatcher
from .metrics import Metrics
from .protocol import ServerProtocol
from .shm import DEFAULT_MAX_BYTES, DEFAULT_MAX_REGIONS, ShmLimits
from .shm_ops import SharedMemory
from .tracker import DEFAULT_MAX_CONNECTIONS, ConnectionTracker

log = logging.getLogger("trtserve.server")

DEFAULT_MAX_IN_FLIGHT = 128  # per connection; enough to keep a batched model busy from one client
DEFAULT_GRACE_S = 30.0  # as Triton's --exit-timeout-secs
CLOSE_TIMEOUT_S = 5.0  # flushing answers to peers that stopped reading, after which they are cut
CONTROL_WORKERS = 2  # threads for load/unload (backend inits block)


def _positive_int(name: str, value: object) -> int:
    if type(value) is not int or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}", key=name, value=repr(value))
    return value


def _port(name: str, value: object) -> int | None:
    if value is not None and (type(value) is not int or not 0 <= value <= 65535):
        raise ConfigError(f"{name} must be a port number 0-65535 (0 = any free port) or None, got {value!r}", key=name)
    return value


class Server:
    """``Server(repository, host, port, ...)``; ``await start()``, then ``serve_forever()`` or
    ``stop()``.  ``repository`` is a ModelRepository or a path to one; port 0 picks a free port
    (read it from ``.port`` after start).

    Model control: ``model_control`` ("none", "poll" or "explicit"; control.py), with
    ``load_models`` (explicit), ``poll_interval_s`` (poll) and ``allow_model_control``.
    Access: ``token`` (str/bytes; the ``auth`` operation), ``ssl_context`` (TLS),
    ``max_connections``, ``max_in_flight_per_connection``, ``max_frame``.  Metrics:
    ``metrics_port`` (None = off; 0 = any free port, read ``.metrics_port`` after start).
    Shared memory: ``shared_memory`` (False refuses the shm operations), with per-connection
    limits ``shm_max_regions`` and ``shm_max_bytes``.
    """

    def __init__(
        self,
        repository: ModelRepository | str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_in_flight_per_connection: int = DEFAULT_MAX_IN_FLIGHT,
        allow_model_control: bool = False,
        grace_s: float = DEFAULT_GRACE_S,
        poll_interval_s: float | None = None,
        model_control: str | None = None,
        load_models: Iterable[str] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        token: str | bytes | None = None,
        auth_timeout_s: float = DEFAULT_AUTH_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
        metrics_port: int | None = None,
        shared_memory: bool = True,
        shm_max_regions: int = DEFAULT_MAX_REGIONS,
        shm_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.repository = repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
        self.host = host
        self.port = port
        self.max_frame = _positive_int("max_frame", max_frame)
        self.max_in_flight = _positive_int("max_in_flight_per_connection", max_in_flight_per_connection)
        self.control = ModelControl.resolve(model_control, allow_model_control, poll_interval_s, load_models)
        self.grace_s = float(grace_s)
        if not auth_timeout_s > 0:
            raise ConfigError(f"auth_timeout_s must be > 0 seconds, got {auth_timeout_s!r}", key="auth_timeout_s")
        self.authenticator = None if token is None else Authenticator(token)
        self.ssl_context = ssl_context
        self.metrics_port = _port("metrics_port", metrics_port)
        self._poller: asyncio.Task | None = None
        self.tracker = ConnectionTracker(
            self.max_frame,
            self.max_in_flight,
            max_connections=_positive_int("max_connections", max_connections),
            auth_required=self.authenticator is not None,
            auth_timeout_s=float(auth_timeout_s),
            pre_auth_max_frame=PRE_AUTH_MAX_FRAME,
        )
        limits = ShmLimits(_positive_int("shm_max_regions", shm_max_regions), _positive_int("shm_max_bytes", shm_max_bytes))
        self.shm = SharedMemory(limits if shared_memory else None)
        self.tracker.closed = self.shm.connection_closed  # a connection's regions go with it
        self.metrics: Metrics | None = None
        self.dispatcher: Dispatcher | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stop_requested = asyncio.Event()  # binds to a loop on first use (3.10+)
        self._stopping: asyncio.Future | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def allow_model_control(self) -> bool:
        """Whether clients may load and unload models (the mode decides: control.py)."""
        return self.control.operations

    @property
    def poll_interval_s(self) -> float | None:
        return self.control.poll_interval_s

    # -- start -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model (failures become UNAVAILABLE with their reason), then listen."""
        from .. import __version__

        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(CONTROL_WORKERS, thread_name_prefix="trtserve-control")
        if self.metrics_port is not None:  # before loading, so every version is subscribed as it is built
            self.metrics = Metrics(self.tracker, self._serving)
            self.metrics.watch(self.repository)
        try:
            await loop.run_in_executor(self._executor, self.control.load_at_start, self.repository)
            self._log_models()
            self.dispatcher = Dispatcher(
                self.repository,
                loop=loop,
                executor=self._executor,
                max_frame=self.max_frame,
                control=self.control,
                version=__version__,
                authenticator=self.authenticator,
                metrics=self.metrics,
                shared_memory=self.shm,
            )
            await self._listen(loop, self.dispatcher.dispatch)
        except BaseException:
            await loop.run_in_executor(None, self._close_models)
            raise
        self.dispatcher.ready = True
        if self.control.poll_interval_s is not None:
            self._poller = loop.create_task(poll_forever(self.repository, self._executor, self.control.poll_interval_s))
        log.info("listening on %s:%d (model control: %s%s%s)", self.host, self.port, self.control.mode,
                 ", TLS" if self.ssl_context else "", ", token required" if self.authenticator else "")

    def _serving(self) -> bool:
        dispatcher = self.dispatcher
        return dispatcher is not None and dispatcher.ready and not dispatcher.draining

    async def _listen(self, loop: asyncio.AbstractEventLoop, dispatch) -> None:
        tracker = self.tracker

        def accept() -> ServerProtocol:
            protocol = ServerProtocol(dispatch, tracker)
            if self.ssl_context is not None:
                # A failed TLS handshake ends inside the SSL layer: this protocol is never
                # connected, only dropped.  Its finalizer is the one place that sees it.
                weakref.finalize(protocol, _count_failed_handshake, protocol.connected, tracker)
            return protocol

        self._listener = await loop.create_server(accept, self.host, self.port, reuse_address=True, ssl=self.ssl_context)
        self.port = self._listener.sockets[0].getsockname()[1]
        if self.metrics is not None:
            try:
                self.metrics_port = self.metrics.serve(self.host, self.metrics_port)
            except OSError:
                self._listener.close()
                raise

    def _log_models(self) -> None:
        rows = self.repository.index()  # the repository already logged each failure's reason
        ready = [r["name"] for r in rows if r["state"] == ModelState.READY.value]
        other = [f"{r['name']} ({r['state']})" for r in rows if r["state"] != ModelState.READY.value]
        log.info("models READY: %s; not ready: %s", ", ".join(ready) or "none", ", ".join(other) or "none")

    # -- run -----------------------------------------------------------------------------
    async def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (or ``request_stop()``), then shut down gracefully."""
        if self._listener is None:
            await self.start()
        loop = asyncio.get_running_loop()
        installed = self._install_signal_handlers(loop)
        try:
            await self._stop_requested.wait()
            await self.stop()  # the handlers stay: a second signal cuts the grace period short
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def request_stop(self) -> None:
        """Ask serve_forever to shut down; a second request skips the grace period."""
        if self._stop_requested.is_set():
            log.warning("second stop request: answering what is still in flight with SHUTTING_DOWN")
            self.tracker.force_idle()
        self._stop_requested.set()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread (an embedded server): the owner stops it
            installed.append(sig)
        return installed

    def _on_signal(self, sig: int) -> None:
        log.info("%s received: shutting down (grace %.0f s)", signal.Signals(sig).name, self.grace_s)
        self.request_stop()

    # -- stop ----------------------------------------------------------------------------
    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace_s``), close models."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = asyncio.get_running_loop().create_future()
        try:
            await self._shut_down(self.grace_s if grace_s is None else grace_s)
        finally:
            self._stopping.set_result(None)

    async def _shut_down(self, grace_s: float) -> None:
        self._stop_requested.set()  # a serve_forever in progress returns
        if self.dispatcher is not None:
            self.dispatcher.ready = False
            self.dispatcher.draining = True
        if self._poller is not None:
            self._poller.cancel()  # a poll already running in the executor finishes below
        if self._listener is not None:
            self._listener.close()
        tracker = self.tracker
        if not await tracker.wait_idle(grace_s):
            log.warning("grace period over: answering %d request(s) still in flight with SHUTTING_DOWN", tracker.in_flight)
        error = ShuttingDownError("the server shut down before this request was answered; retry on another server")
        for conn in list(tracker.connections):
            conn.shut_down(error)
        if not await tracker.wait_disconnected(CLOSE_TIMEOUT_S):
            for conn in list(tracker.connections):
                conn.abort()  # peers that stopped reading: their answers cannot be delivered
        if self._listener is not None:
            await self._listener.wait_closed()
        self.shm.close()  # what aborted connections registered, too
        await asyncio.get_running_loop().run_in_executor(None, self._close_models)
        log.info("stopped")

    def _close_models(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)  # a load in progress finishes before models close
        self.repository.close()


def _count_failed_handshake(connected: list[bool], tracker: ConnectionTracker) -> None:
    if not connected[0]:
        tracker.refused("tls_handshake")
