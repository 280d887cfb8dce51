"""How a connection ends, the half of ServerProtocol (protocol.py) kept apart from the
request path: clean closes, and what the reaper (reaper.py) and the server's shutdown
(app.py) call.

A clean close sends every queued answer, then closes without a reset.  Closing a socket
that still holds unread bytes from the peer makes the kernel reset the connection, and a
reset makes the peer's kernel throw away the answers it has not read yet: the "lost
answers" of a shutdown under load.  So the server half-closes (the peer reads every
answer, then EOF), reads and drops whatever the peer still sends until the peer closes
too, and only then closes; after ``LINGER_S`` it closes anyway.  A lingering connection
no longer holds a slot of ``--max-connections`` (tracker.linger).

At shutdown (``stop_reading``) no new frame is read, and a connection closes this way as
soon as every request it read is answered; ``shut_down`` answers what is left with
SHUTTING_DOWN when the grace period ends.
"""
from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any, cast

from ..errors import TrtserveError

if TYPE_CHECKING:
    from trtserve_client.frames import FrameDecoder

    from .budget import Account
    from .peer import Peer
    from .tracker import ConnectionTracker

DISCARD = memoryview(bytearray(64 * 1024))  # where a closing connection's late bytes go
LINGER_S = 2.0  # after a clean close, how long what the peer still sends is read and dropped


def linger_close(transport: asyncio.Transport, peer_closed: bool) -> bool:
    """Close ``transport`` without a reset: half-close it (the peer reads every answer, then
    EOF) and keep reading until the peer closes too, or for ``LINGER_S`` at most.  True when
    it lingers (the caller drops what it reads meanwhile); a peer that already sent EOF, or
    TLS (no half-close), gets a plain close, which is clean there."""
    if peer_closed or not transport.can_write_eof():
        transport.close()
        return False
    transport.write_eof()
    transport.resume_reading()
    asyncio.get_running_loop().call_later(LINGER_S, transport.close)
    return True


class Closing:
    """ServerProtocol's ending half (a mixin: it uses the protocol's state, ``_closing``,
    ``_eof``, ``_stopped``, ``_pending``, ``_backlog``, ``_transport``, ``_account``, ``_decoder``, and its
    ``_flush``, ``_send_error``, ``_cancel_pending`` and ``_update_reading``)."""

    _closing: bool
    _eof: bool
    _stopped: bool
    _lingering: bool
    _pending: dict[int, Any]
    _backlog: collections.deque[Any]  # requests read and not yet handled (dicts, or frames refused)
    _transport: asyncio.Transport | None
    _account: Account
    _decoder: FrameDecoder
    _tracker: ConnectionTracker

    if TYPE_CHECKING:  # defined by ServerProtocol; declared here for type checkers only
        def _flush(self) -> None: ...
        def _send_error(self, req_id: int | None, exc: TrtserveError) -> None: ...
        def _cancel_pending(self) -> None: ...
        def _update_reading(self) -> None: ...

    def _maybe_finish(self) -> None:
        if (self._eof or self._stopped) and not self._pending and not self._backlog and not self._closing:
            self._close_gracefully()

    def _close_gracefully(self) -> None:
        """Send what is queued, drop what is unanswered, then close without a reset."""
        if self._closing:
            return
        self._flush()
        self._closing = True
        self._backlog.clear()
        self._decoder.clear()  # a half-received frame's memory goes with its budget
        self._cancel_pending()
        self._account.close()
        if self._transport is not None and linger_close(self._transport, self._eof):
            self._lingering = True  # the peer's late bytes go to DISCARD; its EOF ends it
            self._tracker.linger(cast("Peer", self))  # ServerProtocol, the one class that mixes this in

    # -- reaping (reaper.py) ----------------------------------------------------------
    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def partial_frame(self) -> bool:
        """Bytes of a frame not yet complete are held (or its header waits for the budget)."""
        return self._decoder.buffered > 0 or self._decoder.waiting

    def close_with(self, error: TrtserveError | None = None) -> None:
        """Close this connection cleanly, first telling the peer why (``"id": nil``) if ``error``."""
        if error is not None:
            self._send_error(None, error)
        self._close_gracefully()

    # -- shutdown (called by the server) -----------------------------------------------
    def stop_reading(self) -> None:
        """Shutdown begins: read no new frame; close once every request read is answered."""
        self._stopped = True
        self._update_reading()
        self._maybe_finish()

    def shut_down(self, error: TrtserveError) -> None:
        """Answer everything still unanswered with ``error``, then close."""
        if self._closing:
            return
        for req_id in list(self._pending):
            self._send_error(req_id, error)
        for message in self._backlog:
            wire_id = message.get("id") if type(message) is dict else None
            self._send_error(wire_id if type(wire_id) is int else None, error)
        self._close_gracefully()

    def abort(self) -> None:
        """Drop the connection without flushing (a peer that stopped reading during shutdown)."""
        if self._transport is not None:
            self._transport.abort()
