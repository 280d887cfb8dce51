"""The server: listen, load the repository, serve, shut down gracefully.

Start: bind at once (``live`` answers, ``ready`` is false), then load the start-up models a
few at a time on daemon threads; each serves as soon as it is READY, and ``ready`` turns
true once every one has loaded or failed.  A model's own code cannot hold this up for more
than its ``load_timeout`` (loadjob.py), nor keep a stop from going ahead.

Shutdown (``stop``, or SIGINT/SIGTERM under ``serve_forever``):

1. stop accepting connections and stop reading new frames on every connection; ``ready``
   turns false; requests already read are answered (new work among them gets
   SHUTTING_DOWN);
2. wait up to ``grace_s`` for every request in flight to be answered; a connection with
   nothing left unanswered closes cleanly at once (protocol.py: half-close, then linger);
3. answer whatever is still in flight with SHUTTING_DOWN, flush and close every connection;
4. close the models (queued work fails, running batches finish, instance threads join);
   loads still running are not waited for.

A second signal answers what is in flight with SHUTTING_DOWN and exits without waiting
for the models.

Model control modes live in control.py, access control in auth.py and protocol.py, the
Prometheus exporter in metrics.py, shared-memory regions in shm_ops.py; docs/operations.md
describes them for operators.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import threading
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

from trtserve_client.wire import DEFAULT_MAX_FRAME

from ..errors import ConfigError
from ..repository import ModelRepository, ModelState
from .auth import DEFAULT_AUTH_TIMEOUT_S, PRE_AUTH_MAX_FRAME, Authenticator
from .budget import ByteBudget, default_limits
from .control import ModelControl, poll_forever
from .handlers import Dispatcher
from .listener import Acceptor, LoopThread, bind
from .metrics import Metrics
from .reaper import DEFAULT_IDLE_S, DEFAULT_MIN_RECEIVE_RATE, DEFAULT_RECEIVE_S, DEFAULT_WRITE_S, Timeouts
from .shm import DEFAULT_MAX_BYTES, DEFAULT_MAX_REGIONS, ShmLimits
from .shard import IOShard
from .shm_ops import SharedMemory
from .threads import DaemonExecutor
from .tracker import DEFAULT_MAX_CONNECTIONS, ConnectionTracker

log = logging.getLogger("trtserve.server")

DEFAULT_MAX_IN_FLIGHT = 128  # per connection; enough to keep a batched model busy from one client
DEFAULT_GRACE_S = 30.0  # as Triton's --exit-timeout-secs
HURRY_POLL_S = 0.05  # how soon a second stop request ends the wait for the models to close
MAX_IO_THREADS = 4  # the loops share one GIL: beyond a few, only the socket copies still run in parallel


def default_io_threads() -> int:
    """One I/O loop per four cores, at most MAX_IO_THREADS: the loops' socket copies
    run in parallel, and the cores left serve the models' instances."""
    return max(1, min(MAX_IO_THREADS, (os.cpu_count() or 1) // 4))


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
    ``max_connections``, ``max_in_flight_per_connection``, ``max_frame``.  Memory and
    reaping: ``max_buffered`` and ``max_buffered_per_connection`` (bytes; None = sized from
    the machine, budget.py), ``idle_timeout_s``, ``receive_timeout_s``, ``min_receive_rate``,
    ``write_timeout_s`` (0 turns one off; reaper.py).  Metrics: ``metrics_port`` (None =
    off; 0 = any free port, read ``.metrics_port`` after start).  Shared memory:
    ``shared_memory`` (False refuses the shm operations), with per-connection limits
    ``shm_max_regions`` and ``shm_max_bytes``.  I/O: ``io_threads`` event loops share the
    connections (None = ``default_io_threads()``; shard.py), ``max_connections`` split
    between them.
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
        max_buffered: int | None = None,
        max_buffered_per_connection: int | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_S,
        receive_timeout_s: float = DEFAULT_RECEIVE_S,
        min_receive_rate: int = DEFAULT_MIN_RECEIVE_RATE,
        write_timeout_s: float = DEFAULT_WRITE_S,
        io_threads: int | None = None,
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
        max_connections = _positive_int("max_connections", max_connections)
        shards = min(max_connections, _positive_int("io_threads", default_io_threads() if io_threads is None else io_threads))
        budget = ByteBudget(*default_limits(self.max_frame, max_buffered, max_buffered_per_connection))
        timeouts = Timeouts.checked(idle_timeout_s, receive_timeout_s, min_receive_rate, write_timeout_s)
        limits = ShmLimits(_positive_int("shm_max_regions", shm_max_regions), _positive_int("shm_max_bytes", shm_max_bytes))
        self.shm = SharedMemory(limits if shared_memory else None)
        # One tracker per I/O loop, the connection limit split between them (shard.py).
        self.trackers = [
            ConnectionTracker(
                self.max_frame,
                self.max_in_flight,
                max_connections=share,
                auth_required=self.authenticator is not None,
                auth_timeout_s=float(auth_timeout_s),
                pre_auth_max_frame=PRE_AUTH_MAX_FRAME,
                budget=budget,
                timeouts=timeouts,
                server_max_connections=max_connections,
            )
            for share in _split(max_connections, shards)
        ]
        for tracker in self.trackers:
            tracker.closed = self.shm.connection_closed  # a connection's regions go with it
        self.shards: list[IOShard] = []
        self.metrics: Metrics | None = None
        self.dispatcher: Dispatcher | None = None  # the main loop's (shard 0)
        self._acceptor: Acceptor | None = None
        self._executor: DaemonExecutor | None = None
        self._stop_requested = asyncio.Event()  # binds to a loop on first use (3.10+)
        self._hurry = threading.Event()  # a second stop request: exit without waiting for models
        self._stopping: asyncio.Future | None = None

    @property
    def tracker(self) -> ConnectionTracker:
        """The first I/O loop's connections (all of them with ``io_threads=1``)."""
        return self.trackers[0]

    @property
    def io_threads(self) -> int:
        return len(self.trackers)

    @property
    def in_flight(self) -> int:
        """Requests read and not yet answered, on every I/O loop (any thread may read it)."""
        return sum(tracker.in_flight for tracker in self.trackers)

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
        """Listen at once, then load the start-up models (failures become UNAVAILABLE with
        their reason; each model serves as soon as it is READY); return once all of them
        have loaded or failed, or a stop was requested meanwhile."""
        from .. import __version__

        loop = asyncio.get_running_loop()
        names = self.control.startup_models(self.repository)  # an unknown --load-model: before binding
        executor = self._executor = DaemonExecutor()
        if self.metrics_port is not None:  # before loading, so every version is subscribed as it is built
            self.metrics = Metrics(self.trackers, self._serving)
            self.metrics.watch(self.repository)

        def make_dispatcher(shard_loop: asyncio.AbstractEventLoop) -> Dispatcher:
            return Dispatcher(
                self.repository,
                loop=shard_loop,
                executor=executor,
                max_frame=self.max_frame,
                control=self.control,
                version=__version__,
                authenticator=self.authenticator,
                metrics=self.metrics,
                shared_memory=self.shm,
            )

        try:
            await self._start_shards(loop, make_dispatcher)
            self._listen()
        except BaseException:
            self._stop_shards()
            await _off_loop(self._close_models)
            raise
        log.info("accepting connections on %s:%d; loading models", self.host, self.port)
        loading = loop.run_in_executor(self._executor, self.repository.load_all, names)
        stop = loop.create_task(self._stop_requested.wait())
        waiting: set[asyncio.Future[Any]] = {loading, stop}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not loading.done():
            return  # stopped while loading: serve_forever or the caller's stop() goes on
        self._log_models()
        for dispatcher in self._dispatchers():
            dispatcher.ready = True
        if self.control.poll_interval_s is not None:
            self._poller = loop.create_task(poll_forever(self.repository, self._executor, self.control.poll_interval_s))
        log.info("listening on %s:%d (model control: %s%s%s)", self.host, self.port, self.control.mode,
                 ", TLS" if self.ssl_context else "", ", token required" if self.authenticator else "")

    def _serving(self) -> bool:
        dispatcher = self.dispatcher
        return dispatcher is not None and dispatcher.ready and not dispatcher.draining

    async def _start_shards(self, loop: asyncio.AbstractEventLoop, make_dispatcher) -> None:
        for index, tracker in enumerate(self.trackers):
            # The main loop's kind (uvloop under `trtserve serve`): its class takes no arguments.
            thread = LoopThread(type(loop), f"trtserve-io-{index}") if index else None
            self.shards.append(IOShard(index, tracker, self.ssl_context, thread))
        for shard in self.shards:
            await shard.start(make_dispatcher)
        self.dispatcher = self.shards[0].dispatcher

    def _stop_shards(self) -> None:
        for shard in self.shards:
            shard.stop_thread()

    def _dispatchers(self) -> list[Dispatcher]:
        return [shard.dispatcher for shard in self.shards if shard.dispatcher is not None]

    def _listen(self) -> None:
        sockets = bind(self.host, self.port)
        self.port = sockets[0].getsockname()[1]
        self._acceptor = Acceptor(sockets, self._hand_off)
        if self.metrics is not None and self.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(self.host, self.metrics_port)
            except OSError:
                self._acceptor.close()
                raise
        self._acceptor.start()

    def _hand_off(self, sock) -> None:
        """A new connection goes to the I/O loop with the fewest, among those with room
        (when none has, one of them refuses it or closes its longest idle connection)."""
        with_room = [shard for shard in self.shards if shard.room() > 0] or self.shards
        min(with_room, key=IOShard.open_connections).adopt(sock)

    def _log_models(self) -> None:
        rows = self.repository.index()  # the repository already logged each failure's reason
        ready = [r["name"] for r in rows if r["state"] == ModelState.READY.value]
        other = [f"{r['name']} ({r['state']})" for r in rows if r["state"] != ModelState.READY.value]
        log.info("models READY: %s; not ready: %s", ", ".join(ready) or "none", ", ".join(other) or "none")

    # -- run -----------------------------------------------------------------------------
    async def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGINT/SIGTERM (or ``request_stop()``), then shut down gracefully.
        Starts the server first unless it was started; ``on_ready()`` runs once the start-up
        models have loaded.  The signal handlers are installed before loading, so a signal
        while models load stops the server too."""
        loop = asyncio.get_running_loop()
        installed = self._install_signal_handlers(loop)
        try:
            if self._acceptor is None:
                await self.start()
            if on_ready is not None and not self._stop_requested.is_set():
                on_ready()
            await self._stop_requested.wait()
            await self.stop()  # the handlers stay: a second signal cuts the shutdown short
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def request_stop(self) -> None:
        """Ask serve_forever to shut down; a second request exits without waiting."""
        if self._stop_requested.is_set():
            log.warning("second stop request: answering what is still in flight with SHUTTING_DOWN and exiting "
                        "without waiting for the models")
            self._hurry.set()
            for shard in self.shards:
                shard.force_idle()
        self._stop_requested.set()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed: list[int] = []
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
        for dispatcher in self._dispatchers():
            dispatcher.ready = False
            dispatcher.draining = True
        if self._poller is not None:
            self._poller.cancel()  # a poll already running finishes on its own thread
        if self._acceptor is not None:
            self._acceptor.close()
        await asyncio.gather(*(shard.run(shard.drain(grace_s, self._hurry)) for shard in self.shards))
        if self._acceptor is not None:
            await self._acceptor.wait_closed()
        self._stop_shards()
        self.shm.close()  # what aborted connections registered, too
        closing = asyncio.ensure_future(_off_loop(self._close_models))
        while not closing.done() and not self._hurry.is_set():
            await asyncio.wait({closing}, timeout=HURRY_POLL_S)
        if not closing.done():
            log.warning("exiting without waiting for the models to close (second stop request)")
            return
        closing.result()
        log.info("stopped")

    def _close_models(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # a load still running throws away what it builds
        self.repository.close()


async def _off_loop(fn: Callable[[], None]) -> None:
    """``fn()`` on a daemon thread (the default executor's threads are joined at exit: a
    model that hangs while closing must not keep the process alive)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def run() -> None:
        error: BaseException | None
        try:
            fn()
        except BaseException as exc:  # noqa: B036 - reported to the awaiting coroutine
            error = exc
        else:
            error = None
        try:
            loop.call_soon_threadsafe(_settle, done, error)
        except RuntimeError:
            pass  # the loop is gone (a hurried exit): nobody waits any more

    threading.Thread(target=run, name="trtserve-close", daemon=True).start()
    await done


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares that differ by at most one, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (index < extra) for index in range(parts)]
