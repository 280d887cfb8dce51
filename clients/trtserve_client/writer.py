"""Frames written in one event-loop turn leave in one ``transport.writelines``.

Under pipelining, one ``send()`` per frame would be the largest single cost on both sides of
the connection.  A frame written while nothing else is queued and the
caller says it is alone leaves at once, so a lone request or answer pays no extra latency.

A frame is a list of buffers (frames.frame_parts): its head and map, then tensor memory by
reference.  Small pieces are joined into one buffer (a copy of a few hundred bytes costs
less than an I/O vector each); large ones are handed to the transport as they are, which
writes them with ``writev`` or keeps a reference until it can, never a copy.  Server and
client both use this; it is the one place the policy lives.

Writes leave the GIL free.  uvloop's transports write with the GIL held, and a send wakes
the peer: on a busy host the kernel may switch to it right then, and a loop thread switched
out while it holds the GIL stops every other thread of the process (the server's other I/O
loops, the models' instance threads) until it runs again; with a model computing, that
costs the model far more than the write.  So when nothing is queued in the transport (order
is kept) a write goes out through ``os.writev`` on the socket, which releases the GIL around
the system call, large or small; whatever the kernel did not take then goes to the
transport, which sends it when the socket drains.  Plain TCP and Unix sockets only: a TLS
transport encrypts what it writes.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

#: Pieces below this size are joined with their neighbours before writing.
JOIN_BELOW = 16 * 1024
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


class CoalescingWriter:
    __slots__ = ("_transport", "_loop", "_parts", "_fd")

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[Any] = []
        self._fd = _plain_socket_fd(transport)  # -1: always through the transport

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
        transport = self._transport
        if transport.is_closing():
            return
        if len(parts) > 1:
            parts = gather(parts)
        if self._fd >= 0 and not transport.get_write_buffer_size():
            parts = _write_direct(self._fd, parts)
            if not parts:
                return
        if len(parts) == 1:
            transport.write(parts[0])
        else:
            transport.writelines(parts)


def _plain_socket_fd(transport: asyncio.BaseTransport) -> int:
    """The transport's socket, when bytes written to it go to the peer as they are."""
    if transport.get_extra_info("sslcontext") is not None or transport.get_extra_info("ssl_object") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None else -1
    except (AttributeError, OSError):
        return -1


def _write_direct(fd: int, parts: list[Any]) -> list[Any]:
    """``os.writev`` what the socket takes now (the GIL released meanwhile); returns the
    rest.  Any error leaves everything to the transport, which meets it too and reports it
    its own way."""
    try:
        sent = os.writev(fd, parts[:_IOV_MAX])
    except OSError:  # BlockingIOError (socket buffer full), a reset peer, ...
        return parts
    index = 0
    while index < len(parts) and sent >= len(parts[index]):
        sent -= len(parts[index])
        index += 1
    rest = parts[index:]
    if rest and sent:
        rest[0] = memoryview(rest[0])[sent:]
    return rest


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
