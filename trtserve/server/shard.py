"""An I/O shard: one event loop's share of the server's connections.

A single event loop receives every byte the server reads.  For large requests that loop
is the ceiling: ``recv_into`` copies run one at a time even though each releases the GIL.
With ``io_threads = N`` the server runs N shards: shard 0 on the main loop, the others on
loops of their own threads (listener.py), and the acceptor hands each new connection to
the shard with the most room.

A shard owns its connections completely: its ConnectionTracker (count and limit, in-flight
count, reaper), its Dispatcher and that Dispatcher's Doorbell, so a model's answer comes
back on the loop that read the request, and protocol.py, tracker.py and reaper.py stay
single-threaded.  The memory budget is shared (budget.py).  ``--max-connections`` is split
between the shards.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import weakref
from typing import Any
from collections.abc import Callable

from ..errors import ShuttingDownError
from .handlers import Dispatcher
from .listener import LoopThread
from .protocol import ServerProtocol
from .tracker import ConnectionTracker

log = logging.getLogger("trtserve.server")

CLOSE_TIMEOUT_S = 5.0  # flushing answers to peers that stopped reading, after which they are cut
HURRIED_CLOSE_S = 0.5  # the same after a second signal
STOP_THREAD_S = 5.0


class IOShard:
    def __init__(self, index: int, tracker: ConnectionTracker, ssl_context: ssl.SSLContext | None,
                 thread: LoopThread | None) -> None:
        self.index = index
        self.tracker = tracker
        self.ssl_context = ssl_context
        self._thread = thread  # None: the main loop
        self.loop: asyncio.AbstractEventLoop | None = thread.loop if thread is not None else None
        self.dispatcher: Dispatcher | None = None
        self.assigned = 0  # connections handed to this shard, ever (written by the acceptor only)

    # -- start -------------------------------------------------------------------------
    async def start(self, make_dispatcher: Callable[[asyncio.AbstractEventLoop], Dispatcher]) -> None:
        await self.run(self._start(make_dispatcher))

    async def _start(self, make_dispatcher: Callable[[asyncio.AbstractEventLoop], Dispatcher]) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.tracker.call_soon = loop.call_soon_threadsafe
        self.dispatcher = make_dispatcher(loop)
        self.tracker.reaper.start(loop)

    async def run(self, coro: Any) -> Any:
        """Await ``coro`` on this shard's loop, from the main loop."""
        if self._thread is None:
            return await coro
        return await asyncio.wrap_future(self._thread.submit(coro))

    # -- connections -------------------------------------------------------------------
    def open_connections(self) -> int:
        """Connections handed to this shard and not ended (the acceptor's thread reads it)."""
        return self.assigned - self.tracker.closed_count

    def room(self) -> int:
        return self.tracker.max_connections - self.open_connections()

    def adopt(self, sock: socket.socket) -> None:
        """Any thread: serve the accepted ``sock`` on this shard's loop."""
        self.assigned += 1
        loop = self.loop
        assert loop is not None, "adopt before start"
        if self._thread is None:
            self._connect(sock)
        else:
            loop.call_soon_threadsafe(self._connect, sock)

    def _connect(self, sock: socket.socket) -> None:
        loop = self.loop
        assert loop is not None
        task = loop.create_task(loop.connect_accepted_socket(self._protocol, sock, ssl=self.ssl_context))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            # Never a connection (a failed TLS handshake, a peer gone at once): it made no
            # connection_lost either, so it is counted as ended here.
            self.tracker.closed_count += 1

    def _protocol(self) -> ServerProtocol:
        assert self.dispatcher is not None
        protocol = ServerProtocol(self.dispatcher.dispatch, self.tracker)
        if self.ssl_context is not None:
            # A failed TLS handshake ends inside the SSL layer: this protocol is never
            # connected, only dropped.  Its finalizer is the one place that sees it.
            weakref.finalize(protocol, _count_failed_handshake, protocol.connected, self.tracker)
        return protocol

    # -- shutdown ----------------------------------------------------------------------
    def force_idle(self) -> None:
        """Any thread: end the shutdown's wait for requests in flight (a second signal)."""
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self.tracker.force_idle)
            except RuntimeError:
                pass  # the loop is closed: nothing waits

    async def drain(self, grace_s: float, hurried: threading.Event) -> None:
        """On this shard's loop: stop reading, answer what is in flight (up to ``grace_s``),
        then SHUTTING_DOWN for the rest, flush and close every connection."""
        tracker = self.tracker
        if self.dispatcher is not None:
            self.dispatcher.abandon_control(ShuttingDownError(
                "the server is shutting down: this load/unload was not waited for (it goes on until the process exits)"))
        for conn in list(tracker.connections):
            conn.stop_reading()  # no new frames; closes at once when nothing is unanswered
        if not hurried.is_set() and not await tracker.wait_idle(grace_s):
            log.warning("grace period over: answering %d request(s) still in flight with SHUTTING_DOWN", tracker.in_flight)
        error = ShuttingDownError("the server shut down before this request was answered; retry on another server")
        for conn in list(tracker.connections):
            conn.shut_down(error)
        flush_s = HURRIED_CLOSE_S if hurried.is_set() else CLOSE_TIMEOUT_S
        if not await tracker.wait_disconnected(flush_s):
            for conn in list(tracker.connections) + list(tracker.lingering):
                conn.abort()  # peers that stopped reading: their answers cannot be delivered
        tracker.reaper.stop()

    def stop_thread(self) -> None:
        if self._thread is not None:
            self._thread.stop(STOP_THREAD_S)


def _count_failed_handshake(connected: list[bool], tracker: ConnectionTracker) -> None:
    if not connected[0]:
        tracker.refused("tls_handshake")
