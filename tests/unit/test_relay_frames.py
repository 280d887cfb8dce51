"""A front door's frame relaying (scaleout/relay_frames.py): requests re-packed with a new id
and their buffers passed by reference, answers with their id swapped and every other byte
kept, for every msgpack width an id may take."""
from __future__ import annotations

import numpy as np
import pytest
from trtserve_client.frames import ALIGN, HEAD, HEAD_SIZE, OutOfBand, decode_frame, frame_parts, pack, pack_v1
from trtserve_client.wire import decode_value, encode_tensors, encode_value

from trtserve.scaleout.relay_frames import read_answer, request_parts, with_id

IDS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
SMALL = np.arange(16, dtype=np.float32).reshape(1, 16)  # travels inside the map
LARGE = np.arange(4096, dtype=np.float32).reshape(256, 16)  # travels out of band


def received(message: dict) -> dict:
    """``message`` as a receiver unpacks it: buffers are views of the received frame."""
    return decode_frame(memoryview(pack(message)))


def region_start(frame: bytes) -> int:
    map_end = HEAD_SIZE + HEAD.unpack_from(frame, 0)[4]
    return -(-map_end // ALIGN) * ALIGN


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["inline", "out-of-band"])
def test_a_request_is_packed_again_with_the_new_id_and_its_buffers_by_reference(data):
    message = received({"v": 2, "id": 7, "op": "infer", "model": "m", "priority": 1,
                        "inputs": {**encode_tensors({"x": data}), "raw": OutOfBand(bytes(range(256)) * 8)},
                        "unknown": [1, "kept"]})
    parts = request_parts(message, 2**40)
    relayed = decode_frame(memoryview(b"".join(parts)))
    assert relayed["id"] == 2**40
    assert {k: v for k, v in relayed.items() if k not in ("id", "inputs")} == \
           {k: v for k, v in message.items() if k not in ("id", "inputs")}
    np.testing.assert_array_equal(decode_value(relayed["inputs"]["x"], "x"), data)
    assert bytes(relayed["inputs"]["raw"]) == bytes(range(256)) * 8
    if data is LARGE:  # the received view itself is written, never a copy of it
        assert any(part is message["inputs"]["x"]["data"] or getattr(part, "obj", None) is
                   message["inputs"]["x"]["data"].obj for part in parts)
    assert message["id"] == 7 and type(message["inputs"]["raw"]) is memoryview  # the client's map is untouched


def test_a_resent_request_carries_the_time_left():
    message = received({"v": 2, "id": 1, "op": "infer", "model": "m", "timeout_ms": 500, "inputs": {}})
    assert decode_frame(memoryview(b"".join(request_parts(message, 2, timeout_ms=120.5))))["timeout_ms"] == 120.5


@pytest.mark.parametrize("old", IDS)
@pytest.mark.parametrize("new", [0, 200, 70000, 2**64 - 1])
@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["inline", "out-of-band"])
def test_an_answer_gets_the_client_id_and_keeps_every_other_byte(old, new, data):
    answer = {"id": old, "result": {"model": "m", "version": 1, "outputs": {"y": encode_value(data)}}}
    frame = memoryview(pack(answer))
    found = read_answer(frame)
    assert found is not None and found[0] == old and found[2] is False
    relayed = b"".join(with_id(frame, found[1], new))
    assert HEAD.unpack_from(relayed, 0)[0] == len(relayed) - 4
    decoded = decode_frame(memoryview(relayed))
    assert decoded["id"] == new
    assert decoded["result"]["model"] == "m" and decoded["result"]["version"] == 1
    np.testing.assert_array_equal(decode_value(decoded["result"]["outputs"]["y"], "y"), data)
    # The buffer region is the answer's own bytes, at a 64-byte boundary again.
    assert relayed[region_start(relayed):] == bytes(frame[region_start(bytes(frame)):])
    assert read_answer(memoryview(relayed))[:1] == (new,)


def test_an_error_answer_is_recognised_and_relayed_whole():
    error = {"code": 3, "name": "INVALID_INPUT", "message": "bad x", "details": {"input": "x"}}
    frame = memoryview(pack({"id": 300, "error": error}))
    found = read_answer(frame)
    assert found is not None and found[0] == 300 and found[2] is True
    assert decode_frame(memoryview(b"".join(with_id(frame, found[1], 5)))) == {"id": 5, "error": error}


@pytest.mark.parametrize("frame", [
    pack({"id": None, "error": {"code": 2, "name": "PROTOCOL_ERROR", "message": "x"}}),  # connection-level
    pack({"result": {}, "id": 1}),  # id not first
    pack({"id": -1, "result": {}}),  # not a uint
    pack({}),
    pack_v1({"id": 1, "result": {}}),  # another layout
    b"\x00\x00\x00\x08\xc1\x03\x00\x00\x00\x00\x00\x00",  # layout 3
], ids=["nil-id", "id-not-first", "negative", "empty", "v1", "layout-3"])
def test_what_is_not_an_id_first_answer_has_no_id(frame):
    assert read_answer(memoryview(frame)) is None


def test_frame_parts_writes_answers_id_first_as_servers_do():
    # server/protocol.py builds {"id": ..., "result" | "error": ...}; the relay reads that id.
    assert read_answer(memoryview(b"".join(frame_parts({"id": 9, "result": {"outputs": {}}})))) == (9, 17, False)
    assert read_answer(memoryview(pack({"id": 2**64 - 1, "error": {}})))[1:] == (25, True)
