"""Frames written in one event-loop turn leave in one ``transport.writelines``.

Under pipelining, one ``send()`` per frame would be the largest single cost on both sides of
the connection.  A frame written while nothing else is queued and the
caller says it is alone leaves at once, so a lone request or answer pays no extra latency.

A frame is a list of buffers (frames.frame_parts): its head and map, then tensor memory by
reference.  Small pieces are joined into one buffer (a copy of a few hundred bytes costs
less than an I/O vector each); large ones are handed to the transport as they are, which
writes them with ``writev`` or keeps a reference until it can, never a copy.  Server and
client both use this; it is the one place the policy lives.
"""
from __future__ import annotations

import asyncio
from typing import Any

#: Pieces below this size are joined with their neighbours before writing.
JOIN_BELOW = 16 * 1024


class CoalescingWriter:
    __slots__ = ("_transport", "_loop", "_parts")

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[Any] = []

    def write(self, parts: list[Any], alone: bool) -> None:
        if alone and not self._parts:
            self._write(parts)
            return
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts += parts

    def flush(self) -> None:
        """Write what is queued now (also before any close, so nothing queued is lost)."""
        if not self._parts:
            return
        parts, self._parts = self._parts, []
        self._write(parts)

    def _write(self, parts: list[Any]) -> None:
        if self._transport.is_closing():
            return
        if len(parts) == 1:
            self._transport.write(parts[0])
        else:
            self._transport.writelines(gather(parts))


def gather(parts: list[Any]) -> list[Any]:
    """``parts`` with each run of small pieces joined into one bytes; large ones untouched."""
    out: list[Any] = []
    small: list[Any] = []
    for part in parts:
        if len(part) < JOIN_BELOW:
            small.append(part)
            continue
        if small:
            out.append(small[0] if len(small) == 1 else b"".join(small))
            small = []
        out.append(part)
    if small:
        out.append(small[0] if len(small) == 1 else b"".join(small))
    return out
