"""msgpack limits derived from the frame limit (clients/trtserve_client/limits.py), through
the real decoder: what a frame's map may make a receiver build, and what is refused cheaply."""
from __future__ import annotations

import struct
import time

import msgpack
import pytest
from trtserve_client import frames, limits
from trtserve_client.errors import InvalidInputError, ProtocolError
from trtserve_client.wire import decode_tensor

SERVER_BUDGET = limits.MAX_ELEMENTS  # what the server's decoder passes
LIVE = b"\xa1v\x02\xa2id\x01\xa2op\xa4live"  # three entries of a request map


def framed(body: bytes, region: bytes = b"") -> memoryview:
    return memoryview(frames.HEAD.pack(8 + len(body) + len(region), frames.MARKER, 2, 0, len(body)) + body + region)


def with_junk(junk: bytes) -> memoryview:
    """A ``live`` request whose unknown field ``junk`` holds ``junk`` (raw msgpack)."""
    return framed(b"\x84" + LIVE + b"\xa4junk" + junk)


def decode(frame: memoryview, max_frame: int = 64 << 20, budget: int | None = SERVER_BUDGET):
    return frames.decode_frame(frame, limits.unpack_limits(max_frame), budget)


def test_limits_follow_the_frame_limit():
    assert limits.unpack_limits(64 << 20) == (1 << 20, 64 << 20, 65536, 65536)
    assert limits.unpack_limits(64 << 10) == (1024, 64 << 10, 1024, 1024)  # never under 1,024
    decoder = frames.FrameDecoder(64 << 20)
    decoder.max_frame = 64 << 10  # as after authentication changes it: the limits follow
    assert decoder.limits == limits.unpack_limits(64 << 10)


def test_a_frame_of_nils_is_refused_before_anything_is_built():
    n = 8_000_000
    frame = with_junk(b"\xdd" + struct.pack(">I", n) + b"\xc0" * n)
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="more than 65536 msgpack values"):
        decode(frame)
    assert time.perf_counter() - started < 0.5  # msgpack itself would build 64 MB of list


def test_many_small_arrays_cannot_add_up_to_what_one_may_not_be():
    inner = b"\xdc" + struct.pack(">H", 1000) + b"\xc0" * 1000
    frame = with_junk(b"\xdc" + struct.pack(">H", 100) + inner * 100)  # 100 arrays under the per-array limit
    with pytest.raises(ProtocolError, match="more than 65536 msgpack values"):
        decode(frame)
    assert len(decode(frame, budget=None)["junk"]) == 100  # a client (no budget) takes it


def test_one_container_over_the_per_container_limit_is_refused():
    frame = with_junk(b"\xdd" + struct.pack(">I", 2000) + b"\xc0" * 2000)
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode(frame, max_frame=64 << 10)  # 1,024 elements per container at 64 KiB
    assert len(decode(frame)["junk"]) == 2000


@pytest.mark.parametrize("size", [64, 5000, 70_000])  # small maps, and one walked before unpacking
def test_nesting_is_limited_to_256_levels(size):
    pad = b"\xc4" + bytes([max(0, min(255, size - 300))]) + bytes(max(0, min(255, size - 300)))
    if size > limits.SCAN_OVER:
        pad = b"\xc6" + struct.pack(">I", size) + bytes(size)
    ok = with_junk(b"\x92" + pad + b"\x91" * 254 + b"\xc0")  # the request map, junk, 254 more: 256 levels
    assert decode(ok)["v"] == 2
    deep = with_junk(b"\x92" + pad + b"\x91" * 255 + b"\xc0")
    with pytest.raises(ProtocolError, match="more than 256 levels deep"):
        decode(deep)
    with pytest.raises(ProtocolError, match="more than 256 levels deep"):
        decode(deep, budget=None)  # clients refuse it too: its repr would break


def test_bin_map_keys_are_refused():
    with pytest.raises(ProtocolError, match=r"key b'id', a msgpack bin; map keys are msgpack str"):
        decode(framed(msgpack.packb({"v": 2, b"id": 1, "op": "live"})))
    tensor = {"dtype": "uint8", "shape": [1], "data": b"\x01", b"dtype": "float32"}
    with pytest.raises(InvalidInputError, match="tensor map key b'dtype' is not a str"):
        decode_tensor(tensor, "inputs['x']")


def test_a_timestamp_anywhere_is_refused_like_any_ext_type_but_1():
    message = {"v": 2, "id": 7, "op": "live", "junk": [{"when": msgpack.Timestamp(1, 2)}]}
    received = decode(framed(msgpack.packb(message)))
    assert isinstance(received, frames.BadFrame) and received.message["id"] == 7
    assert "ext type -1 (a timestamp)" in received.error.message
    # The same bytes inside a bin value are data, not a timestamp.
    plain = decode(framed(msgpack.packb({"v": 2, "id": 7, "op": "live", "junk": b"\xd6\xff\x00\x00\x00\x01"})))
    assert plain["junk"] == b"\xd6\xff\x00\x00\x00\x01"


def test_walk_counts_every_value_and_the_depth():
    payload = msgpack.packb({"a": [1, [2, 3]], "b": {"c": b"x" * 300}})
    seen = limits.walk(payload, 100, 3)
    assert (seen.count, seen.too_deep, seen.timestamp) == (11, False, False)  # 2 maps, 4 keys, 2 arrays, 3 ints
    assert limits.walk(msgpack.packb({"t": msgpack.Timestamp(1, 0)}), 100, 3).timestamp is True
    assert limits.walk(payload, 100, 2).too_deep is True  # map, array, array: 3 levels
    assert limits.walk(payload, 3, 3).count == 4  # stops just past the budget
