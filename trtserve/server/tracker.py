"""Connection bookkeeping and limits of one I/O loop, shared by its connections.

Each of the server's I/O loops (shard.py) has its own tracker, and everything here runs on
that loop's thread, so plain ints and sets are enough.  The memory budget is the one part
shared by every loop (budget.py, under its lock).  The metrics exporter and the acceptor
read ``len(connections)``, ``in_flight`` and ``closed_count`` from their own threads
(single reads of an int or a set's size, which the GIL keeps whole); ``refused`` and
``paused`` count refusals and backpressure.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .budget import ByteBudget
from .ratelog import RateLimitedLog
from .reaper import Reaper, Timeouts

if TYPE_CHECKING:
    from .peer import Peer

DEFAULT_MAX_CONNECTIONS = 1024  # each is a file descriptor: keep the process's LimitNOFILE above this


def _ignore(_: Any) -> None:
    """The default for ``refused``/``paused``: nothing counts them (metrics off)."""


class ConnectionTracker:
    """Who is connected, what is in flight, and the limits every connection obeys."""

    def __init__(
        self,
        max_frame: int,
        max_in_flight: int,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        auth_required: bool = False,
        auth_timeout_s: float = 10.0,
        pre_auth_max_frame: int = 64 * 1024,
        budget: ByteBudget | None = None,
        timeouts: Timeouts | None = None,
        server_max_connections: int | None = None,
    ) -> None:
        self.max_frame = max_frame
        self.max_in_flight = max_in_flight
        self.max_connections = max_connections  # this I/O loop's share
        # The server's --max-connections, which refusals name (the shares add up to it).
        self.server_max_connections = server_max_connections or max_connections
        self.auth_required = auth_required
        self.auth_timeout_s = auth_timeout_s
        self.pre_auth_max_frame = min(pre_auth_max_frame, max_frame)
        self.connections: set[Peer] = set()
        self.lingering: set[Peer] = set()  # closed for requests, draining what the peer sends
        self.in_flight = 0
        # Request bytes read and not yet answered (budget.py); without one, no limit.
        self.budget = budget or ByteBudget(1 << 62, 1 << 62)
        self.reaper = Reaper(self, timeouts or Timeouts(0, 0, 0, 0))  # idle, slow and stalled peers
        self.log = RateLimitedLog(logging.getLogger("trtserve.server"))  # warnings about peers, rate-limited
        # refused(type): a connection or request was refused (auth, connection_limit,
        # frame_too_large, protocol_error, permission_denied, unsupported_protocol); paused(cause): reading stopped.
        self.refused: Callable[[str], None] = _ignore
        self.paused: Callable[[str], None] = _ignore
        # closed(conn): release what the connection owned (its shared-memory regions).
        self.closed: Callable[[Peer], None] = _ignore
        self.closed_count = 0  # connections ended, ever (the acceptor's count of open ones: shard.py)
        # The loop's call_soon_threadsafe, for resumes by the shared budget; None runs them at once.
        self.call_soon: Callable[..., object] | None = None
        self._idle: asyncio.Event | None = None  # exists only while someone waits (shutdown)
        self._empty: asyncio.Event | None = None

    def request_done(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def connection_closed(self, conn: Peer) -> None:
        self.closed_count += 1
        self.connections.discard(conn)
        self.lingering.discard(conn)
        self.closed(conn)
        if not self.connections and not self.lingering and self._empty is not None:
            self._empty.set()

    def linger(self, conn: Peer) -> None:
        """``conn`` is closing and only reads what its peer still sends: its slot is free."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.lingering.add(conn)

    def force_idle(self) -> None:
        """End a wait_idle early (a second shutdown signal)."""
        if self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False when ``timeout`` passed first."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._idle = None
        return self.in_flight == 0

    async def wait_disconnected(self, timeout: float) -> bool:
        """Wait until every connection is closed; False when ``timeout`` passed first."""
        if not self.connections and not self.lingering:
            return True
        self._empty = asyncio.Event()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._empty = None
        return not self.connections and not self.lingering
