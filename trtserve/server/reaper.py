"""Closing connections that hold a slot or memory without using them.

One timer on the event loop looks at every connection each ``interval`` (a quarter of the
shortest timeout, at most 1 s) and applies, each only when set (0 turns it off):

* **idle** (``idle_s``): no complete frame for that long, and nothing in flight, nothing
  half received, nothing left to write: the connection is closed (a plain close, no error:
  a client reconnects on its next call).
* **receive rate** (``receive_s``, ``min_receive_rate``): a frame that has started must
  keep arriving at ``min_receive_rate`` bytes/s, measured over windows of ``receive_s``.
  A peer trickling a byte a second, or sending most of a large frame and stalling, is
  answered PROTOCOL_ERROR (``"id": nil``) and closed.  Time the server itself stopped
  reading (backpressure, the memory budget) does not count.
* **write** (``write_s``): answers waiting in the server's send buffer whose size has not
  gone down for that long: the peer does not read, so the connection is aborted (nothing
  more can reach it) and its buffered answers freed.

At the connection limit, ``make_room`` closes the connection idle the longest (with
RESOURCE_EXHAUSTED, ``"id": nil``) so that a new connection gets its slot: idle connections
cannot lock clients out.

Every close here is clean (closing.py): answers already sent are never destroyed by a
reset.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, ProtocolError, ResourceExhaustedError

if TYPE_CHECKING:
    from .peer import Peer
    from .ratelog import RateLimitedLog

DEFAULT_IDLE_S = 300.0  # a pooled client connection may rest; five minutes is generous
DEFAULT_RECEIVE_S = 10.0
DEFAULT_MIN_RECEIVE_RATE = 1024  # bytes/s: any real link does better; a trickle does not
DEFAULT_WRITE_S = 30.0
MAX_INTERVAL_S = 1.0
def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number of seconds >= 0 (0 turns it off), got {value!r}",
                          key=name, value=repr(value))
    return float(value)


@dataclass(frozen=True)
class Timeouts:
    idle_s: float = DEFAULT_IDLE_S
    receive_s: float = DEFAULT_RECEIVE_S
    min_receive_rate: int = DEFAULT_MIN_RECEIVE_RATE
    write_s: float = DEFAULT_WRITE_S

    @classmethod
    def checked(cls, idle_s: Any, receive_s: Any, min_receive_rate: Any, write_s: Any) -> Timeouts:
        if type(min_receive_rate) is not int or min_receive_rate < 0:
            raise ConfigError(f"min_receive_rate must be a whole number of bytes per second >= 0 (0 turns the "
                              f"check off), got {min_receive_rate!r}", key="min_receive_rate", value=repr(min_receive_rate))
        return cls(_seconds("idle_timeout_s", idle_s), _seconds("receive_timeout_s", receive_s), min_receive_rate,
                   _seconds("write_timeout_s", write_s))

    @property
    def interval(self) -> float:
        """How often the reaper looks: a quarter of the shortest timeout that is on, at most 1 s."""
        on = [t for t in (self.idle_s, self.receive_s, self.write_s) if t > 0]
        return min([MAX_INTERVAL_S] + [max(0.01, t / 4) for t in on])


class _State:
    """What the reaper remembers of one connection between looks."""

    __slots__ = ("frames", "active_at", "window_at", "window_bytes", "write_at", "write_low")

    def __init__(self, conn: Peer, now: float) -> None:
        self.frames = conn.frames_read
        self.active_at = conn.connected_at if not conn.frames_read else now
        self.window_at: float | None = None  # the receive-rate window's start, while a frame arrives
        self.window_bytes = 0
        self.write_at: float | None = None  # when the send buffer last went down
        self.write_low = 0


class Connections(Protocol):
    """What the reaper uses of the connection tracker (tracker.py), which owns the reaper."""

    connections: set[Peer]
    lingering: set[Peer]
    max_connections: int
    server_max_connections: int
    log: RateLimitedLog
    refused: Callable[[str], None]


class Reaper:
    def __init__(self, tracker: Connections, timeouts: Timeouts) -> None:
        self.tracker = tracker
        self.timeouts = timeouts
        self._states: dict[Any, _State] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = loop.call_later(self.timeouts.interval, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        try:
            self.scan(time.monotonic())
            self.tracker.log.flush()
        finally:
            if self._loop is not None and self._timer is not None:
                self._timer = self._loop.call_later(self.timeouts.interval, self._tick)

    def scan(self, now: float) -> None:
        old = self._states
        self._states = states = {}
        for conn in list(self.tracker.connections) + list(self.tracker.lingering):
            state = old.get(conn)
            if state is None:
                state = _State(conn, now)
            states[conn] = state
            if not conn.closing:
                self._look(conn, state, now)
            elif self.timeouts.write_s:  # closed for requests, still flushing answers: those may stall too
                self._check_write(conn, state, now)

    def _look(self, conn: Peer, state: _State, now: float) -> None:
        t = self.timeouts
        if conn.frames_read != state.frames or conn.in_flight or conn.backlogged:
            state.frames, state.active_at = conn.frames_read, now
        partial = conn.partial_frame
        if t.idle_s and not partial and not conn.write_buffer_size and now - state.active_at >= t.idle_s:
            self.tracker.log.warning("idle", "closing connection from %s: no request for %.0f s (--idle-timeout)",
                                     conn.peer, now - state.active_at)
            conn.close_with(None)
            return
        if t.receive_s and t.min_receive_rate and self._too_slow(conn, state, partial, now):
            return
        if t.write_s:
            self._check_write(conn, state, now)

    def _too_slow(self, conn: Peer, state: _State, partial: bool, now: float) -> bool:
        t = self.timeouts
        if not partial or conn.reading_paused:  # no frame arriving, or the server is the one waiting
            state.window_at = None
            return False
        received = conn.received_bytes
        if state.window_at is None:
            state.window_at, state.window_bytes = now, received
            return False
        elapsed = now - state.window_at
        if elapsed < t.receive_s:
            return False
        got = received - state.window_bytes
        if got >= t.min_receive_rate * elapsed:
            state.window_at, state.window_bytes = now, received
            return False
        error = ProtocolError(
            f"a frame is arriving too slowly: {got} bytes in the last {elapsed:.1f} s, under the server's minimum "
            f"of {t.min_receive_rate} bytes/s (--min-receive-rate); send each frame at once",
            received=got, seconds=round(elapsed, 3), min_receive_rate=t.min_receive_rate,
        )
        self.tracker.log.warning("slow_frame", "closing connection from %s: %s", conn.peer, error.message)
        self.tracker.refused("protocol_error")
        conn.close_with(error)
        return True

    def _check_write(self, conn: Peer, state: _State, now: float) -> None:
        size = conn.write_buffer_size
        if not size:
            state.write_at = None
        elif state.write_at is None or size < state.write_low:
            state.write_at, state.write_low = now, size
        elif now - state.write_at >= self.timeouts.write_s:
            self.tracker.log.warning("write_timeout", "aborting connection from %s: %d bytes of answers unread for "
                                     "%.0f s (--write-timeout)", conn.peer, size, now - state.write_at)
            conn.abort()

    def make_room(self, newcomer: Any) -> bool:
        """At the connection limit: close the connection idle the longest; False when none is."""
        victim = self.idle_victim()
        if victim is None:
            return False
        limit = self.tracker.server_max_connections
        self.tracker.log.warning("connection_limit", "closing idle connection from %s: --max-connections %d "
                                 "reached and %s connected", victim.peer, limit, newcomer)
        self.tracker.refused("connection_limit")
        victim.close_with(ResourceExhaustedError(
            f"closed: this connection was the longest idle when the server reached --max-connections {limit}; "
            "reconnect when you need it", max_connections=limit,
        ))
        return True

    def idle_victim(self) -> Peer | None:
        """The connection idle the longest (nothing in flight, half received or unsent), or None."""
        best, best_at = None, math.inf
        for conn in self.tracker.connections:
            if conn.closing or conn.in_flight or conn.backlogged or conn.partial_frame or conn.write_buffer_size:
                continue
            state = self._states.get(conn)
            if state is None:
                since = conn.connected_at  # connected since the last look, silent so far
            elif conn.frames_read != state.frames:
                continue  # active since the last look: not idle
            else:
                since = state.active_at
            if since < best_at:
                best, best_at = conn, since
        return best
