"""The one asyncio core of the client: a single TCP connection that pipelines requests.

Many requests may be in flight at once; each gets a fresh id and a future, and responses
are matched to futures by id in whatever order the server sends them.  Every failure is a
typed :class:`~trtserve_client.errors.TrtserveError` chosen by the wire ``code`` alone.

Lifecycle: the connection opens on the first request.  When it drops (server restart,
network error, a connection-level error from the server, garbage from the peer) every
request still pending fails with :class:`ConnectionFailedError`, whose ``__cause__`` is the
server's own error when it sent one (``"id": nil``), and the next request opens a new
connection.  Requests are never retried
behind the caller's back: whether one ran on the server is unknowable once the link is gone.

Access control: with ``token``, every new connection (the first and each reconnect) sends
``{"op": "auth", "token": ...}`` and waits for its answer before any other request goes out
(a wrong token raises UnauthenticatedError).  With ``ssl`` (an ``ssl.SSLContext``) the
connection is TLS, verified against ``server_hostname`` (default: the host).

Shared-memory regions belong to a connection on the server, so the regions registered
through ``register_region`` are registered again, right after ``auth``, on every new
connection, before any other request goes out.
"""
from __future__ import annotations

import asyncio
import itertools
import socket
import ssl as _ssl
from typing import Any, cast

from .errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    FrameTooLargeError,
    ProtocolError,
    TrtserveError,
    error_from_wire,
)
from .frames import BadFrame, FrameDecoder, frame_parts, frame_size
from .writer import CoalescingWriter
from .wire import DEFAULT_MAX_FRAME, PROTOCOL_VERSION

DEFAULT_CONNECT_TIMEOUT = 10.0
_ID_SPACE = 1 << 64  # ids are uint64 on the wire


class _Protocol(asyncio.BufferedProtocol):
    """Transport callbacks; all state lives in the owning :class:`Connection`.  Responses are
    read straight into their frame's buffer, and their tensors are views of it (frames.py)."""

    def __init__(self, owner: Connection) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(owner.max_frame)
        self.sent: set[int] = set()  # ids written on this connection and not yet answered
        self.failure: TrtserveError | None = None  # why the server closed it (an "id": nil error)
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.closed = asyncio.get_running_loop().create_future()
        self.writer: CoalescingWriter | None = None  # one write per loop turn when pipelining

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream's transport (uvloop's is one without subclassing asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.writer = CoalescingWriter(self.transport, asyncio.get_running_loop())
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small request frames must not wait for Nagle: latency matters more here.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            answers: list[dict[str, Any]] = []
            for message in self.decoder.buffer_updated(nbytes):
                if isinstance(message, BadFrame):  # a server never refers to bytes it did not send
                    raise message.error
                answers.append(message)
        except TrtserveError as exc:  # garbage from the server: nothing after it can be trusted
            self.owner._abort(self, self.owner._failure("the server sent an invalid frame", exc))
            return
        for answer in answers:
            self.owner._dispatch(self, answer)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost fails what is pending

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()  # wake writers so they see the connection is gone
        reason = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
        if self.decoder.pending_partial_frame():
            reason += " in the middle of a response frame"
        self.owner._lost(self, ConnectionFailedError(f"connection to {self.owner.address} lost: {reason}",
                                                     address=self.owner.address))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()


class Connection:
    """One pipelined connection to a trtserve server; use from one event loop.

    ``request(op, fields, timeout)`` sends one request and returns its ``result`` map, or
    raises the typed error the server sent.  ``timeout`` (seconds) bounds connecting,
    sending and waiting; on expiry the request fails with DeadlineExceededError, its late
    response is discarded and the connection stays usable.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        token: str | bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.max_frame = int(max_frame)
        self.connect_timeout = connect_timeout
        self.token = token
        self.ssl = ssl
        self.server_hostname = server_hostname if ssl is not None else None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._regions: dict[str, dict[str, Any]] = {}  # name -> shm_register fields, replayed on connect

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def in_flight(self) -> int:
        """Requests sent (or being sent) and not yet answered."""
        return len(self._pending)

    @property
    def connected(self) -> bool:
        p = self._protocol
        return p is not None and p.transport is not None and not p.transport.is_closing()

    async def connect(self) -> None:
        """Open the connection now instead of on the first request."""
        if self._closed:
            raise ConnectionFailedError(f"connection to {self.address} is closed", address=self.address)
        await self._ensure_connected()

    # -- requests ----------------------------------------------------------------------
    async def request(self, op: str, fields: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send ``{"v", "id", "op", **fields}`` and return the response's ``result``."""
        if self._closed:
            raise ConnectionFailedError(f"connection to {self.address} is closed", address=self.address)
        request_id = next(self._ids) % _ID_SPACE
        frame = frame_parts({"v": PROTOCOL_VERSION, "id": request_id, "op": op, **(fields or {})})
        self._check_size(frame, op)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            if timeout is None:  # the common case: no Timeout object, no current_task() lookup
                response = await self._exchange(request_id, frame, future)
            else:
                async with asyncio.timeout(timeout):
                    response = await self._exchange(request_id, frame, future)
        except TimeoutError:
            raise DeadlineExceededError(
                f"{op} got no response from {self.address} within {timeout} s (client-side timeout)",
                op=op,
                timeout_s=timeout,
                side="client",
            ) from None
        finally:
            # A late response for this id is dropped by _dispatch; nothing else to undo.
            self._pending.pop(request_id, None)
        return _result_of(response)

    async def _exchange(self, request_id: int, frame: list[Any], future: asyncio.Future) -> dict[str, Any]:
        protocol = await self._ensure_connected()
        try:
            await self._write(protocol, request_id, frame)
            return await future
        finally:
            protocol.sent.discard(request_id)

    def _check_size(self, frame: list[Any], op: str) -> None:
        # The server would answer an oversized frame by closing the connection, failing every
        # other request pipelined on it; refusing here keeps the damage to this one call.
        size = frame_size(frame)
        if size > self.max_frame:
            raise FrameTooLargeError(
                f"{op} request of {size} bytes exceeds the maximum frame of {self.max_frame} bytes; "
                "send smaller inputs or raise max_frame on both the client and the server",
                length=size,
                max_frame=self.max_frame,
            )

    async def _write(self, protocol: _Protocol, request_id: int, frame: list[Any]) -> None:
        # Backpressure: while the transport's buffer is over its high-water mark, wait.
        if not protocol.can_write.is_set():
            await protocol.can_write.wait()
        transport = protocol.transport
        if transport is None or transport.is_closing() or protocol is not self._protocol:
            if protocol.failure is not None:  # e.g. refused at once: over the server's connection limit
                raise _copy(protocol.failure)
            raise ConnectionFailedError(f"connection to {self.address} was lost before sending", address=self.address)
        protocol.writer.write(frame, alone=len(self._pending) == 1)  # type: ignore[union-attr]
        protocol.sent.add(request_id)

    # -- connecting --------------------------------------------------------------------
    async def _ensure_connected(self) -> _Protocol:
        if self.connected:
            return self._protocol  # type: ignore[return-value]
        if self._connecting is None:
            # One connect attempt shared by every request that arrives while it runs.
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_finished)
        # shield: one caller timing out must not cancel the attempt the others wait on.
        return await asyncio.shield(self._connecting)

    def _connect_finished(self, future: asyncio.Future[_Protocol]) -> None:
        self._connecting = None
        if not future.cancelled():
            future.exception()  # mark retrieved; each waiter already got it

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, protocol = await loop.create_connection(
                    lambda: _Protocol(self), self.host, self.port, ssl=self.ssl, server_hostname=self.server_hostname
                )
                if self.token is not None:
                    await self._handshake(transport, protocol, "auth", {"token": self.token})
                for fields in list(self._regions.values()):
                    await self._handshake(transport, protocol, "shm_register", fields)
        except (OSError, TimeoutError, TrtserveError) as exc:
            if protocol is not None and protocol.transport is not None:
                protocol.transport.close()
            if isinstance(exc, TrtserveError) and (not isinstance(exc, ConnectionFailedError) or exc.__cause__):
                raise  # the server's own answer (UNAUTHENTICATED, or a refusal as the cause): typed
            raise ConnectionFailedError(
                f"cannot connect to trtserve at {self.address}: {type(exc).__name__}: {exc}; "
                "is the server running and listening on that address"
                + (" with TLS?" if self.ssl is not None else "?"),
                address=self.address,
            ) from None
        if self._closed:
            transport.close()
            raise ConnectionFailedError(f"connection to {self.address} is closed", address=self.address)
        self._protocol = protocol
        return protocol

    async def _handshake(self, transport: asyncio.Transport, protocol: _Protocol, op: str, fields: dict[str, Any]) -> None:
        """Send ``auth`` (or a region's ``shm_register``) on a new connection and wait for its
        answer.  Until then the connection is not ``self._protocol``, so no other request can
        go out before it."""
        request_id = next(self._ids) % _ID_SPACE
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            transport.writelines(frame_parts({"v": PROTOCOL_VERSION, "id": request_id, "op": op, **fields}))
            protocol.sent.add(request_id)
            _result_of(await future)
        finally:
            self._pending.pop(request_id, None)
            protocol.sent.discard(request_id)

    # -- shared-memory regions ---------------------------------------------------------
    async def register_region(self, fields: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """``shm_register`` now, and again on every reconnect (regions die with a connection)."""
        await self._ensure_connected()  # a fresh connection first registers the earlier regions
        result = await self.request("shm_register", fields, timeout)
        self._regions[fields["name"]] = fields
        return result

    async def unregister_region(self, name: str | None, timeout: float | None = None) -> None:
        """``shm_unregister`` of one region (None: all): returns once the server let go of it."""
        if name is None:
            self._regions.clear()
        elif self._regions.pop(name, None) is None:
            return
        if self.connected:
            await self.request("shm_unregister", {} if name is None else {"name": name}, timeout)

    # -- callbacks from _Protocol ------------------------------------------------------
    def _dispatch(self, protocol: _Protocol, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        if request_id is None:
            # A connection-level error: the server could not attribute a frame and is closing.
            # It is not about any one pending request, so each gets ConnectionFailedError.
            cause = _connection_error(message)
            self._abort(protocol, self._failure("the server closed the connection after an error", cause))
            return
        protocol.sent.discard(request_id)
        future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_result(message)
        # Otherwise the caller timed out or was cancelled: the late response is dropped.

    def _failure(self, what: str, cause: TrtserveError) -> ConnectionFailedError:
        error = ConnectionFailedError(
            f"connection to {self.address} failed: {what}: {cause.name}: {cause.message}",
            address=self.address,
            cause_code=int(cause.code),
            cause=cause.name,
        )
        error.__cause__ = cause
        return error

    def _abort(self, protocol: _Protocol, error: TrtserveError) -> None:
        protocol.failure = error
        self._fail_pending(protocol, error)
        if protocol.transport is not None:
            protocol.transport.close()

    def _lost(self, protocol: _Protocol, error: TrtserveError) -> None:
        self._fail_pending(protocol, error)
        if self._protocol is protocol:
            self._protocol = None  # the next request reconnects

    def _fail_pending(self, protocol: _Protocol, error: TrtserveError) -> None:
        # Only requests written on this connection: one still waiting for a new connection
        # (or for its first write) is unaffected by an old connection going away.
        sent, protocol.sent = protocol.sent, set()
        for request_id in sent:
            future = self._pending.get(request_id)
            if future is not None and not future.done():
                future.set_exception(_copy(error))

    # -- closing -----------------------------------------------------------------------
    async def close(self) -> None:
        """Close the connection; pending requests fail with ConnectionFailedError."""
        self._closed = True
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            await protocol.closed


def _result_of(response: dict[str, Any]) -> dict[str, Any]:
    if "error" in response:
        raise error_from_wire(response["error"])
    result = response.get("result")
    if not isinstance(result, dict):
        raise ProtocolError(
            f"response {response.get('id')!r} has neither an error nor a result map",
            keys=sorted(map(str, response)),
        )
    return result


def _connection_error(message: dict[str, Any]) -> TrtserveError:
    if "error" in message:
        return error_from_wire(message["error"])
    return ProtocolError("the server sent a response without an id", keys=sorted(map(str, message)))


def _copy(error: TrtserveError) -> TrtserveError:
    # Each waiter gets its own exception object: a shared one would accumulate tracebacks.
    clone = type(error)(error.message)
    clone.details = dict(error.details)
    clone.code = error.code
    clone.__cause__ = error.__cause__
    return clone
