"""Frames written in one event-loop turn leave in one ``transport.write``.

Under pipelining one ``send()`` per frame was the largest single cost on both sides of the
connection (docs/performance.md).  A frame written while nothing else is queued and the
caller says it is alone leaves at once, so a lone request or answer pays no extra latency.
Server and client both use this; it is the one place the policy lives.
"""
from __future__ import annotations

import asyncio


class CoalescingWriter:
    __slots__ = ("_transport", "_loop", "_frames")

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._frames: list[bytes] = []

    def write(self, frame: bytes, alone: bool) -> None:
        if alone and not self._frames:
            self._transport.write(frame)
            return
        if not self._frames:
            self._loop.call_soon(self.flush)
        self._frames.append(frame)

    def flush(self) -> None:
        """Write what is queued now (also before any close, so nothing queued is lost)."""
        if not self._frames:
            return
        frames, self._frames = self._frames, []
        if not self._transport.is_closing():
            self._transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
