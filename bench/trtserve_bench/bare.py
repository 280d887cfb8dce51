"""The transport's physical floor: a bare-socket echo, no msgpack, no asyncio.

A server thread per connection reads a 4-byte length and that many bytes with
``recv_into`` a preallocated buffer and sends them back; the client keeps ``concurrency``
frames of ``size`` bytes in flight on one connection (a sender and a receiver thread, so
neither side's socket buffer can fill up and deadlock them) and times each round trip.
What trtserve's echo server (bench/echo_server.py) reaches with the same request sizes
and client processes, against this, is the price of its framing:

    python -m trtserve_bench.bare serve --port 0          # prints "bare echo listening on HOST:PORT"
    python -m trtserve_bench.bare load --port P --size 602112 --concurrency 16 --seconds 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from collections import deque

LENGTH = struct.Struct(">I")


def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from the socket; False at EOF."""
    while view:
        n = sock.recv_into(view)
        if n == 0:
            return False
        view = view[n:]
    return True


def send_all(sock: socket.socket, parts: list[memoryview]) -> None:
    """``sendmsg`` the parts (no joining), resuming after partial sends."""
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts = parts[1:]
        if parts and sent:
            parts = [parts[0][sent:], *parts[1:]]


# --------------------------------------------------------------------------- server


def echo_connection(conn: socket.socket) -> None:
    head = memoryview(bytearray(LENGTH.size))
    body = memoryview(bytearray(1 << 20))
    with conn:
        while recv_exactly(conn, head):
            (length,) = LENGTH.unpack(head)
            if length > len(body):
                body = memoryview(bytearray(length))
            if not recv_exactly(conn, body[:length]):
                return
            send_all(conn, [head, body[:length]])


def serve(host: str, port: int) -> None:
    listener = socket.create_server((host, port))
    bound_host, bound_port = listener.getsockname()[:2]
    print(f"bare echo listening on {bound_host}:{bound_port}", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=echo_connection, args=(conn,), daemon=True).start()


# --------------------------------------------------------------------------- client


def load(host: str, port: int, size: int, concurrency: int, seconds: float, warmup_s: float = 0.5) -> dict:
    """Round trips of ``size``-byte frames, ``concurrency`` in flight, for ``seconds``."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = memoryview(LENGTH.pack(size))
    payload = memoryview(bytearray(range(256)) * (size // 256) + bytearray(size % 256))
    slots = threading.Semaphore(concurrency)
    sent: deque[int] = deque()
    stop = threading.Event()
    start = time.perf_counter_ns() + int(warmup_s * 1e9)
    end = start + int(seconds * 1e9)
    latencies: list[int] = []

    def sender() -> None:
        while not stop.is_set():
            slots.acquire()
            sent.append(time.perf_counter_ns())
            send_all(sock, [head, payload])

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    reply = memoryview(bytearray(LENGTH.size + size))

    def receive() -> tuple[int, int]:
        if not recv_exactly(sock, reply):
            raise ConnectionError("the bare echo server closed the connection")
        return sent.popleft(), time.perf_counter_ns()

    while not stop.is_set():
        began, now = receive()
        if start <= began and now <= end:
            latencies.append(now - began)
        if now > end:
            stop.set()
        slots.release()
    slots.release()  # a sender waiting for a slot sends once more, then sees the stop
    thread.join()
    while sent:  # what is still in flight
        receive()
    sock.close()
    return summary(latencies, seconds)


def summary(latencies: list[int], seconds: float) -> dict:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6 if ordered else float("nan")

    return {"throughput": len(ordered) / seconds, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "errors": 0,
            "stable": True, "requests": len(ordered)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("load")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--size", type=int, default=3 * 224 * 224 * 4)
    c.add_argument("--concurrency", type=int, default=16)
    c.add_argument("--seconds", type=float, default=2.0)
    c.add_argument("--warmup-s", type=float, default=0.5)
    c.add_argument("--json", help="write the result here (else print it)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.host, args.port)
        return
    result = load(args.host, args.port, args.size, args.concurrency, args.seconds, args.warmup_s)
    text = json.dumps(result)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text)
    else:
        print(text)


if __name__ == "__main__":
    sys.exit(main())
