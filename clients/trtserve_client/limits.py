"""What one frame's msgpack map may make a receiver build, derived from its frame limit.

msgpack's own defaults bound a container only by the length of the buffer being parsed,
so a 64 MiB map may declare an array of 67 million nils: about 540 MB of list for 64 MiB
on the wire, and most of a second of one thread parsing it.  Here:

* **Per container** (msgpack's ``max_*_len``): arrays and maps hold at most
  ``max_frame // 1024`` elements (65,536 at the default 64 MiB, never under 1,024), a str
  at most ``max_frame // 64`` bytes (1 MiB); bin and ext values may fill the frame.  A
  header over a limit fails before anything is built.
* **Per frame** (:func:`check_map`, only for maps over ``SCAN_OVER`` bytes: a smaller
  map cannot build more than a few MB): at most ``max_elements`` values in total, counted
  by walking the msgpack tokens without building anything, so many small containers
  cannot add up to what one large one may not be.
* **Nesting**: arrays and maps nest at most ``MAX_DEPTH`` (256) levels.  msgpack's own
  limit is 1,024, and values that deep break Python's ``repr`` (error messages, logs).

Keys of the request map must be str, and ext type -1 (msgpack's timestamp, which the
unpacker decodes itself, never asking the ext hook) is refused like every ext type other
than 1: :func:`unpack_map`, :func:`check_map` and :func:`inspect` keep those checks cheap.
"""
from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import ProtocolError

#: Maps up to this size are parsed without counting their elements first.
SCAN_OVER = 64 * 1024
#: The default per-frame element budget of a server's decoder (a request needs dozens).
MAX_ELEMENTS = 65536
#: Arrays and maps nest at most this deep (a request needs 4: map, inputs, tensor, shape);
#: msgpack's own limit is 1,024, deep enough to break Python's repr of the value.
MAX_DEPTH = 256
MIN_CONTAINER = 1024


def unpack_limits(max_frame: int) -> tuple[int, int, int, int]:
    """(max_str_len, max_bin_len, max_array_len, max_map_len) for frames of ``max_frame``."""
    container = max(MIN_CONTAINER, max_frame // 1024)
    return max(MIN_CONTAINER, max_frame // 64), max_frame, container, container


# What follows each msgpack type byte before the next token.  Filled below.
_FIXED: dict[int, int] = {}  # type byte -> payload bytes after it
_SIZED: dict[int, tuple[int, int]] = {}  # type byte -> (length field bytes, extra bytes)
_CONTAINERS: dict[int, int] = {}  # type byte -> length field bytes
_MAPS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def _tables() -> None:
    for b in range(0x00, 0x80):
        _FIXED[b] = 0  # positive fixint
    for b in range(0xE0, 0x100):
        _FIXED[b] = 0  # negative fixint
    for b in range(0xA0, 0xC0):
        _FIXED[b] = b - 0xA0  # fixstr
    _FIXED.update({0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
                   0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17})
    _SIZED.update({0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),
                   0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)})  # bin, str, ext (ext adds its type byte)
    for b in range(0x80, 0xA0):
        _CONTAINERS[b] = 0  # fixmap, fixarray
    _CONTAINERS.update({0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4})


_tables()
_LENGTHS = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}
# bytes.translate deletes these, leaving the bytes that could open an array or a map.
_NOT_CONTAINERS = bytes(b for b in range(256) if b not in _CONTAINERS)


class Walk:
    """What :func:`walk` saw: values (keys included; it stops past the budget), whether
    the nesting went past the limit, and whether a msgpack timestamp appeared."""

    __slots__ = ("count", "too_deep", "timestamp")

    def __init__(self) -> None:
        self.count, self.too_deep, self.timestamp = 0, False, False


def walk(payload: bytes | memoryview, budget: int, max_depth: int) -> Walk:
    """Walk ``payload``'s msgpack tokens without building anything: type bytes and lengths
    only, payloads skipped.  Malformed input stops the walk (the unpacker then names it)."""
    data = payload if isinstance(payload, bytes) else memoryview(payload).cast("B")
    seen, pos, end = Walk(), 0, len(data)
    open_: list[int] = []  # values still to come in each open container, outermost first
    fixed, sized, lengths = _FIXED, _SIZED, _LENGTHS
    while pos < end and seen.count <= budget:
        kind = data[pos]
        pos += 1
        seen.count += 1
        if open_:
            open_[-1] -= 1
        skip = fixed.get(kind)
        head = sized.get(kind) if skip is None else None
        if skip is not None:
            if kind in _FIXEXT and pos < end and data[pos] == 0xFF:
                seen.timestamp = True
            pos += skip
        elif head is not None:
            field, extra = head
            if pos + field + extra > end:
                break
            if extra and data[pos + field] == 0xFF:
                seen.timestamp = True
            pos += field + extra + lengths[field].unpack_from(data, pos)[0]
        elif kind in _CONTAINERS:
            field = _CONTAINERS[kind]
            if pos + field > end:
                break
            size = (kind & 0x0F) if field == 0 else lengths[field].unpack_from(data, pos)[0]
            pos += field
            size *= 2 if kind in _MAPS else 1
            if size:
                open_.append(size)
                if len(open_) > max_depth:
                    seen.too_deep = True
                    break
        else:
            break  # 0xC1 or garbage
        while open_ and open_[-1] == 0:
            open_.pop()
    return seen


def check_map(frame: memoryview, start: int, end: int, budget: int | None, max_depth: int = MAX_DEPTH) -> tuple[str | None, bool]:
    """For the map in ``frame[start:end]``: (why it cannot be one frame's, or None; whether
    the unpacked map must be looked at by :func:`inspect` for depth and timestamps: False
    is certain).

    A map of up to ``SCAN_OVER`` bytes costs at most two C-speed scans: nesting deeper than
    ``max_depth`` needs more container headers than a map shorter than that has bytes, and
    a timestamp needs a 0xff byte.  A larger map is walked here first, so a frame of
    millions of values is refused before any is built (``budget`` None: no value budget,
    as a client trusting its server has; then a large map is only scanned)."""
    length = end - start
    if length <= SCAN_OVER or budget is None:
        source = frame.obj
        if type(source) is not bytes:  # a large frame's own buffer: its (small) map alone
            source, start, end = bytes(frame[start:end]), 0, length
        if length > max_depth and len(source[start:end].translate(None, _NOT_CONTAINERS)) > max_depth:
            return None, True  # may nest too deep
        return None, source.find(b"\xff", start, end) >= 0 and _timestamp_head(source, start, end)
    seen = walk(frame[start:end], budget, max_depth)
    if seen.too_deep:
        return too_deep_message(max_depth), False
    if seen.count > budget:
        return (f"the frame's map holds more than {budget} msgpack values ({length} bytes of map); "
                "send tensors and raw bytes as buffers, not as arrays of numbers"), False
    return None, seen.timestamp


def too_deep_message(max_depth: int) -> str:
    return f"the frame's map nests arrays and maps more than {max_depth} levels deep; at most {max_depth} are accepted"


def inspect(value: Any, max_depth: int = MAX_DEPTH) -> tuple[bool, bool]:
    """(nested deeper than ``max_depth``, holds a msgpack Timestamp) for an unpacked value;
    iterative, since values may nest past Python's recursion limit."""
    stack, timestamp = [(value, 1)], False
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is msgpack.Timestamp:
            timestamp = True
        elif kind is dict or kind is list:
            if depth > max_depth:
                return True, timestamp
            stack.extend((child, depth + 1) for child in (item.values() if kind is dict else item))
    return False, timestamp


# msgpack's timestamp encodings: fixext 4, fixext 8 and ext 8 of 12 bytes, all of type -1.
_TIMESTAMP_HEADS = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")
_FIXEXT = frozenset((0xD4, 0xD5, 0xD6, 0xD7, 0xD8))


def _timestamp_head(data: bytes, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` holds the head of a msgpack timestamp (perhaps by chance,
    inside other data: :func:`inspect` settles it).  Only asked when a 0xff byte is there."""
    return any(data.find(head, start, end) >= 0 for head in _TIMESTAMP_HEADS)


def unpack_map(payload: memoryview, ext_hook: Any, limits: tuple[int, int, int, int]) -> dict[str, Any]:
    """The frame's map, unpacked within ``limits`` (:func:`unpack_limits`); ProtocolError
    for what is not one valid msgpack map with str keys."""
    max_str, max_bin, max_array, max_map = limits
    try:
        message = msgpack.unpackb(payload, raw=False, use_list=True, ext_hook=ext_hook, max_str_len=max_str,
                                  max_bin_len=max_bin, max_array_len=max_array, max_map_len=max_map)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        kind = "nested deeper than msgpack's 1024 levels" if type(exc).__name__ == "StackError" else "not valid msgpack"
        raise ProtocolError(
            f"frame map is {kind} ({type(exc).__name__}: {exc})", payload_size=len(payload)
        ) from None
    if type(message) is not dict:
        raise ProtocolError(f"frame payload must be a msgpack map, got {type(message).__name__}",
                            payload_type=type(message).__name__)
    for key in message:  # inline, not a call: this runs for every frame
        if type(key) is not str:
            raise ProtocolError(f"frame map has the key {key!r:.60}, a msgpack {_wire_type(key)}; map keys are "
                                "msgpack str", key_type=_wire_type(key))
    return message


def _wire_type(value: Any) -> str:
    return "bin" if isinstance(value, bytes) else type(value).__name__
