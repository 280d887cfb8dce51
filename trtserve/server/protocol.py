"""One asyncio Protocol per client connection: frames in, responses out, with backpressure.

Reading stops (``transport.pause_reading``) while either

* the connection has ``max_in_flight`` requests unanswered (decoded frames beyond that wait
  in a backlog that can only hold what one read delivered), or
* the transport's write buffer is over its high-water mark (the peer is not reading),

and resumes when both clear: the pattern of aiohttp's ``base_protocol.py``.  A client can
therefore never make the server hold more than one frame being received, ``max_in_flight``
requests and their responses, however fast it writes or slowly it reads.  Every frame is
also admitted at its header against the server's memory budget (budget.py): past it,
reading stops until room appears, or the frame is RESOURCE_EXHAUSTED if it can never fit.
The reaper (reaper.py) closes idle, trickling and non-reading peers, and makes room at the
connection limit.

Frames are received with ``asyncio.BufferedProtocol``: a large frame is read straight into
a buffer of its own, and its tensors reach the model as numpy views of it (frames.py).

A frame the server cannot attribute to a request (oversized, not msgpack, not a map, no
valid ``id``, a truncated frame at EOF) is answered with ``"id": nil`` and only that
connection is closed.  A frame that can be attributed but not served (a bad buffer
reference, the layout of protocol version 1) is answered for its id, and the connection
goes on.  So is a connection over ``max_connections`` when none is idle (RESOURCE_EXHAUSTED).
With a token configured, the first request must be ``auth`` (server/auth.py); anything
else, a wrong token or no auth within the timeout is UNAUTHENTICATED, then close.  When a connection goes away, its requests in flight are cancelled
(queued ones are never run) and their responses dropped.  The server's closes are clean
(closing.py): answers already sent are never destroyed by a reset.  At shutdown
(``stop_reading``) no new frame is read, and the connection closes once every request read
is answered.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from typing import Any, cast

from trtserve_client.frames import BadFrame, FrameDecoder, frame_parts, pack_v1
from trtserve_client.limits import MAX_ELEMENTS
from trtserve_client.writer import CoalescingWriter

from ..errors import (
    ErrorCode,
    FrameTooLargeError,
    InternalError,
    InvalidArgumentError,
    ProtocolError,
    ResourceExhaustedError,
    TrtserveError,
    UnauthenticatedError,
)
from ..hold import held_dispatch
from .closing import DISCARD, Closing
from .reply import Framed, Reply
from .tracker import ConnectionTracker

__all__ = ["ConnectionTracker", "ServerProtocol"]

log = logging.getLogger("trtserve.server")
_MAX_ID = 2**64
# Refusals counted in the metrics (trtserve_refusals_total{type}), by error code.
_REFUSALS = {
    ErrorCode.UNAUTHENTICATED: "auth",
    ErrorCode.RESOURCE_EXHAUSTED: "connection_limit",
    ErrorCode.FRAME_TOO_LARGE: "frame_too_large",
    ErrorCode.PROTOCOL_ERROR: "protocol_error",
    ErrorCode.INVALID_ARGUMENT: "protocol_error",  # only connection-level ones reach _fail
    ErrorCode.PERMISSION_DENIED: "permission_denied",
}


class ServerProtocol(Closing, asyncio.BufferedProtocol):
    """One client connection.  ``dispatch(message, connection)`` answers at once (a dict) or
    later (a server/reply.Reply: handlers.Deferred, infer.InferCall)."""

    def __init__(self, dispatch: Any, tracker: ConnectionTracker) -> None:
        self._dispatch = dispatch
        self._tracker = tracker
        self._limit = tracker.max_in_flight
        # Every frame is admitted against the memory budget at its header (budget.py).
        self._account = tracker.budget.account(self._resume_admission, tracker.call_soon)
        self._decoder = FrameDecoder(tracker.max_frame, admit=self._account.admit, max_elements=MAX_ELEMENTS)
        self.received_bytes = 0  # what the reaper watches (reaper.py)
        self.frames_read = 0
        self.connected_at = time.monotonic()
        self._stopped = False  # shutting down: no new frames are read
        self._lingering = False  # closed for requests; reading and dropping until the peer closes
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, Any] = {}  # request id -> its pending call
        self._backlog: collections.deque[dict[str, Any] | BadFrame] = collections.deque()
        self._reading_paused = False
        self._writing_paused = False
        self._handling = False  # inside _drain's loop over a burst of requests
        self._closing = False
        self._eof = False
        self._writer: CoalescingWriter | None = None  # answers of one loop turn: one write
        self._authenticated = not tracker.auth_required
        self._auth_timer: asyncio.TimerHandle | None = None
        self.peer: Any = None
        self.connected = [False]  # a cell the TLS handshake finalizer reads (server/app.py)

    # -- introspection (tests, debugging) ------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def backlogged(self) -> int:
        return len(self._backlog)

    @property
    def reading_paused(self) -> bool:
        return self._reading_paused

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    # -- connection lifecycle ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connected[0] = True
        stream = cast(asyncio.Transport, transport)  # a stream server's transport
        self._transport = stream
        self._writer = CoalescingWriter(stream, asyncio.get_running_loop())
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:  # small responses must leave at once, not wait for Nagle
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        tracker = self._tracker
        if len(tracker.connections) >= tracker.max_connections and not tracker.reaper.make_room(self.peer):
            limit = tracker.server_max_connections
            self._fail(ResourceExhaustedError(
                f"the server is at its connection limit (--max-connections {limit}), none of them idle; "
                "retry later, reuse connections, or raise --max-connections",
                max_connections=limit,
            ))
            return
        tracker.connections.add(self)
        if not self._authenticated:
            # Until auth succeeds only small frames are read, and only for auth_timeout_s.
            self._decoder.max_frame = tracker.pre_auth_max_frame
            self._auth_timer = asyncio.get_running_loop().call_later(tracker.auth_timeout_s, self._auth_expired)

    def _auth_expired(self) -> None:
        if not self._authenticated and not self._closing:
            self._fail(UnauthenticatedError(
                f"no auth request within {self._tracker.auth_timeout_s:g} s of connecting; the first request "
                "on a connection to this server must be {op: 'auth', token: ...}",
            ))

    def _authenticated_now(self) -> None:
        self._authenticated = True
        self._decoder.max_frame = self._tracker.max_frame
        if self._auth_timer is not None:
            self._auth_timer.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self._backlog.clear()
        self._cancel_pending()
        self._account.close()
        self._transport = None
        self._tracker.connection_closed(self)

    def eof_received(self) -> bool:
        if self._lingering:
            return False  # the peer closed too: the close is clean
        if self._decoder.pending_partial_frame():
            self._fail(ProtocolError(
                f"connection closed in the middle of a frame ({self._decoder.buffered} bytes of an "
                "incomplete frame received); send whole frames: 4-byte length + that many bytes",
                buffered=self._decoder.buffered,
            ))
            return False
        self._eof = True
        # Answers queued this turn go out first: returning False closes the transport, and
        # over TLS even True is ignored and the connection shuts down.
        self._flush()
        # A half-closed peer still reads: answer what it sent, then close (see _maybe_finish).
        return bool(self._pending or self._backlog)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._drain()

    # -- reading -----------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return DISCARD if self._closing else self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.received_bytes += nbytes
        if self._closing:
            return
        try:
            messages = self._decoder.buffer_updated(nbytes)
        except TrtserveError as exc:
            if not self._authenticated and exc.code == ErrorCode.FRAME_TOO_LARGE:
                exc = FrameTooLargeError(
                    f"{exc.message} (before authentication frames are limited to {self._decoder.max_frame} "
                    "bytes: send auth first and wait for its answer)",
                    **exc.details,
                )
            self._fail(exc)
            return
        if messages:
            self.frames_read += len(messages)
            self._backlog.extend(messages)
        self._drain()

    def _resume_admission(self) -> None:
        """The budget has room for the frame whose header waits: read on."""
        if self._closing or not self._decoder.waiting:
            return
        try:
            messages = self._decoder.resume()
        except TrtserveError as exc:
            self._fail(exc)
            return
        self.frames_read += len(messages)
        self._backlog.extend(messages)
        self._drain()

    def _drain(self) -> None:
        """Handle backlogged requests while under the in-flight limit and while the peer reads
        its answers (a backlog of tiny requests must not become megabytes of unsent answers),
        then (un)pause reading."""
        backlog, pending, limit = self._backlog, self._pending, self._limit
        account = self._account  # each request's frame counts against the budget until it is answered

        def more() -> bool:
            return bool(backlog) and len(pending) < limit and not self._writing_paused and not self._closing

        if more():
            self._handling = True
            try:
                # Inline models run a burst's requests as batches when the hold ends, which
                # frees their in-flight slots: the backlog past the limit then goes on.
                while more():
                    with held_dispatch():
                        while more():
                            size = account.sizes.popleft()  # frames come out in the order admitted
                            if not self._handle(backlog.popleft(), size) and not self._closing:
                                account.release(size)
            finally:
                self._handling = False
            # What the burst answered at once (cheap operations, inline models) leaves now in
            # one write, before the loop goes on to other connections: the peer can start on
            # it while this server works.
            self._flush()
        self._update_reading()
        self._maybe_finish()

    def _update_reading(self) -> None:
        pause = (self._writing_paused or bool(self._backlog) or len(self._pending) >= self._limit
                 or self._decoder.waiting or self._stopped)
        if pause is self._reading_paused or self._closing or self._transport is None:
            return
        self._reading_paused = pause
        if pause:
            self._tracker.paused("write_buffer" if self._writing_paused else "in_flight")
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    def _handle(self, frame: dict[str, Any] | BadFrame, size: int) -> bool:
        """Dispatch one request; True when it is pending (its frame's ``size`` is then kept
        until it is answered, else _drain releases it at once)."""
        if isinstance(frame, BadFrame):
            bad, message = frame, frame.message
        else:
            bad, message = None, frame
        req_id = message.get("id")
        if type(req_id) is not int or not 0 <= req_id < _MAX_ID:
            self._fail(InvalidArgumentError(
                f"field 'id' must be an unsigned 64-bit integer, got {type(req_id).__name__} {req_id!r}; "
                "a response cannot be matched to a request without it",
                field="id",
                value=repr(req_id),
            ))
            return False
        if req_id in self._pending:
            self._fail(InvalidArgumentError(
                f"id {req_id} is already in flight on this connection; ids must be unique among "
                "unanswered requests, or responses cannot be told apart",
                field="id",
                value=req_id,
            ))
            return False
        if bad is not None:
            self._refuse_frame(req_id, bad)
            return False
        if not self._authenticated and message.get("op") != "auth":
            self._fail(UnauthenticatedError(
                f"this server requires authentication: the first request on a connection must be "
                f"{{op: 'auth', token: ...}}, got op {message.get('op')!r}; pass token= to the client",
                operation=repr(message.get("op")),
            ), req_id)
            return False
        try:
            outcome = self._dispatch(message, self)  # self: the owner of per-connection state (regions)
        except TrtserveError as exc:
            if exc.code == ErrorCode.UNAUTHENTICATED:
                self._fail(exc, req_id)  # a wrong token: nothing more is read from this peer
                return False
            if exc.code == ErrorCode.PERMISSION_DENIED:
                self._tracker.refused("permission_denied")
            self._send_error(req_id, exc)
            return False
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("operation %r failed unexpectedly", message.get("op"))
            self._send_error(req_id, InternalError(f"internal error: {type(exc).__name__}: {exc}"))
            return False
        if type(outcome) is dict:
            if not self._authenticated:
                self._authenticated_now()  # the gate above let only an auth request through
            self._send(req_id, {"id": req_id, "result": outcome})
            return False
        self._pending[req_id] = outcome
        self._tracker.in_flight += 1
        self._account.kept[req_id] = size  # before the callback: an inline model may answer at once
        outcome.add_done_callback(self._complete, req_id)
        return True

    def _complete(self, req_id: int, reply: Reply) -> None:
        if self._pending.get(req_id) is not reply:
            return  # cancelled (connection lost, shutdown): its answer is dropped
        del self._pending[req_id]
        self._tracker.request_done()
        account = self._account
        account.release(account.kept.pop(req_id, 0))
        if reply.cancelled:
            return
        exc = reply.error
        if exc is None:
            value = reply.value
            if type(value) is Framed:  # relayed from a Ray replica, with this request's id
                if not self._closing and self._transport is not None:
                    self._writer.write(value.parts, alone=not self._pending and not self._handling)  # type: ignore[union-attr]
            else:
                self._send(req_id, {"id": req_id, "result": value})
        elif isinstance(exc, TrtserveError):
            self._send_error(req_id, exc)
        else:
            log.error("operation failed unexpectedly", exc_info=exc)
            self._send_error(req_id, InternalError(f"internal error: {type(exc).__name__}: {exc}"))
        if (self._backlog or self._reading_paused or self._eof) and not self._handling:
            self._drain()  # (inside _drain's loop, answered at once: that loop goes on itself)

    def _refuse_frame(self, req_id: int, bad: BadFrame) -> None:
        """A frame that parsed but cannot be served: its id gets the error, in the layout the
        peer speaks (a version-1 client could not read a version-2 answer)."""
        if not bad.v1:
            self._send_error(req_id, bad.error)
        elif not self._closing and self._writer is not None:
            self._tracker.refused("unsupported_protocol")
            self._writer.write([pack_v1({"id": req_id, "error": bad.error.to_wire()})], alone=not self._pending)

    # -- writing -----------------------------------------------------------------------
    def _send(self, req_id: int | None, message: dict[str, Any]) -> None:
        # ``message`` is {"id": ..., "result" or "error": ...}, id first: a Ray front door
        # reads the id of its replicas' answers from that position (scaleout/relay_frames.py).
        if self._closing or self._transport is None:
            return
        try:
            frame = frame_parts(message)
        except Exception as exc:  # a result holding a type msgpack cannot encode
            log.error("cannot encode the response to request %s: %s", req_id, exc)
            error = InternalError(f"the server could not encode its response: {type(exc).__name__}: {exc}")
            frame = frame_parts({"id": req_id, "error": error.to_wire()})
        # A lone answer (nothing else in flight on this connection) leaves at once; answers
        # given while a burst of requests is handled leave together at its end (_drain).
        self._writer.write(frame, alone=not self._pending and not self._handling)  # type: ignore[union-attr]

    def _flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def _send_error(self, req_id: int | None, exc: TrtserveError) -> None:
        self._send(req_id, {"id": req_id, "error": exc.to_wire()})

    def _fail(self, exc: TrtserveError, req_id: int | None = None) -> None:
        """A refused connection or an unattributable frame: tell the peer why (``id`` nil
        unless the refusal answers one request), count it, then close this connection only."""
        kind = _REFUSALS.get(exc.code, "protocol_error")
        if kind == "connection_limit" and "max_connections" not in exc.details:
            kind = "memory"  # a frame that can never fit the request-memory budget (budget.py)
        self._tracker.log.warning(kind, "closing connection from %s: %s", self.peer, exc.message)
        self._tracker.refused(kind)
        self._send_error(req_id, exc)
        self._close_gracefully()

    def _cancel_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for call in pending.values():
            call.cancel()
            self._tracker.request_done()
