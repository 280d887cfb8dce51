"""Bad input of every kind gets a typed error, and the server keeps serving everyone else."""
from __future__ import annotations

import socket
import struct
import time

import msgpack
import numpy as np
import pytest
from trtserve_client.frames import pack
from trtserve_client.wire import OPERATIONS

from .conftest import assert_serving, tensor

pytestmark = pytest.mark.timeout(60)

ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def wait_for(predicate, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "condition never became true"
        time.sleep(0.005)


# --------------------------------------------------------------------------- names and fields


@pytest.mark.parametrize(
    "op, fields, name, details",
    [
        ("infer", {"model": "nope", "inputs": {"x": b""}}, "MODEL_NOT_FOUND", {"model": "nope"}),
        ("model_metadata", {"model": "nope"}, "MODEL_NOT_FOUND", {"model": "nope"}),
        ("ready", {"model": "nope"}, "MODEL_NOT_FOUND", {"model": "nope"}),
        ("infer", {"model": "identity", "version": 1, "inputs": {"input": tensor(ROWS)}}, "VERSION_NOT_FOUND", {"version": 1, "served": [2]}),
        ("model_metadata", {"model": "identity", "version": 7}, "VERSION_NOT_FOUND", {"version": 7}),
        ("infer", {"model": "broken", "inputs": {"x": b""}}, "MODEL_UNAVAILABLE", {"state": "UNAVAILABLE"}),
        ("model_config", {"model": "broken"}, "MODEL_UNAVAILABLE", {"model": "broken"}),
        ("infr", {}, "UNKNOWN_OPERATION", {"operation": "infr", "operations": list(OPERATIONS)}),
    ],
)
def test_unknown_names(server, op, fields, name, details):
    with server.connect() as conn:
        error = conn.error(op, **fields)
        assert error["name"] == name, error
        assert details.items() <= error["details"].items(), error
        assert conn.result("live") == {"live": True}  # same connection still usable
    assert_serving(server.host, server.port)


@pytest.mark.parametrize(
    "op, fields, field",
    [
        ("infer", {"inputs": {"x": b""}}, "model"),
        ("infer", {"model": 3, "inputs": {"x": b""}}, "model"),
        ("infer", {"model": "echo", "version": "2", "inputs": {"x": b""}}, "version"),
        ("infer", {"model": "echo", "version": 0, "inputs": {"x": b""}}, "version"),
        ("infer", {"model": "echo"}, "inputs"),
        ("infer", {"model": "echo", "inputs": {}}, "inputs"),
        ("infer", {"model": "echo", "inputs": [b"x"]}, "inputs"),
        ("infer", {"model": "echo", "inputs": {"x": b""}, "outputs": "output"}, "outputs"),
        ("infer", {"model": "echo", "inputs": {"x": b""}, "timeout_ms": 0}, "timeout_ms"),
        ("infer", {"model": "echo", "inputs": {"x": b""}, "timeout_ms": "5"}, "timeout_ms"),
        ("infer", {"model": "echo", "inputs": {"x": b""}, "priority": -1}, "priority"),
        ("model_metadata", {}, "model"),
        ("statistics", {"model": ["identity"]}, "model"),
        ("ready", {"model": "identity", "version": True}, "version"),
    ],
)
def test_bad_fields_name_the_field(server, op, fields, field):
    with server.connect() as conn:
        error = conn.error(op, **fields)
        assert error["name"] == "INVALID_ARGUMENT", error
        assert error["details"]["field"] == field
        assert field in error["message"]
    assert_serving(server.host, server.port)


@pytest.mark.parametrize("op", [17, ["infer"], None])
def test_op_must_be_a_string(server, op):
    with server.connect() as conn:
        conn.send({"v": 2, "id": 5, "op": op})
        message = conn.recv()
        assert message["id"] == 5 and message["error"]["name"] == "INVALID_ARGUMENT"
        assert message["error"]["details"]["field"] == "op"


def test_unknown_output_name(server):
    with server.connect() as conn:
        declared = conn.error("infer", model="identity", inputs={"input": tensor(ROWS)}, outputs=["logits"])
        assert declared["name"] == "INVALID_ARGUMENT" and declared["details"]["expected"] == ["output"]
        undeclared = conn.error("infer", model="echo", inputs={"x": b"1"}, outputs=["logits"])
        assert undeclared["name"] == "INVALID_ARGUMENT" and undeclared["details"]["expected"] == ["output"]


# --------------------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    "model, inputs, details",
    [
        ("identity", {"image": tensor(ROWS)}, {"input": "image", "expected": ["input"]}),
        ("pair", {"a": tensor(np.zeros(2, np.float32))}, {"missing": ["b"], "expected": ["a", "b"]}),
        ("identity", {"input": tensor(ROWS.astype(np.int32))}, {"expected_dtype": "float32", "dtype": "int32"}),
        ("identity", {"input": tensor(np.zeros((2, 3), np.float32))}, {"expected_shape": [-1, 4], "shape": [2, 3]}),
        ("identity", {"input": tensor(np.zeros(4, np.float32))}, {"expected_shape": [-1, 4], "shape": [4]}),
        ("identity", {"input": b"\x00" * 16}, {"expected_dtype": "float32", "dtype": "bytes"}),
        ("blob", {"blob": tensor(np.zeros(3, np.uint8))}, {"expected_dtype": "bytes", "dtype": "uint8"}),
        ("identity", {"input": {"dtype": "float32", "shape": [2, 4], "data": b"\x00" * 5}}, {"where": "inputs['input']"}),
        ("echo", {"x": {"dtype": "complex64", "shape": [1], "data": b"\x00" * 8}}, {"where": "inputs['x']"}),
        ("echo", {"x": "a str is not a value"}, {}),
        ("identity", {"input": tensor(np.zeros((9, 4), np.float32))}, {"request_size": 9, "max": 8}),
    ],
)
def test_invalid_inputs(server, model, inputs, details):
    with server.connect() as conn:
        error = conn.error("infer", model=model, inputs=inputs)
        assert error["name"] == "INVALID_INPUT", error
        assert details.items() <= error["details"].items(), error
        assert conn.result("live") == {"live": True}
    assert_serving(server.host, server.port)


@pytest.mark.parametrize("data, name", [(b"raise", "BACKEND_ERROR"), (b"skip", "NO_RESULT"), (b"text", "BACKEND_ERROR")])
def test_backend_failures(server, data, name):
    with server.connect() as conn:
        assert conn.error("infer", model="flaky", inputs={"x": data})["name"] == name
        assert conn.result("infer", model="flaky", inputs={"x": b"fine"})["outputs"] == {"output": b"fine"}
    assert_serving(server.host, server.port)


# --------------------------------------------------------------------------- protocol


def test_unsupported_protocol_version_keeps_the_connection(server):
    with server.connect() as conn:
        conn.send({"v": 3, "id": 1, "op": "live"})
        message = conn.recv()
        assert message["id"] == 1 and message["error"]["name"] == "UNSUPPORTED_PROTOCOL"
        assert message["error"]["details"] == {"version": 3, "supported": [2]}
        conn.send({"id": 2, "op": "live"})
        missing = conn.recv()
        assert missing["id"] == 2 and missing["error"]["details"]["field"] == "v"
        assert conn.result("live") == {"live": True}


def expect_fatal(conn, name: str) -> dict:
    """The server answers with id nil and closes this connection."""
    message = conn.recv()
    assert message["id"] is None and message["error"]["name"] == name, message
    conn.assert_closed()
    return message["error"]


def test_oversized_frame(server_factory):
    handle = server_factory(max_frame=1024)
    with handle.connect() as conn:
        conn.send_bytes(struct.pack(">I", 2048) + b"\x00" * 100)
        error = expect_fatal(conn, "FRAME_TOO_LARGE")
        assert error["details"] == {"length": 2048, "max_frame": 1024}
    with handle.connect() as conn:  # a frame just at the limit is fine
        filler = b"\x00" * 960
        message = {"v": 2, "id": 1, "op": "infer", "model": "echo", "inputs": {"x": filler}}
        assert len(pack(message)) - 4 <= 1024
        conn.send(message)
        assert conn.recv()["result"]["outputs"]["output"] == filler
    assert_serving(handle.host, handle.port)


@pytest.mark.parametrize(
    "data, name",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "FRAME_TOO_LARGE"),  # "GET " read as a length
        (frame(b"\xc1\xc1\xc1"), "PROTOCOL_ERROR"),  # 0xc1 is never valid msgpack
        (frame(msgpack.packb([1, 2, 3])), "PROTOCOL_ERROR"),  # not a map
        (frame(b""), "PROTOCOL_ERROR"),  # empty payload
        (frame(msgpack.packb({"id": 1}) + b"\x01"), "PROTOCOL_ERROR"),  # trailing bytes
    ],
)
def test_garbage_closes_only_that_connection(server, data, name):
    with server.connect() as bystander, server.connect() as conn:
        assert bystander.result("live") == {"live": True}
        conn.send_bytes(data)
        expect_fatal(conn, name)
        assert bystander.result("ready") == {"ready": True}
    assert_serving(server.host, server.port)


@pytest.mark.parametrize("req_id", [None, -1, "7", True, 1.5])
def test_bad_id_closes_the_connection(server, req_id):
    with server.connect() as conn:
        message = {"v": 2, "op": "live"}
        if req_id is not None:
            message["id"] = req_id
        conn.send(message)
        assert expect_fatal(conn, "INVALID_ARGUMENT")["details"]["field"] == "id"
    assert_serving(server.host, server.port)


def test_duplicate_id_in_flight(server, gates):
    with server.connect() as conn:
        conn.request("infer", id=9, model="gate", inputs={"x": b"held"})
        gates["gate"].wait_started(1)
        conn.request("live", id=9)
        assert expect_fatal(conn, "INVALID_ARGUMENT")["details"] == {"field": "id", "value": 9}
    gates["gate"].open()
    assert_serving(server.host, server.port)


def test_truncated_frame_at_eof(server):
    with server.connect() as conn:
        conn.send_bytes(struct.pack(">I", 100) + b"\x81" * 10)
        conn.sock.shutdown(socket.SHUT_WR)
        assert expect_fatal(conn, "PROTOCOL_ERROR")["details"] == {"buffered": 14}
    assert_serving(server.host, server.port)


# --------------------------------------------------------------------------- work in flight


def test_disconnect_with_requests_in_flight(server, gates):
    """A client that drops the connection: its queued requests never run, nothing stays in flight."""
    gate = gates["gate_wide"]
    before = gate_wide_counts(server)
    conn = server.connect()
    for i in range(6):
        conn.request("infer", model="gate_wide", inputs={"x": b"%d" % i})
    gate.wait_started(4)  # 4 instances busy, 2 requests queued
    assert conn.result("live") == {"live": True}  # every request before it was read
    conn.abort()
    tracker = server.server.tracker
    wait_for(lambda: server.call(lambda: (tracker.in_flight, len(tracker.connections))) == (0, 0))
    gate.open()
    with server.connect() as conn:
        assert conn.result("infer", model="gate_wide", inputs={"x": b"after"})["outputs"] == {"output": b"after"}
    assert sum(gate.started()) == 5  # the 4 that were running, then this one; never the 2 queued
    # The 4 that ran count as successes (their answers had nowhere to go), once their
    # instances have run the callbacks; the 2 dropped from the queue count as CONNECTION_ERROR.
    wait_for(lambda: gate_wide_counts(server)[0] - before[0] == 5)
    success, failures = gate_wide_counts(server)
    assert failures.get("CONNECTION_ERROR", 0) - before[1].get("CONNECTION_ERROR", 0) == 2, failures
    assert_serving(server.host, server.port)


def gate_wide_counts(server) -> tuple[int, dict[str, int]]:
    with server.connect() as conn:
        stats = conn.result("statistics", model="gate_wide")["models"][0]
    return stats["success_count"], stats["failure_by_reason"]


def test_closed_client_with_requests_in_flight(server, gates):
    """A plain close reads as a half-close: the answers are written, the peer resets, all is released."""
    gate = gates["gate_wide"]
    conn = server.connect()
    for i in range(3):
        conn.request("infer", model="gate_wide", inputs={"x": b"%d" % i})
    gate.wait_started(3)
    conn.close()
    gate.open()
    tracker = server.server.tracker
    wait_for(lambda: server.call(lambda: (tracker.in_flight, len(tracker.connections))) == (0, 0))
    assert_serving(server.host, server.port)


def test_queue_full(server, gates):
    gate = gates["gate"]  # one instance, max_queue_size = 1
    with server.connect() as conn:
        running = conn.request("infer", model="gate", inputs={"x": b"a"})
        gate.wait_started(1)
        queued = conn.request("infer", model="gate", inputs={"x": b"b"})
        refused = conn.request("infer", model="gate", inputs={"x": b"c"})
        first = conn.recv()
        assert first["id"] == refused and first["error"]["name"] == "QUEUE_FULL", first
        assert first["error"]["details"]["max_queue_size"] == 1
        gate.open()
        answers = conn.recv_many(2)
        assert answers[running]["result"]["outputs"] == {"output": b"a"}
        assert answers[queued]["result"]["outputs"] == {"output": b"b"}
        stats = conn.result("statistics", model="gate")["models"][0]
        assert stats["failure_by_reason"] == {"QUEUE_FULL": 1} and stats["success_count"] == 2
    assert_serving(server.host, server.port)


def test_deadline_exceeded_running_and_queued(server, gates):
    gate = gates["gate"]
    with server.connect() as conn:
        start = time.monotonic()
        running = conn.request("infer", model="gate", inputs={"x": b"a"}, timeout_ms=200)
        gate.wait_started(1)
        queued = conn.request("infer", model="gate", inputs={"x": b"b"}, timeout_ms=50)
        answers = conn.recv_many(2)
        assert time.monotonic() - start < 5  # answered on time, though the gate is still closed
        assert answers[running]["error"]["name"] == "DEADLINE_EXCEEDED"  # the loop-side guard
        assert answers[queued]["error"]["name"] == "DEADLINE_EXCEEDED"  # dropped from the queue
        gate.open()
        after = conn.request("infer", model="gate", inputs={"x": b"c"})
        message = conn.recv()  # the late result of `running` was dropped, not sent
        assert message["id"] == after and message["result"]["outputs"] == {"output": b"c"}
    assert sorted(gate.started()) == [1, 1]  # `running` and `after`; `queued` never ran
    assert_serving(server.host, server.port)


def test_model_control_refused_without_the_flag(server_factory):
    handle = server_factory()  # model_control defaults to none
    with handle.connect() as conn:
        for op in ("load", "unload"):
            error = conn.error(op, model="echo")
            assert error["name"] == "PERMISSION_DENIED" and error["details"] == {"operation": op}
            assert "--model-control explicit" in error["message"]
        assert conn.result("ready", model="echo") == {"ready": True}
    assert_serving(handle.host, handle.port)


def test_a_version_1_client_is_told_in_its_own_layout_and_keeps_the_connection(server):
    """A client of protocol version 1 sends ``[length][msgpack map]``: it gets
    UNSUPPORTED_PROTOCOL for each request, in that layout so it can read it, and nothing else
    on the connection breaks."""
    import msgpack

    with server.connect() as conn:
        for req_id in (1, 2):
            payload = msgpack.packb({"v": 1, "id": req_id, "op": "live"})
            conn.send_bytes(len(payload).to_bytes(4, "big") + payload)
            length = int.from_bytes(recv_exactly(conn.sock, 4), "big")
            answer = msgpack.unpackb(recv_exactly(conn.sock, length), raw=False)
            assert answer["id"] == req_id and answer["error"]["name"] == "UNSUPPORTED_PROTOCOL", answer
            assert answer["error"]["details"]["supported"] == [2]
        assert conn.result("live") == {"live": True}  # the same connection, now in version 2


def recv_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


@pytest.mark.parametrize("case", ["past-the-end", "overlap", "disagrees-with-shape"])
def test_bad_buffer_references_are_invalid_input_and_the_connection_goes_on(server, case):
    import struct

    import msgpack

    def ref(offset, length):
        return msgpack.ExtType(1, struct.pack(">QQ", offset, length))

    inputs = {
        "past-the-end": {"x": {"dtype": "uint8", "shape": [100], "data": ref(0, 100)}},
        "overlap": {"x": {"dtype": "uint8", "shape": [40], "data": ref(0, 40)}, "y": ref(32, 8)},
        "disagrees-with-shape": {"x": {"dtype": "float32", "shape": [4], "data": ref(0, 12)}},
    }[case]
    body = msgpack.packb({"v": 2, "id": 7, "op": "infer", "model": "echo", "inputs": inputs}, use_bin_type=True)
    start = (12 + len(body) + 63) // 64 * 64
    frame = struct.pack(">IBBHI", start + 64 - 4, 0xC1, 2, 0, len(body)) + body + bytes(start - 12 - len(body)) + bytes(64)
    with server.connect() as conn:
        conn.send_bytes(frame)
        message = conn.recv()
        assert message["id"] == 7 and message["error"]["name"] == "INVALID_INPUT", message
        assert conn.result("live") == {"live": True}
