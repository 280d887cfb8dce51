"""CoalescingWriter on real sockets: a write while nothing is queued goes out through
os.writev (GIL released) as far as the socket takes it and the rest through the transport,
in order, whole; small writes too."""
from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
import uvloop
from trtserve_client import writer as writer_module
from trtserve_client.writer import CoalescingWriter


async def _write_then_read(frames: list[list[bytes | memoryview]], expected: int) -> tuple[bytes, list[int]]:
    """Write ``frames`` through a writer on one end of a socket pair while nobody reads (the
    kernel's buffer fills), then read everything at the other end."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    theirs.setblocking(False)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    writer = CoalescingWriter(transport, loop)
    queued = []
    for parts in frames:
        writer.write(parts, alone=True)
        queued.append(transport.get_write_buffer_size())
    received = bytearray()
    while len(received) < expected:
        try:
            chunk = await loop.sock_recv(theirs, 1 << 20)
        except BlockingIOError:
            continue
        assert chunk, "the writer's end closed early"
        received += chunk
    transport.close()
    theirs.close()
    return bytes(received), queued


def _record_direct_writes(monkeypatch, what) -> list:
    """Calls to ``_write_direct`` (each recorded as ``what(fd, parts)``), still writing."""
    direct: list = []
    real = writer_module._write_direct
    monkeypatch.setattr(writer_module, "_write_direct", lambda fd, parts: direct.append(what(fd, parts)) or real(fd, parts))
    return direct


def _run_frames(loop_factory, frames, expected: int):
    loop = loop_factory()
    try:
        return loop.run_until_complete(_write_then_read(frames, expected))
    finally:
        loop.close()


@pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])
def test_large_frames_arrive_whole_and_in_order(loop_factory, monkeypatch):
    direct = _record_direct_writes(monkeypatch, lambda fd, parts: fd)
    rng = np.random.default_rng(0)
    big = [rng.bytes(3 << 20), memoryview(rng.bytes(1 << 20))]   # far more than the socket buffers hold
    small = [b"head", rng.bytes(100)]
    frames = [[b"H1", *big], small, [b"H2", big[1]]]
    expected = b"".join(bytes(p) for parts in frames for p in parts)
    received, queued = _run_frames(loop_factory, frames, len(expected))
    assert received == expected
    assert len(direct) == 1, "only the first large frame, written while nothing was queued, goes direct"
    assert queued[0] > 0, "what the socket did not take went to the transport"


@pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"])
def test_small_frames_go_out_directly_while_nothing_is_queued(loop_factory, monkeypatch):
    direct = _record_direct_writes(monkeypatch, lambda fd, parts: len(parts))
    frames = [[b"head", b"x" * 100], [b"h2", b"y" * 10, b"z" * 20]]
    expected = b"".join(p for parts in frames for p in parts)
    received, queued = _run_frames(loop_factory, frames, len(expected))
    assert received == expected
    assert direct == [1, 1], "each frame, its small pieces joined, left through os.writev"
    assert queued == [0, 0], "the socket took all of it: nothing went to the transport"
