"""Frames of protocol version 2 (clients/trtserve_client/frames.py): the head, the map, the
buffer region, receiving into a frame's own buffer, and every way a frame can be wrong.

Pure: bytes in, messages or typed errors out, asserted by error code, never by text.
"""
from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtserve_client import frames, wire
from trtserve_client.errors import ErrorCode, FrameTooLargeError, ProtocolError

MAX = wire.DEFAULT_MAX_FRAME


def decoder(max_frame: int = MAX) -> frames.FrameDecoder:
    return frames.FrameDecoder(max_frame)


def roundtrip(message: dict) -> dict:
    [decoded] = decoder().feed(frames.pack(message))
    return decoded


def head(frame: bytes) -> tuple[int, int, int, int, int]:
    return frames.HEAD.unpack_from(frame, 0)


def ref(offset: int, length: int) -> msgpack.ExtType:
    return msgpack.ExtType(frames.BUFFER_EXT, struct.pack(">QQ", offset, length))


def handmade(message: dict, region: bytes, marker: int = 0xC1, layout: int = 2, reserved: int = 0) -> bytes:
    """A frame built from the spec's words, not from frames.py's sender."""
    body = msgpack.packb(message, use_bin_type=True)
    start = (12 + len(body) + 63) // 64 * 64
    pad = bytes(start - 12 - len(body))
    return struct.pack(">IBBHI", start + len(region) - 4, marker, layout, reserved, len(body)) + body + pad + region


def assert_code(excinfo: pytest.ExceptionInfo, code: ErrorCode) -> None:
    assert excinfo.value.code == code, excinfo.value


# --------------------------------------------------------------------------- the layout


def test_head_is_length_marker_layout_reserved_map_length_then_the_map():
    frame = frames.pack({"id": 7, "op": "live"})
    length, marker, layout, reserved, map_length = head(frame)
    assert (length, marker, layout, reserved) == (len(frame) - 4, 0xC1, 2, 0)
    assert msgpack.unpackb(frame[12 : 12 + map_length], raw=False) == {"id": 7, "op": "live"}
    assert len(frame) == 12 + map_length  # no out-of-band values: no region


def test_large_values_lie_in_the_region_at_64_byte_offsets():
    a, b = np.arange(1000, dtype=np.float32), np.arange(300, dtype=np.int64)
    frame = frames.pack({"inputs": wire.encode_tensors({"a": a, "b": b})})
    _, _, _, _, map_length = head(frame)
    region = (12 + map_length + 63) // 64 * 64
    seen = []
    message = msgpack.unpackb(frame[12 : 12 + map_length], raw=False,
                              ext_hook=lambda code, data: seen.append((code, struct.unpack(">QQ", data))))
    assert [code for code, _ in seen] == [1, 1] and message["inputs"]["a"]["data"] is None
    (off_a, len_a), (off_b, len_b) = (span for _, span in seen)
    assert off_a % 64 == 0 and off_b % 64 == 0 and (len_a, len_b) == (4000, 2400)
    assert frame[region + off_a : region + off_a + len_a] == a.tobytes()
    assert frame[region + off_b : region + off_b + len_b] == b.tobytes()
    assert len(frame) == region + off_b + len_b


def test_frame_parts_hand_out_the_tensor_memory_itself():
    array = np.arange(4096, dtype=np.float32)
    parts = frames.frame_parts({"inputs": wire.encode_tensors({"x": array})})
    assert any(isinstance(p, memoryview) and np.shares_memory(np.frombuffer(p, np.uint8), array) for p in parts)
    assert frames.frame_size(parts) == len(b"".join(parts)) - 4


def test_a_handmade_frame_decodes_with_its_views():
    data = np.arange(600, dtype=np.float32)
    region = bytes(64) + data.tobytes()
    message = {"id": 1, "inputs": {"x": {"dtype": "float32", "shape": [600], "data": ref(64, data.nbytes)}}}
    decoded = roundtrip_bytes(handmade(message, region))
    np.testing.assert_array_equal(wire.decode_tensor(decoded["inputs"]["x"]), data)


def roundtrip_bytes(frame: bytes) -> dict:
    [decoded] = decoder().feed(frame)
    return decoded


def test_a_message_that_cannot_be_packed_leaves_the_next_frame_intact():
    with pytest.raises(TypeError):
        frames.pack({"id": 1, "x": object()})  # the server answers INTERNAL for such a result
    assert roundtrip({"id": 2, "op": "live"}) == {"id": 2, "op": "live"}


def test_threads_packing_at_once_each_get_their_own_frames():
    from concurrent.futures import ThreadPoolExecutor

    def work(worker: int) -> list[bytes]:
        return [frames.pack({"id": worker * 10_000 + i, "blob": wire.encode_value(bytes([worker]) * (i * 13))})
                for i in range(400)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    for worker, packed in enumerate(results):
        got = decoder().feed(b"".join(packed))
        assert [(m["id"], wire.decode_value(m["blob"], "blob")) for m in got] == [
            (worker * 10_000 + i, bytes([worker]) * (i * 13)) for i in range(400)]


# --------------------------------------------------------------------------- receiving

MESSAGES = [
    {"v": 2, "id": 1, "op": "live"},
    {"id": 2, "result": {"live": True}},
    {"id": 3, "error": {"code": 8, "name": "QUEUE_FULL", "message": "full", "details": {"queued": 4}}},
    {"id": 4, "op": "infer", "inputs": wire.encode_tensors({"x": np.arange(12, dtype=np.float32).reshape(3, 4)})},
    {"id": 5, "inputs": wire.encode_tensors({"big": np.arange(30_000, dtype=np.float32), "jpeg": b"\xff" * 5000})},
    {"id": None, "blob": b"\x00\xff" * 300},
]


def plain(message: dict) -> dict:
    """A decoded message with its values decoded, for comparison."""
    if "inputs" in message:
        return dict(message, inputs={k: np.asarray(v).tolist() if not isinstance(v, bytes) else v
                                     for k, v in wire.decode_tensors(message["inputs"], "inputs").items()})
    return message


EXPECTED = [plain(roundtrip(m)) for m in MESSAGES]
STREAM = b"".join(frames.pack(m) for m in MESSAGES)


def test_the_stream_split_at_many_points_decodes_identically():
    for cut in list(range(0, 200)) + list(range(200, len(STREAM) + 1, 997)) + [len(STREAM) - 1]:
        dec = decoder()
        got = dec.feed(STREAM[:cut]) + dec.feed(STREAM[cut:])
        assert [plain(m) for m in got] == EXPECTED, cut
        assert dec.buffered == 0


def test_frames_fed_one_byte_at_a_time():
    sizes = [len(frames.pack(m)) for m in MESSAGES]
    boundaries = {sum(sizes[: k + 1]) for k in range(len(sizes))}
    dec = decoder()
    got = []
    for i in range(len(STREAM)):
        got += dec.feed(STREAM[i : i + 1])
        assert dec.pending_partial_frame() == (i + 1 not in boundaries)
    assert [plain(m) for m in got] == EXPECTED


def test_coalesced_small_frames_in_one_read():
    many = [{"id": i, "result": {"n": i}} for i in range(3000)]
    assert decoder().feed(b"".join(frames.pack(m) for m in many)) == many


def test_a_large_frame_is_read_into_its_own_buffer_without_overreading():
    """Once the head of a frame larger than the scratch buffer is known, get_buffer offers
    exactly the rest of that frame: the next frame's bytes never land in it."""
    big = frames.pack({"id": 1, "inputs": wire.encode_tensors({"x": np.ones(100_000, np.float32)})})
    small = frames.pack({"id": 2})
    dec = decoder()
    first = dec.get_buffer()
    first[:100] = big[:100]
    assert dec.buffer_updated(100) == []
    rest = dec.get_buffer()
    assert len(rest) == len(big) - 100  # the frame's own buffer, sized from its head
    rest[:] = big[100:]
    [message] = dec.buffer_updated(len(rest))
    x = wire.decode_tensor(message["inputs"]["x"])
    assert x.shape == (100_000,) and x.sum() == 100_000
    assert dec.feed(small) == [{"id": 2}]


def test_frame_over_max_is_refused_from_the_length_alone():
    with pytest.raises(FrameTooLargeError) as excinfo:
        decoder(1000).feed(struct.pack(">I", 1001))  # nothing else sent: refused before buffering
    assert_code(excinfo, ErrorCode.FRAME_TOO_LARGE)
    assert excinfo.value.details == {"length": 1001, "max_frame": 1000}
    assert isinstance(excinfo.value, ProtocolError)  # callers may catch the family


def test_frame_at_max_size_is_accepted():
    frame = frames.pack({"b": b"x" * 900})
    assert decoder(len(frame) - 4).feed(frame) == [{"b": b"x" * 900}]


def test_default_max_frame_is_64_mib():
    assert wire.DEFAULT_MAX_FRAME == 64 * 1024 * 1024


# --------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">I", 0),  # empty
        struct.pack(">I", 1) + b"\x00",  # neither layout
        struct.pack(">I", 3) + b"\xc1\x02\x00",  # head cut short
        struct.pack(">IBBHI", 8, 0xC1, 2, 1, 0),  # reserved field set
        struct.pack(">IBBHI", 8 + 3, 0xC1, 2, 0, 10) + b"\x80\x80\x80",  # map runs past the frame
        struct.pack(">IBBHI", 8 + 2, 0xC1, 2, 0, 2) + b"\x92\x01",  # truncated array
        struct.pack(">IBBHI", 8 + 1, 0xC1, 2, 0, 1) + b"\xc1",  # never-used msgpack byte
        struct.pack(">IBBHI", 8 + 3, 0xC1, 2, 0, 3) + b"\x92\x01\x02",  # an array, not a map
        struct.pack(">IBBHI", 8 + 4, 0xC1, 2, 0, 4) + msgpack.packb({1: 2}) + b"\x00",  # trailing byte
    ],
    ids=["empty", "neither-layout", "short-head", "reserved", "map-past-end", "truncated", "reserved-byte",
         "not-a-map", "trailing"],
)
def test_undelimitable_or_unparsable_frames_are_protocol_errors(frame):
    with pytest.raises(ProtocolError) as excinfo:
        decoder().feed(frame)
    assert_code(excinfo, ErrorCode.PROTOCOL_ERROR)


def test_an_unknown_layout_is_unsupported_protocol():
    with pytest.raises(ProtocolError) as excinfo:
        decoder().feed(handmade({"id": 1}, b"", layout=3))
    assert_code(excinfo, ErrorCode.UNSUPPORTED_PROTOCOL)
    assert excinfo.value.details["supported"] == [2]


def test_a_version_1_frame_is_recognised_and_answered_for_its_id():
    payload = msgpack.packb({"v": 1, "id": 42, "op": "live"})
    [bad] = decoder().feed(struct.pack(">I", len(payload)) + payload)
    assert isinstance(bad, frames.BadFrame) and bad.v1 and bad.message["id"] == 42
    assert bad.error.code == ErrorCode.UNSUPPORTED_PROTOCOL and bad.error.details["supported"] == [2]
    answer = frames.pack_v1({"id": 42, "error": bad.error.to_wire()})
    assert msgpack.unpackb(answer[4:], raw=False)["error"]["code"] == ErrorCode.UNSUPPORTED_PROTOCOL


BAD_REFERENCES = {
    "past-the-end": ({"x": ref(0, 65)}, bytes(64)),
    "offset-past-the-end": ({"x": ref(100, 0)}, bytes(64)),
    "huge-offset": ({"x": ref(2**64 - 1, 2**64 - 1)}, bytes(64)),
    "overlap": ({"a": ref(0, 40), "b": ref(32, 8)}, bytes(64)),
    "same-buffer-twice": ({"a": ref(0, 8), "b": ref(0, 8)}, bytes(64)),
    "other-ext-type": ({"x": msgpack.ExtType(5, b"12345678")}, bytes(64)),
    "short-reference": ({"x": msgpack.ExtType(1, b"\x00" * 8)}, bytes(64)),
}


@pytest.mark.parametrize("inputs,region", BAD_REFERENCES.values(), ids=BAD_REFERENCES.keys())
def test_bad_buffer_references_are_invalid_input_for_that_request(inputs, region):
    """Typed, attributable to the request, never a crash or an out-of-bounds view: the frame
    is well delimited, so the connection can go on."""
    [bad] = decoder().feed(handmade({"id": 9, "op": "infer", "inputs": inputs}, region))
    assert isinstance(bad, frames.BadFrame) and not bad.v1 and bad.message["id"] == 9
    assert bad.error.code == ErrorCode.INVALID_INPUT and bad.error.details["reason"]


def test_a_reference_that_disagrees_with_dtype_and_shape_is_invalid_input():
    [message] = decoder().feed(handmade({"id": 1, "inputs": {"x": {"dtype": "float32", "shape": [4], "data": ref(0, 12)}}},
                                        bytes(64)))
    with pytest.raises(Exception) as excinfo:
        wire.decode_tensors(message["inputs"], "inputs")
    assert excinfo.value.code == ErrorCode.INVALID_INPUT and excinfo.value.details["expected_bytes"] == 16


def test_adjacent_and_empty_references_are_fine():
    region = bytes(range(64))
    [message] = decoder().feed(handmade({"id": 1, "a": ref(0, 32), "b": ref(32, 32), "c": ref(64, 0), "d": ref(10, 0)}, region))
    assert bytes(message["a"]) == region[:32] and bytes(message["b"]) == region[32:] and bytes(message["c"]) == b""


def test_received_views_are_read_only():
    [message] = decoder().feed(handmade({"id": 1, "a": ref(0, 8)}, bytes(64)))
    assert message["a"].readonly


# --------------------------------------------------------------------------- properties


@given(garbage=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=5))
@settings(max_examples=500, deadline=None, database=None)
def test_property_garbage_never_escapes_the_error_tree(garbage, cuts):
    dec = decoder(200)
    points = sorted({c % (len(garbage) + 1) for c in cuts} | {0, len(garbage)})
    try:
        for start, end in zip(points, points[1:]):
            for message in dec.feed(garbage[start:end]):
                assert isinstance(message, (dict, frames.BadFrame))
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNSUPPORTED_PROTOCOL)


@given(spans=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 600)), min_size=1, max_size=5),
       with_region=st.booleans())
@settings(max_examples=300, deadline=None, database=None)
def test_property_references_resolve_in_bounds_or_are_refused(spans, with_region):
    region = bytes(range(256)) * 2 if with_region else b""
    [got] = decoder().feed(handmade({"id": 1, "refs": [ref(o, n) for o, n in spans]}, region))
    if isinstance(got, frames.BadFrame):
        assert got.error.code == ErrorCode.INVALID_INPUT
        return
    nonempty = sorted((o, o + n) for o, n in spans if n)
    assert all(o + n <= len(region) for o, n in spans)
    assert all(start >= end for (_, end), (start, _) in zip(nonempty, nonempty[1:]))  # no overlap got through
    for (o, n), view in zip(spans, got["refs"]):
        assert bytes(view) == region[o : o + n]


def test_the_worked_examples_in_the_protocol_document_are_what_the_implementation_sends():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    live = re.search(r"`live` with id 7\. The request frame is\s+`([0-9a-f ]+)`", text).group(1)
    assert bytes.fromhex(live) == frames.pack({"v": 2, "id": 7, "op": "live"})
    answer = re.search(r"response to an id-1 `live` would be\s+`([0-9a-f \n]+)`", text).group(1)
    assert bytes.fromhex(answer.replace("\n", " ")) == frames.pack({"id": 1, "result": {"live": True}})
    infer = frames.pack({"v": 2, "id": 1, "op": "infer", "model": "identity",
                         "inputs": wire.encode_tensors({"x": np.array([1.0, 2.0], np.float32)})})
    assert len(infer) == 92 and infer[:12].hex(" ") == "00 00 00 58 c1 02 00 00 00 00 00 50"
    assert "The complete frame is 92 bytes" in text and "00 00 00 58" in text
    big = frames.pack({"v": 2, "id": 2, "op": "infer", "model": "identity",
                       "inputs": wire.encode_tensors({"x": np.arange(256, dtype=np.float32)})})
    assert len(big) == 1152 and big[:12].hex(" ") == "00 00 04 7c c1 02 00 00 00 00 00 5a"
