"""Hostile clients, run as a process of their own beside the server (tests/integration/
test_hostile_*.py): a normal client measured in the test process must not share a GIL with
the attack.  Each attack writes one JSON line to stdout once it is in place (``ready``),
then holds its sockets until stdin closes (the test ends it), and writes a last JSON line
with what it saw.

    python hostile_clients.py ATTACK HOST PORT [ARG ...]

Only 127.0.0.1 is ever attacked; every count and size comes from the test.
"""
from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from trtserve_client.frames import HEAD, MARKER, pack

HOST = "127.0.0.1"


def report(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def wait_for_stdin_close() -> None:
    sys.stdin.read()


def connect(port: int, timeout: float = 10.0) -> socket.socket | None:
    try:
        return socket.create_connection((HOST, port), timeout=timeout)
    except OSError:
        return None


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed ``sock`` (EOF or reset), without blocking."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def send_for(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Send as much of ``data`` as the server reads within ``seconds``; the bytes sent."""
    sock.setblocking(False)
    view, sent, give_up = memoryview(data), 0, time.monotonic() + seconds
    try:
        while sent < len(view) and time.monotonic() < give_up:
            try:
                sent += sock.send(view[sent : sent + (1 << 20)])
            except BlockingIOError:
                time.sleep(0.005)
    except OSError:
        pass
    finally:
        sock.setblocking(True)
    return sent


def frame_head(length: int, map_length: int) -> bytes:
    return HEAD.pack(length, MARKER, 2, 0, map_length)


# --------------------------------------------------------------------------- attacks


def stall_frames(port: int, conns: str, size: str, seconds: str = "10") -> None:
    """``conns`` connections each send ``size`` bytes of a ``size + 1``-byte frame, then stall."""
    socks = [s for s in (connect(port) for _ in range(int(conns))) if s is not None]
    total = int(size)
    payload = frame_head(total - 4 + 1, 1) + b"\x80" + bytes(total - 13)  # one byte short, forever
    sent = [0] * len(socks)

    def push(i: int) -> None:
        sent[i] = send_for(socks[i], payload, float(seconds))

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(socks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report(ready=True, connections=len(socks), sent=sent)
    wait_for_stdin_close()
    report(closed=sum(closed_by_server(s) for s in socks))


def idle(port: int, conns: str) -> None:
    """Open ``conns`` connections and send nothing."""
    socks = [connect(port, 2.0) for _ in range(int(conns))]
    report(ready=True, opened=sum(s is not None for s in socks))
    wait_for_stdin_close()
    report(closed=sum(closed_by_server(s) for s in socks if s is not None))


def trickle(port: int, conns: str) -> None:
    """``conns`` connections each start a 1 KiB frame and send it one byte a second."""
    socks = [s for s in (connect(port) for _ in range(int(conns))) if s is not None]
    frame = pack({"v": 2, "id": 1, "op": "live", "pad": b"x" * 1000})
    report(ready=True, connections=len(socks))
    stop = threading.Event()
    threading.Thread(target=lambda: (wait_for_stdin_close(), stop.set()), daemon=True).start()
    position = 0
    while not stop.wait(1.0) and position < len(frame):
        for sock in socks:
            try:
                sock.send(frame[position : position + 1])
            except OSError:
                pass
        position += 1
    report(closed=sum(closed_by_server(s) for s in socks), bytes_each=position)


def no_read(port: int, conns: str, size: str) -> None:
    """``conns`` connections each ask the ``blob`` model to echo ``size`` bytes, half-close,
    and never read the answer."""
    socks = [s for s in (connect(port) for _ in range(int(conns))) if s is not None]
    request = pack({"v": 2, "id": 1, "op": "infer", "model": "blob", "inputs": {"blob": _OutOfBand(int(size))}})
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # read nothing, hold little
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
    report(ready=True, connections=len(socks))
    wait_for_stdin_close()


def _OutOfBand(size: int) -> Any:  # noqa: N802 - reads as the value it builds
    from trtserve_client.frames import OutOfBand

    return OutOfBand(bytes(size))


def nil_frame(port: int, kind: str, size: str) -> None:
    """One frame of ``size`` bytes whose map holds, in an unknown field, an array of nils
    (``flat``) or many arrays of 60,000 nils (``nested``); reports the answer and its time."""
    sock = connect(port, 30.0)
    head = b"\x84\xa1v\x02\xa2id\x01\xa2op\xa4live\xa4junk"
    n = int(size) - 12 - len(head) - 5
    if kind == "flat":
        body = head + b"\xdd" + struct.pack(">I", n) + b"\xc0" * n
    else:
        inner = b"\xdc" + struct.pack(">H", 60000) + b"\xc0" * 60000
        count = n // len(inner)
        body = head + b"\xdd" + struct.pack(">I", count) + inner * count
    started = time.perf_counter()
    sock.sendall(frame_head(8 + len(body), len(body)) + body)
    answer = _read_frame(sock)
    report(ready=True, seconds=round(time.perf_counter() - started, 3), answer=answer)
    wait_for_stdin_close()


def bad_logins(port: int, conns: str) -> None:
    """``conns`` connections, one after another, each sending a wrong token."""
    refused = 0
    for i in range(int(conns)):
        sock = connect(port)
        if sock is None:
            continue
        sock.sendall(pack({"v": 2, "id": 1, "op": "auth", "token": f"wrong-token-{i:08d}"}))
        refused += "UNAUTHENTICATED" in json.dumps(_read_frame(sock))
        sock.close()
    report(ready=True, refused=refused)
    wait_for_stdin_close()


def _read_frame(sock: socket.socket) -> Any:
    from trtserve_client.frames import FrameDecoder

    decoder = FrameDecoder(1 << 30)
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return "EOF"
            frames = decoder.feed(data)
            if frames:
                return frames[0]
    except OSError as exc:
        return f"{type(exc).__name__}"


ATTACKS: dict[str, Callable[..., None]] = {
    "stall-frames": stall_frames,
    "idle": idle,
    "trickle": trickle,
    "no-read": no_read,
    "nil-frame": nil_frame,
    "bad-logins": bad_logins,
}

if __name__ == "__main__":
    attack, port, args = sys.argv[1], int(sys.argv[3]), sys.argv[4:]
    assert sys.argv[2] == HOST, "hostile clients only ever attack 127.0.0.1"
    ATTACKS[attack](port, *args)
