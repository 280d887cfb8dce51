"""One connection from a front-door event loop to one replica's server, carrying relayed frames.

Requests go out with ids of this connection (a counter) and are matched to their answers
by the id read from each answer's raw bytes (relay_frames.py); nothing else of an answer
is unpacked here.  Frames written in one loop turn leave in one write and many answers
arrive per read (CoalescingWriter, FrameDecoder), so a burst of requests costs the
replica's server and the front door a few system calls, not a few per request.

A request is a ``Relayed``: it gives its frame for an id (``frame``), and hears back once,
either ``answered(frame, id_end, error)`` or ``failed(error)`` with a ConnectionFailedError when the
connection could not be opened or dropped before its answer.  Requests sent while the
connection opens wait in order and leave once it is open.  Runs on one event loop.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Any, Protocol, cast

from trtserve_client.frames import FrameDecoder, decode_frame
from trtserve_client.writer import CoalescingWriter

from ..errors import ConnectionFailedError, TrtserveError, error_from_wire
from .relay_frames import read_answer

log = logging.getLogger("trtserve.scaleout")

CONNECT_TIMEOUT_S = 10.0
_ID_SPACE = 1 << 64


class Relayed(Protocol):
    def frame(self, request_id: int) -> list[Any]: ...

    def answered(self, frame: memoryview, id_end: int, error: bool) -> None: ...

    def failed(self, error: TrtserveError) -> None: ...


class ReplicaLink(asyncio.BufferedProtocol):
    """A connection to the replica server at ``host:port`` (opened at once)."""

    def __init__(self, host: str, port: int, max_frame: int) -> None:
        self.address = f"{host}:{port}"
        self.pending: dict[int, Relayed] = {}  # id -> request sent (or waiting to be) and not answered
        self.closed = False  # no more requests: dropped, refused, or closed
        self._decoder = FrameDecoder(max_frame, raw=True)
        self._ids = itertools.count(1)
        self._waiting: list[list[Any]] = []  # frames of requests sent while connecting
        self._transport: asyncio.Transport | None = None
        self._writer: CoalescingWriter | None = None
        loop = asyncio.get_running_loop()
        self._opening = loop.create_task(self._open(loop, host, port))

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def send(self, request: Relayed) -> int:
        """Send ``request``; returns its id here (``forget`` takes it)."""
        request_id = next(self._ids) % _ID_SPACE
        self.pending[request_id] = request
        parts = request.frame(request_id)
        if self._writer is None:
            self._waiting.append(parts)
        else:
            self._writer.write(parts, alone=len(self.pending) == 1)
        return request_id

    def forget(self, request_id: int) -> None:
        """The request's caller gave up: its answer, when it comes, is dropped."""
        self.pending.pop(request_id, None)

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        elif not self._opening.done():
            self._opening.cancel()

    # -- opening -------------------------------------------------------------------------
    async def _open(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await loop.create_connection(lambda: self, host, port)
        except (OSError, TimeoutError, asyncio.CancelledError) as exc:
            self._lost(f"cannot connect: {type(exc).__name__}: {exc}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a stream's transport
        if self.closed:
            stream.close()
            return
        sock = stream.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport = stream
        self._writer = writer = CoalescingWriter(stream, asyncio.get_running_loop())
        waiting, self._waiting = self._waiting, []
        for parts in waiting:
            writer.write(parts, alone=False)

    # -- answers -------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames: list[Any] = self._decoder.buffer_updated(nbytes)  # a raw decoder's: whole frames
        except TrtserveError as exc:
            self._drop(f"it sent an invalid frame: {exc.message}")
            return
        pending = self.pending
        for frame in frames:
            found = read_answer(frame)
            if found is None:
                self._drop(_not_an_answer(frame))
                return
            request_id, id_end, error = found
            request = pending.pop(request_id, None)
            if request is not None:  # else forgotten: its caller gave up
                request.answered(frame, id_end, error)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost fails what is pending

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"{type(exc).__name__}: {exc}" if exc else "the replica closed the connection")

    def _drop(self, why: str) -> None:
        log.warning("replica %s: %s; closing the connection", self.address, why)
        self.close()
        self._lost(why)

    def _lost(self, why: str) -> None:
        """Fail every request not answered (once): the forwarder sends them elsewhere."""
        self.closed = True
        self._transport = self._writer = None
        self._waiting = []
        pending, self.pending = self.pending, {}
        for request in pending.values():
            request.failed(ConnectionFailedError(f"connection to replica {self.address} lost: {why}",
                                                 address=self.address))


def _not_an_answer(frame: memoryview) -> str:
    """Why a frame without a leading id is not an answer (the replica's connection-level
    error, when it sent one)."""
    try:
        message = decode_frame(frame)
    except TrtserveError as exc:
        return f"it sent an invalid frame: {exc.message}"
    if isinstance(message, dict) and "error" in message and message.get("id") is None:
        error = error_from_wire(message["error"])
        return f"it refused the connection: {error.name}: {error.message}"
    return "it sent a frame that is not an answer ({\"id\": <uint>, ...} first)"
