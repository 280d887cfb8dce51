"""trtserve's wire values and constants, shared by the server and every client.

Tensors travel as ``{"dtype": str, "shape": [int, ...], "data": ...}`` with the data
little-endian and C-ordered; raw byte inputs (a JPEG, say) travel as bare values.  Data of
1 KiB or more travels out of band, in the frame's buffer region (frames.py); smaller data as
msgpack ``bin``.  A receiver accepts either.  docs/PROTOCOL.md is the normative description.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InvalidInputError
from .frames import INLINE_LIMIT, LAYOUT, OutOfBand

PROTOCOL_VERSION = LAYOUT
DEFAULT_MAX_FRAME = 64 * 1024 * 1024  # 64 MiB: a 4K RGB float32 image fits with room to spare

OPERATIONS = (
    "infer",
    "live",
    "ready",
    "server_metadata",
    "model_metadata",
    "model_config",
    "repository_index",
    "statistics",
    "load",
    "unload",
    "auth",
    "shm_register",
    "shm_unregister",
    "shm_status",
)

# Wire dtype names are numpy's canonical names; the bytes are always little-endian.
DTYPES = (
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
)
_NUMPY_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}
# Native-order dtype -> wire name: a dict lookup, where numpy 2's dtype.name costs microseconds.
_WIRE_NAMES = {np.dtype(name): name for name in DTYPES}
MAX_DIMS = 32  # numpy 1.x's limit; a peer must not be able to make reshape raise
_MAX_INDEX = int(np.iinfo(np.intp).max)
#: The key of a value whose bytes lie in a registered shared-memory region instead of the
#: frame: ``{"dtype", "shape", "shm": {"region", "offset", "byte_size"}}``, or ``{"shm": ...}``
#: alone for raw bytes (docs/PROTOCOL.md section 5; regions.py).
SHM = "shm"


# --------------------------------------------------------------------------- tensors


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """A numpy array as a wire tensor.  C-contiguous little-endian arrays of INLINE_LIMIT
    bytes or more are not copied: the frame refers to their memory, so it must not change
    until the frame is written.  Smaller ones travel inside the map (frames.py), so their
    bytes are taken here, in one call, instead of by the packer's hook."""
    if type(array) is not np.ndarray:
        array = np.asarray(array)
    name = _WIRE_NAMES.get(array.dtype) or dtype_name(array.dtype)
    if array.dtype.byteorder == ">" or not array.flags.c_contiguous:
        # astype, not ascontiguousarray: the latter turns a 0-d array into shape (1,).
        array = array.astype(_NUMPY_DTYPES[name], order="C")
    if array.nbytes < INLINE_LIMIT:
        return {"dtype": name, "shape": list(array.shape), "data": array.tobytes()}
    return {"dtype": name, "shape": list(array.shape), "data": OutOfBand(array.data.cast("B"))}


def dtype_name(dtype: Any) -> str:
    """The wire name of a numpy dtype (any byte order), or InvalidInputError."""
    dtype = np.dtype(dtype)
    name = _WIRE_NAMES.get(dtype) or dtype.name  # .name: non-native byte order
    if name not in _NUMPY_DTYPES:
        raise InvalidInputError(
            f"dtype {dtype} cannot travel on the wire; use one of {', '.join(DTYPES)}",
            dtype=str(dtype),
        )
    return name


def decode_tensor(obj: Any, where: str = "tensor") -> np.ndarray:
    """A wire tensor as a read-only numpy view over the received frame (no copy)."""
    array = fast_tensor(obj)
    return array if array is not None else _decode_tensor_checked(obj, where)


def fast_tensor(obj: Any) -> np.ndarray | None:
    """decode_tensor's fast path: a well-formed non-empty tensor, else None (then
    decode_tensor decodes it or names the problem)."""
    if type(obj) is not dict or len(obj) != 3:  # other keys: the checked path looks at them
        return None
    data = obj.get("data")
    # A received tensor's data: bin decodes to bytes, a buffer reference to a memoryview.
    if type(data) is not bytes and type(data) is not memoryview:
        return None
    shape = obj.get("shape")
    layout = fast_layout(obj.get("dtype"), shape)
    return np.frombuffer(data, dtype=layout[0]).reshape(shape) if layout is not None and layout[1] == len(data) else None


def fast_layout(dtype: Any, shape: Any) -> tuple[np.dtype, int] | None:
    """tensor_layout's fast path: a known dtype and a list of positive ints, else None
    (then tensor_layout names the problem, or handles an empty tensor).  Exact type checks
    and one size product; the full checks cost 2.4 us a tensor on the server's loop."""
    np_dtype = _NUMPY_DTYPES.get(dtype) if type(dtype) is str else None
    if np_dtype is None or type(shape) is not list or len(shape) > MAX_DIMS:
        return None
    size = np_dtype.itemsize
    for d in shape:
        if type(d) is not int or d <= 0:
            return None
        size *= d
    # Every dim a positive int: the size bounds them all, no overflow possible.
    return np_dtype, size


def _decode_tensor_checked(obj: Any, where: str) -> np.ndarray:
    """decode_tensor for every other case: empty tensors, and errors that name the problem."""
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where}: expected a tensor map, got {type(obj).__name__}", where=where)
    for key in obj:
        if type(key) is not str:
            raise InvalidInputError(f"{where}: tensor map key {key!r:.60} is not a str; map keys are msgpack str",
                                    where=where)
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    np_dtype, expected = tensor_layout(dtype, shape, where)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInputError(
            f"{where}: data must be msgpack bin or a buffer reference, got {type(data).__name__}", where=where)
    received = memoryview(data).nbytes
    if expected != received:
        raise InvalidInputError(
            f"{where}: shape {shape} of {dtype} needs {expected} bytes but {received} were sent",
            where=where,
            shape=shape,
            dtype=dtype,
            expected_bytes=expected,
            received_bytes=received,
        )
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def tensor_layout(dtype: Any, shape: Any, where: str) -> tuple[np.dtype, int]:
    """A tensor map's numpy dtype and byte length, or InvalidInputError naming what is wrong
    (an unknown dtype, a shape that is not a list of non-negative integers, a size no array
    can have).  Byte lengths are Python ints: huge dims cannot wrap to 0."""
    if type(dtype) is not str or dtype not in _NUMPY_DTYPES:  # a map or list is unhashable
        raise InvalidInputError(
            f"{where}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}",
            where=where,
            dtype=repr(dtype),
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidInputError(
            f"{where}: shape must be a list of at most {MAX_DIMS} non-negative integers, got {shape!r}",
            where=where,
            shape=repr(shape),
        )
    np_dtype = _NUMPY_DTYPES[dtype]
    # numpy refuses a shape whose non-zero dims overflow its index type, even when another
    # dim is 0 and the array is empty; check first so a peer cannot provoke a ValueError.
    if math.prod(d for d in shape if d) * np_dtype.itemsize > _MAX_INDEX:
        raise InvalidInputError(
            f"{where}: shape {shape} of {dtype} is larger than any array can be",
            where=where,
            shape=shape,
            dtype=dtype,
        )
    return np_dtype, math.prod(shape) * np_dtype.itemsize


def encode_value(value: Any) -> Any:
    """An input/output value: bytes travel as a bare value, a shared-memory reference
    (regions.py) as it is, everything array-like as a tensor."""
    if type(value) is dict and SHM in value and "data" not in value:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return OutOfBand(memoryview(value).cast("B") if isinstance(value, memoryview) else value)
    return encode_tensor(np.asarray(value))


def decode_value(obj: Any, where: str) -> Any:
    """A received value: raw bytes as ``bytes`` (what backends and callers expect; the one
    copy of them), a tensor as a numpy view."""
    value = fast_value(obj)
    return decode_tensor(obj, where) if value is None else value


def fast_value(obj: Any) -> Any:
    """decode_value's fast path: raw bytes, a well-formed tensor, else None."""
    kind = type(obj)
    if kind is bytes:
        return obj
    if kind is memoryview:
        return obj.tobytes()
    return fast_tensor(obj)


def encode_tensors(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: encode_value(value) for name, value in values.items()}


def decode_tensors(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where} must be a map of name to tensor, got {type(obj).__name__}", where=where)
    return {str(name): decode_value(value, f"{where}[{name!r}]") for name, value in obj.items()}
