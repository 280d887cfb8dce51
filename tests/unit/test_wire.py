"""The wire format (clients/trtserve_client/wire.py) and the error objects that travel on it.

Everything here is pure: bytes in, messages/arrays/exceptions out.  Failures are asserted
by error code (and class), never by message text.
"""
from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trtserve_client import errors, wire
from trtserve_client.errors import ErrorCode, FrameTooLargeError, InvalidInputError, ProtocolError, TrtserveError

ALL_DTYPES = [np.dtype(name) for name in wire.DTYPES]


def roundtrip(message: dict) -> dict:
    """pack -> FrameDecoder, asserting exactly one message comes out."""
    [decoded] = wire.FrameDecoder().feed(wire.pack(message))
    return decoded


def tensor_roundtrip(array: np.ndarray) -> np.ndarray:
    return wire.decode_tensor(roundtrip({"t": wire.encode_tensor(array)})["t"])


def sample_array(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    if dtype == np.bool_:
        return (np.arange(size) % 3 == 0).reshape(shape)
    if dtype.kind == "f":
        return (np.arange(size) - size / 2).astype(dtype).reshape(shape) / 3
    info = np.iinfo(dtype)
    extremes = np.array([info.min, info.max, 0, 1, info.max - 1], dtype=dtype)
    return np.resize(extremes, size).reshape(shape)  # the range's edges, repeated


def assert_code(excinfo: pytest.ExceptionInfo, code: ErrorCode) -> None:
    assert excinfo.value.code == code, excinfo.value


# --------------------------------------------------------------------------- framing


def test_frame_is_big_endian_length_then_one_msgpack_map():
    frame = wire.pack({"id": 7, "op": "live"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgpack.unpackb(frame[4:], raw=False) == {"id": 7, "op": "live"}


def test_a_message_that_cannot_be_packed_leaves_the_next_frame_intact():
    with pytest.raises(TypeError):
        wire.pack({"id": 1, "x": object()})  # the server answers INTERNAL for such a result
    assert roundtrip({"id": 2, "op": "live"}) == {"id": 2, "op": "live"}


def test_threads_packing_at_once_each_get_their_own_frames():
    from concurrent.futures import ThreadPoolExecutor

    def frames(worker: int) -> list[bytes]:
        return [wire.pack({"id": worker * 10_000 + i, "blob": bytes([worker]) * (i % 97)}) for i in range(2000)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(frames, range(8)))
    for worker, packed in enumerate(results):
        decoded = wire.FrameDecoder().feed(b"".join(packed))
        assert decoded == [{"id": worker * 10_000 + i, "blob": bytes([worker]) * (i % 97)} for i in range(2000)]


MESSAGES = [
    {"v": 1, "id": 1, "op": "live"},
    {"id": 2, "result": {"live": True}},
    {"id": 3, "error": {"code": 8, "name": "QUEUE_FULL", "message": "full", "details": {"queued": 4}}},
    {"id": 4, "op": "infer", "inputs": {"x": wire.encode_tensor(np.arange(12, dtype=np.float32).reshape(3, 4))}},
    {"id": None, "blob": b"\x00\xff" * 300},
]


def normalised(messages: list[dict]) -> list[dict]:
    """What a peer decodes (memoryviews come back as bytes)."""
    return [msgpack.unpackb(msgpack.packb(m, use_bin_type=True), raw=False) for m in messages]


def test_frames_split_at_every_byte_boundary_decode_identically():
    stream = b"".join(wire.pack(m) for m in MESSAGES)
    expected = normalised(MESSAGES)
    for cut in range(len(stream) + 1):
        decoder = wire.FrameDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == expected, cut
        assert decoder.buffered == 0


def test_frames_fed_one_byte_at_a_time():
    frames = [wire.pack(m) for m in MESSAGES]
    boundaries = {sum(len(f) for f in frames[: k + 1]) for k in range(len(frames))}
    stream = b"".join(frames)
    decoder = wire.FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
        assert decoder.pending_partial_frame() == (i + 1 not in boundaries)
        assert len(got) == sum(1 for b in boundaries if b <= i + 1)
    assert got == normalised(MESSAGES)


def test_coalesced_frames_in_one_read():
    many = [{"id": i, "result": {"n": i}} for i in range(1000)]
    assert wire.FrameDecoder().feed(b"".join(wire.pack(m) for m in many)) == many


def test_partial_frame_is_reported_until_complete():
    frame = wire.pack({"id": 1})
    decoder = wire.FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.pending_partial_frame()
    assert decoder.feed(frame[-1:]) == [{"id": 1}]
    assert not decoder.pending_partial_frame()


def test_frame_at_max_size_is_accepted():
    message = {"b": b""}
    overhead = len(wire.pack(message)) - 4
    limit = 1000
    big = {"b": b"x" * (limit - overhead - 1)}  # bin8 -> bin16 header grows by one byte
    frame = wire.pack(big)
    assert len(frame) - 4 == limit
    assert wire.FrameDecoder(max_frame=limit).feed(frame) == [big]


def test_frame_over_max_is_refused_from_the_header_alone():
    decoder = wire.FrameDecoder(max_frame=1000)
    with pytest.raises(FrameTooLargeError) as excinfo:
        decoder.feed(struct.pack(">I", 1001))  # no payload sent: refused before buffering it
    assert_code(excinfo, ErrorCode.FRAME_TOO_LARGE)
    assert excinfo.value.details == {"length": 1001, "max_frame": 1000}
    assert isinstance(excinfo.value, ProtocolError)  # callers may catch the family


def test_default_max_frame_is_64_mib():
    assert wire.DEFAULT_MAX_FRAME == 64 * 1024 * 1024
    with pytest.raises(FrameTooLargeError):
        wire.FrameDecoder().feed(struct.pack(">I", wire.DEFAULT_MAX_FRAME + 1))


def test_frames_before_an_oversized_header_are_still_consumed():
    decoder = wire.FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLargeError):
        decoder.feed(wire.pack({"id": 1}) + struct.pack(">I", 101))
    assert decoder.buffered == 4  # the good frame was consumed; only the bad header remains


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # zero-length frame
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated array
        b"\x81\xa1k",  # map whose value is missing
        msgpack.packb({"a": 1}) + b"\x00",  # trailing bytes after the map
    ],
    ids=["empty", "reserved-byte", "truncated", "missing-value", "trailing-bytes"],
)
def test_garbage_payload_is_a_protocol_error(payload):
    with pytest.raises(ProtocolError) as excinfo:
        wire.FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)
    assert_code(excinfo, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("value", [[1, 2], 5, "op", None, b"bin", True, 1.5], ids=repr)
def test_payload_that_is_not_a_map_is_a_protocol_error(value):
    payload = msgpack.packb(value, use_bin_type=True)
    with pytest.raises(ProtocolError) as excinfo:
        wire.FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)
    assert_code(excinfo, ErrorCode.PROTOCOL_ERROR)


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (2, 0, 4), (1, 2, 3, 2)], ids=str)
def test_every_dtype_and_shape_round_trips(dtype, shape):
    array = sample_array(dtype, shape)
    decoded = tensor_roundtrip(array)
    assert decoded.dtype == dtype and decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_wire_dtype_names_are_numpy_names():
    for dtype in ALL_DTYPES:
        assert wire.encode_tensor(np.zeros(1, dtype))["dtype"] == dtype.name


def test_tensor_bytes_are_little_endian_c_order():
    array = np.array([[1, 2], [3, 256]], dtype=np.uint16)
    encoded = wire.encode_tensor(array)
    assert encoded["shape"] == [2, 2]
    assert bytes(encoded["data"]) == b"\x01\x00\x02\x00\x03\x00\x00\x01"


def test_decode_is_a_zero_copy_read_only_view_of_the_received_bytes():
    message = roundtrip({"t": wire.encode_tensor(np.arange(1000, dtype=np.float32).reshape(10, 100))})
    received = message["t"]["data"]
    decoded = wire.decode_tensor(message["t"])
    assert np.shares_memory(decoded, np.frombuffer(received, np.uint8))
    base = decoded
    while isinstance(base, np.ndarray):
        base = base.base
    assert base is received
    assert not decoded.flags.writeable  # the bytes object is immutable, so is the view


def test_encode_does_not_copy_a_c_contiguous_little_endian_array():
    array = np.arange(64, dtype="<f8").reshape(8, 8)
    data = wire.encode_tensor(array)["data"]
    assert np.shares_memory(np.frombuffer(data, np.uint8), array)


@pytest.mark.parametrize("dtype", [">u2", ">i4", ">f4", ">f8", ">i8", ">f2"])
def test_big_endian_input_travels_little_endian(dtype):
    array = np.arange(-3, 9).astype(dtype).reshape(3, 4)
    encoded = wire.encode_tensor(array)
    little = array.astype(np.dtype(dtype).newbyteorder("<"))
    assert encoded["dtype"] == little.dtype.name
    assert bytes(encoded["data"]) == little.tobytes()
    np.testing.assert_array_equal(tensor_roundtrip(array), array)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[:, ::2],
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: a[::-1],
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["strided", "transposed", "fortran", "reversed", "broadcast"],
)
def test_non_contiguous_input_travels_in_c_order(make):
    view = make(np.arange(24, dtype=np.int32).reshape(4, 6))
    encoded = wire.encode_tensor(view)
    assert bytes(encoded["data"]) == np.ascontiguousarray(view).tobytes()
    np.testing.assert_array_equal(tensor_roundtrip(view), view)


@pytest.mark.parametrize(
    "array",
    [np.zeros(2, np.complex64), np.array(["a"]), np.array([object()]), np.zeros(2, "datetime64[s]"), np.zeros(2, np.float128)],
    ids=["complex64", "str", "object", "datetime64", "float128"],
)
def test_dtypes_without_a_wire_name_are_refused(array):
    with pytest.raises(InvalidInputError) as excinfo:
        wire.encode_tensor(array)
    assert_code(excinfo, ErrorCode.INVALID_INPUT)


GOOD = {"dtype": "float32", "shape": [2, 3], "data": bytes(24)}
BAD_TENSORS = {
    "not-a-map": [1, 2],
    "dtype-missing": {k: v for k, v in GOOD.items() if k != "dtype"},
    "dtype-unknown": dict(GOOD, dtype="float"),
    "dtype-numpy-code": dict(GOOD, dtype="<f4"),
    "dtype-complex": dict(GOOD, dtype="complex64"),
    "dtype-not-str": dict(GOOD, dtype=7),
    "shape-missing": {k: v for k, v in GOOD.items() if k != "shape"},
    "shape-not-list": dict(GOOD, shape=6),
    "shape-negative": dict(GOOD, shape=[-2, -3]),
    "shape-float": dict(GOOD, shape=[2.0, 3]),
    "shape-bool": dict(GOOD, shape=[True, 6]),
    "shape-too-many-dims": dict(GOOD, shape=[1] * 33, data=bytes(4)),
    "shape-overflows-int64": dict(GOOD, dtype="uint8", shape=[2**32, 2**32], data=b""),
    "empty-but-too-big-for-numpy": dict(GOOD, dtype="bool", shape=[0, 2**32, 2**32], data=b""),
    "data-missing": {k: v for k, v in GOOD.items() if k != "data"},
    "data-str": dict(GOOD, data="x" * 24),
    "data-list": dict(GOOD, data=[0] * 24),
    "data-too-short": dict(GOOD, data=bytes(23)),
    "data-too-long": dict(GOOD, data=bytes(25)),
    "data-for-other-dtype": dict(GOOD, dtype="float64"),
}


@pytest.mark.parametrize("tensor", BAD_TENSORS.values(), ids=BAD_TENSORS.keys())
def test_bad_tensor_maps_are_invalid_input(tensor):
    with pytest.raises(InvalidInputError) as excinfo:
        wire.decode_tensor(tensor, where="inputs['x']")
    assert_code(excinfo, ErrorCode.INVALID_INPUT)
    assert excinfo.value.details["where"] == "inputs['x']"


def test_bytes_values_travel_as_msgpack_bin():
    encoded = wire.encode_tensors({"jpeg": b"\xff\xd8\xff", "buf": bytearray(b"ab"), "x": np.ones(2, np.uint8)})
    packed = msgpack.packb(encoded, use_bin_type=True)
    assert b"\xc4\x03\xff\xd8\xff" in packed  # bin8, length 3
    decoded = wire.decode_tensors(msgpack.unpackb(packed, raw=False), "outputs")
    assert decoded["jpeg"] == b"\xff\xd8\xff" and decoded["buf"] == b"ab"
    np.testing.assert_array_equal(decoded["x"], [1, 1])


@pytest.mark.parametrize("value", [[1, 2], "text", None, 3])
def test_tensor_collection_must_be_a_map(value):
    with pytest.raises(InvalidInputError) as excinfo:
        wire.decode_tensors(value, "inputs")
    assert_code(excinfo, ErrorCode.INVALID_INPUT)


def test_a_str_value_is_not_bytes_and_not_a_tensor():
    with pytest.raises(InvalidInputError):
        wire.decode_value("abc", "inputs['x']")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.name)
def test_error_object_round_trips_for_every_code(code):
    cls = errors.error_class(code)
    assert cls.code == code and cls is not TrtserveError
    original = cls(f"something about {code.name}", model="m", sizes=[1, 2], nested={"a": (1, 2)}, obj=object)
    wire_obj = original.to_wire()
    assert set(wire_obj) == {"code", "name", "message", "details"}
    assert wire_obj["code"] == int(code) and wire_obj["name"] == code.name
    rebuilt = errors.error_from_wire(roundtrip({"id": 1, "error": wire_obj})["error"])
    assert type(rebuilt) is cls and rebuilt.code == code
    assert rebuilt.message == original.message
    assert rebuilt.details == {"model": "m", "sizes": [1, 2], "nested": {"a": [1, 2]}, "obj": repr(object)}


def test_each_code_has_exactly_one_class():
    classes = [errors.error_class(code) for code in ErrorCode]
    assert len(set(classes)) == len(ErrorCode)


def test_class_is_chosen_by_code_not_by_name_or_message():
    rebuilt = errors.error_from_wire({"code": 8, "name": "MODEL_NOT_FOUND", "message": "model not found", "details": {}})
    assert isinstance(rebuilt, errors.QueueFullError)


def test_unknown_future_code_keeps_its_number():
    rebuilt = errors.error_from_wire({"code": 999, "name": "NEW", "message": "m", "details": {"x": 1}})
    assert type(rebuilt) is TrtserveError
    assert rebuilt.code == 999 and rebuilt.name == "CODE_999" and rebuilt.details == {"x": 1}


@pytest.mark.parametrize("obj", [None, "boom", {"message": "no code"}, {"code": "8"}, [8]], ids=repr)
def test_malformed_error_object_is_a_protocol_error(obj):
    assert isinstance(errors.error_from_wire(obj), ProtocolError)


def test_details_may_use_any_key_including_message():
    rebuilt = errors.error_from_wire({"code": 6, "message": "m", "details": {"message": "inner", "code": 1}})
    assert type(rebuilt) is InvalidInputError
    assert rebuilt.code == ErrorCode.INVALID_INPUT and rebuilt.details == {"message": "inner", "code": 1}


def test_missing_details_or_message_are_tolerated():
    rebuilt = errors.error_from_wire({"code": 9})
    assert isinstance(rebuilt, errors.DeadlineExceededError)
    assert rebuilt.message == "" and rebuilt.details == {}


# --------------------------------------------------------------------------- properties

wire_dtypes = st.sampled_from(ALL_DTYPES).flatmap(
    lambda dt: st.sampled_from([dt, dt.newbyteorder(">")] if dt.itemsize > 1 else [dt])
)
arrays = hnp.arrays(dtype=wire_dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))


@given(array=arrays, data=st.data())
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_any_array_round_trips_bit_exactly(array, data):
    if array.ndim >= 2 and data.draw(st.booleans()):
        array = array.T  # exercise non-contiguous inputs too
    decoded = tensor_roundtrip(array)
    assert decoded.shape == array.shape and decoded.dtype == array.dtype.newbyteorder("=")
    # Compare bytes, not values: NaN payloads and -0.0 must survive unchanged.
    assert decoded.tobytes() == np.ascontiguousarray(array, dtype=decoded.dtype).tobytes()


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


@given(
    messages=st.lists(st.dictionaries(st.text(max_size=8), json_like, max_size=5), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
@settings(max_examples=100, deadline=None, database=None)
def test_property_message_streams_survive_arbitrary_chunking(messages, cuts):
    stream = b"".join(wire.pack(m) for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = wire.FrameDecoder()
    got = []
    for start, end in zip(points, points[1:]):
        got += decoder.feed(stream[start:end])
    assert got == messages
    assert not decoder.pending_partial_frame()


@given(garbage=st.binary(max_size=200))
@settings(max_examples=500, deadline=None, database=None)
def test_property_garbage_never_escapes_the_error_tree(garbage):
    decoder = wire.FrameDecoder(max_frame=64)
    try:
        for message in decoder.feed(garbage):
            assert isinstance(message, dict)
    except TrtserveError as exc:
        assert exc.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_TOO_LARGE)


@given(
    dtype=st.sampled_from(wire.DTYPES) | st.text(max_size=8),
    shape=st.lists(st.integers(-3, 2**40) | st.floats() | st.booleans(), max_size=5) | st.integers(),
    data=st.binary(max_size=64),
)
@settings(max_examples=500, deadline=None, database=None)
def test_property_decode_tensor_returns_a_consistent_array_or_invalid_input(dtype, shape, data):
    try:
        array = wire.decode_tensor({"dtype": dtype, "shape": shape, "data": data})
    except InvalidInputError:
        return
    assert array.nbytes == len(data) and list(array.shape) == shape and array.dtype.name == dtype


def test_zero_dimensional_big_endian_scalar_keeps_its_shape():
    # ascontiguousarray would have made it shape (1,); found by the property test above.
    decoded = tensor_roundtrip(np.array(513, dtype=">u2"))
    assert decoded.shape == () and int(decoded) == 513


@pytest.mark.parametrize("bad", [b"\xc1", msgpack.packb([1, 2])])  # not msgpack; not a map
def test_a_bad_payload_after_buffered_bytes_is_a_protocol_error(bad):
    """The buffered path (a frame split across reads) reports a bad payload as ProtocolError,
    consumes the good frame before it and keeps the bad one, as the unbuffered path does."""
    good = wire.pack({"id": 1})
    decoder = wire.FrameDecoder()
    assert decoder.feed(good[:3]) == []  # something buffered: the next feed takes that path
    with pytest.raises(ProtocolError):
        decoder.feed(good[3:] + struct.pack(">I", len(bad)) + bad)
    assert decoder.buffered == 4 + len(bad)
    unbuffered = wire.FrameDecoder()
    with pytest.raises(ProtocolError):
        unbuffered.feed(good + struct.pack(">I", len(bad)) + bad)
    assert unbuffered.buffered == 4 + len(bad)
