"""Wire values (clients/trtserve_client/wire.py) and the error objects that travel on them.
Frames themselves are tested in test_frames.py.

Everything here is pure: bytes in, messages/arrays/exceptions out.  Failures are asserted
by error code (and class), never by message text.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from trtserve_client import errors, frames, wire
from trtserve_client.errors import ErrorCode, InvalidInputError, ProtocolError, TrtserveError

ALL_DTYPES = [np.dtype(name) for name in wire.DTYPES]


def roundtrip(message: dict) -> dict:
    """pack -> FrameDecoder, asserting exactly one message comes out."""
    [decoded] = frames.FrameDecoder(wire.DEFAULT_MAX_FRAME).feed(frames.pack(message))
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


def data_bytes(encoded: dict) -> bytes:
    """An encoded tensor's bytes: in the map (small) or out of band."""
    data = encoded["data"]
    return bytes(data.view) if isinstance(data, frames.OutOfBand) else data


def test_tensor_bytes_are_little_endian_c_order():
    array = np.array([[1, 2], [3, 256]], dtype=np.uint16)
    encoded = wire.encode_tensor(array)
    assert encoded["shape"] == [2, 2]
    assert data_bytes(encoded) == b"\x01\x00\x02\x00\x03\x00\x00\x01"


def test_decode_is_a_zero_copy_read_only_view_of_the_received_frame():
    message = roundtrip({"t": wire.encode_tensor(np.arange(1000, dtype=np.float32).reshape(10, 100))})
    received = message["t"]["data"]
    assert type(received) is memoryview  # 4000 bytes travel out of band
    decoded = wire.decode_tensor(message["t"])
    assert np.shares_memory(decoded, np.frombuffer(received, np.uint8))
    assert not decoded.flags.writeable  # a received frame is read-only


def test_small_data_travels_inline_and_decodes_the_same():
    message = roundtrip({"t": wire.encode_tensor(np.arange(8, dtype=np.float32))})
    assert type(message["t"]["data"]) is bytes  # under frames.INLINE_LIMIT: msgpack bin
    np.testing.assert_array_equal(wire.decode_tensor(message["t"]), np.arange(8, dtype=np.float32))


def test_encode_does_not_copy_a_c_contiguous_little_endian_array():
    array = np.arange(frames.INLINE_LIMIT // 8, dtype="<f8")
    data = wire.encode_tensor(array)["data"]
    assert isinstance(data, frames.OutOfBand)
    assert np.shares_memory(np.frombuffer(data.view, np.uint8), array)


def test_a_tensor_under_the_inline_limit_is_encoded_as_its_bytes_and_framed_the_same():
    array = np.arange(frames.INLINE_LIMIT // 8 - 1, dtype="<f8")
    encoded = wire.encode_tensor(array)
    assert type(encoded["data"]) is bytes and encoded["data"] == array.tobytes()  # the map carries it as bin
    by_reference = dict(encoded, data=frames.OutOfBand(array.data.cast("B")))  # what the packer's hook inlines
    assert frames.pack({"t": encoded}) == frames.pack({"t": by_reference})


@pytest.mark.parametrize("dtype", [">u2", ">i4", ">f4", ">f8", ">i8", ">f2"])
def test_big_endian_input_travels_little_endian(dtype):
    array = np.arange(-3, 9).astype(dtype).reshape(3, 4)
    encoded = wire.encode_tensor(array)
    little = array.astype(np.dtype(dtype).newbyteorder("<"))
    assert encoded["dtype"] == little.dtype.name
    assert data_bytes(encoded) == little.tobytes()
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
    assert data_bytes(encoded) == np.ascontiguousarray(view).tobytes()
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


def test_small_bytes_values_travel_as_msgpack_bin():
    encoded = wire.encode_tensors({"jpeg": b"\xff\xd8\xff", "buf": bytearray(b"ab"), "x": np.ones(2, np.uint8)})
    packed = frames.pack({"outputs": encoded})
    assert b"\xc4\x03\xff\xd8\xff" in packed  # bin8, length 3
    decoded = wire.decode_tensors(roundtrip({"outputs": encoded})["outputs"], "outputs")
    assert decoded["jpeg"] == b"\xff\xd8\xff" and decoded["buf"] == b"ab"
    np.testing.assert_array_equal(decoded["x"], [1, 1])


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview], ids=["bytes", "bytearray", "memoryview"])
def test_large_bytes_values_travel_out_of_band_and_arrive_as_bytes(make):
    jpeg = bytes(range(256)) * 40
    packed = frames.pack({"inputs": wire.encode_tensors({"image": make(jpeg)})})
    (map_length,) = struct.unpack(">I", packed[8:12])
    assert jpeg not in packed[: 12 + map_length] and jpeg in packed[12 + map_length :]  # in the region
    decoded = wire.decode_tensors(roundtrip({"inputs": wire.encode_tensors({"image": make(jpeg)})})["inputs"], "inputs")
    assert type(decoded["image"]) is bytes and decoded["image"] == jpeg


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
    stream = b"".join(frames.pack(m) for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = frames.FrameDecoder(wire.DEFAULT_MAX_FRAME)
    got = []
    for start, end in zip(points, points[1:]):
        got += decoder.feed(stream[start:end])
    assert got == messages
    assert not decoder.pending_partial_frame()


@given(garbage=st.binary(max_size=200))
@settings(max_examples=500, deadline=None, database=None)
def test_property_garbage_never_escapes_the_error_tree(garbage):
    decoder = frames.FrameDecoder(max_frame=64)
    try:
        for message in decoder.feed(garbage):
            assert isinstance(message, (dict, frames.BadFrame))
    except TrtserveError as exc:
        assert exc.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNSUPPORTED_PROTOCOL)


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
