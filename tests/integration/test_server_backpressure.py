"""Backpressure: the in-flight limit per connection and a slow reader never grow server memory."""
from __future__ import annotations

import select
import socket
import threading
import time

import pytest
from trtserve_client.frames import FrameDecoder, pack

from .conftest import HOST, assert_serving

pytestmark = pytest.mark.timeout(60)


def connection_state(handle) -> list[tuple[int, int, bool, int]]:
    """(in flight, backlogged, reading paused, write buffer) of every connection, read on the loop."""
    tracker = handle.server.tracker
    return handle.call(lambda: [(c.in_flight, c.backlogged, c.reading_paused, c.write_buffer_size) for c in tracker.connections])


def wait_for(predicate, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "condition never became true"
        time.sleep(0.005)


def test_in_flight_limit_stops_reading(server_factory, gates):
    handle = server_factory(max_in_flight_per_connection=2)
    gate = gates["gate_wide"]  # 4 instances: without the limit all 4 requests would start
    with handle.connect() as conn:
        # One write: the four frames arrive together, so the two over the limit are read and
        # backlogged before reading pauses (separate writes could leave them in the socket).
        ids = [1, 2, 3, 4]
        conn.send_bytes(b"".join(
            pack({"v": 2, "id": i, "op": "infer", "model": "gate_wide", "inputs": {"x": b"%d" % (i - 1)}})
            for i in ids))
        gate.wait_started(2)
        wait_for(lambda: connection_state(handle) == [(2, 2, True, 0)])
        assert sum(gate.started()) == 2
        gate.open()
        answers = conn.recv_many(4)
        assert sorted(answers) == ids
        assert [answers[i]["result"]["outputs"]["output"] for i in ids] == [b"0", b"1", b"2", b"3"]
        assert conn.result("live") == {"live": True}
        assert connection_state(handle) == [(0, 0, False, 0)]


def test_slow_reader_is_not_buffered_without_bound(server_factory):
    """A client that sends big requests and never reads: the server stops reading it, and its
    memory for that client stays bounded by the in-flight limit, while others are served."""
    handle = server_factory(max_in_flight_per_connection=4)
    size, cap = 256 * 1024, 400  # the cap (100 MiB) is what an unbounded server would swallow
    payload = b"\x07" * size

    def frame(i: int) -> bytes:
        return pack({"v": 2, "id": i + 1, "op": "infer", "model": "echo", "inputs": {"x": payload}})

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.connect((HOST, handle.port))
        sock.setblocking(False)
        sent_frames, offset, current = 0, 0, frame(0)
        while sent_frames < cap:
            try:
                offset += sock.send(memoryview(current)[offset:])
            except BlockingIOError:
                if not select.select([], [sock], [], 0.5)[1]:
                    break  # the server has not read for half a second: it stopped reading us
                continue
            if offset == len(current):
                sent_frames, offset, current = sent_frames + 1, 0, frame(sent_frames + 1)
        assert sent_frames < cap // 2, f"the server kept reading a client that never reads ({sent_frames} frames)"
        (state,) = connection_state(handle)
        in_flight, backlogged, paused, buffered = state
        assert paused and in_flight <= 4
        assert buffered <= 8 * size, f"{buffered} bytes of responses buffered for one slow client"
        assert_serving(handle.host, handle.port)  # everyone else is still served

        begun = sent_frames + (offset > 0)
        answers: dict[int, int] = {}

        def read_all() -> None:
            decoder = FrameDecoder(1 << 30)
            while len(answers) < begun:
                select.select([sock], [], [], 10)
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    return
                for message in decoder.feed(data):
                    answers[message["id"]] = len(message["result"]["outputs"]["output"])

        reader = threading.Thread(target=read_all)
        reader.start()
        if offset:
            sock.setblocking(True)
            sock.sendall(memoryview(current)[offset:])
        reader.join(30)
        assert answers == {i + 1: size for i in range(begun)}
