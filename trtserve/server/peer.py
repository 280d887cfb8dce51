"""A connection as the connection tracker, the reaper and the server's shutdown see it.

ServerProtocol (protocol.py) is the one implementation; naming only what these callers use
keeps tracker.py and reaper.py from depending on the protocol module, which depends on them.
"""
from __future__ import annotations

from typing import Any, Protocol

from ..errors import TrtserveError


class Peer(Protocol):
    peer: Any  # the remote address, as the transport reports it
    connected_at: float  # time.monotonic() at accept
    frames_read: int
    received_bytes: int

    @property
    def in_flight(self) -> int: ...  # requests read and not yet answered

    @property
    def backlogged(self) -> int: ...  # requests read and not yet dispatched

    @property
    def reading_paused(self) -> bool: ...

    @property
    def write_buffer_size(self) -> int: ...  # answers written and not yet sent

    @property
    def closing(self) -> bool: ...

    @property
    def partial_frame(self) -> bool: ...  # bytes of an unfinished frame are held

    def close_with(self, error: TrtserveError | None = None) -> None: ...  # a clean close
    def stop_reading(self) -> None: ...  # shutdown begins
    def shut_down(self, error: TrtserveError) -> None: ...  # answer what is left with error, close
    def abort(self) -> None: ...  # drop without flushing
