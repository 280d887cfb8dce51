"""Frames of protocol version 2: one msgpack map, then the raw buffers it points at.

::

    offset 0    uint32 BE   length: the bytes after this field
    offset 4    uint8       0xC1, a byte msgpack never uses (so a version-1 peer refuses the frame)
    offset 5    uint8       2, the frame layout
    offset 6    uint16 BE   0, reserved
    offset 8    uint32 BE   map_length
    offset 12   the msgpack map (map_length bytes)
    zero bytes up to R, the first multiple of 64 at or after 12 + map_length
    R ...       the buffer region, to the end of the frame

A value that travels out of band (a tensor's ``data``, a raw byte value) is msgpack ext
type 1 holding two uint64 BE: its offset in the region and its length.  So a sender writes
a tensor straight from its memory (``transport.writelines``), and a receiver reads a large
frame straight into a buffer of its own and hands out numpy views of it: no copy in user
space either way.  docs/PROTOCOL.md is the normative description.

A version-1 frame (the payload is a msgpack map) is recognised, so a server can tell an old
client why it is refused instead of closing the connection on it.
"""
from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from .errors import (
    FrameTooLargeError,
    InvalidInputError,
    ProtocolError,
    TrtserveError,
    UnsupportedProtocolError,
)
from .recycle import FRAME_BUFFERS
from .limits import MAX_DEPTH, check_map, inspect, too_deep_message, unpack_limits, unpack_map

LAYOUT = 2
MARKER = 0xC1
HEAD = struct.Struct(">IBBHI")
HEAD_SIZE = HEAD.size  # 12
LENGTH = struct.Struct(">I")
ALIGN = 64
BUFFER_EXT = 1
REF = struct.Struct(">QQ")
#: Out-of-band values smaller than this travel inside the map as msgpack bin: copying a few
#: hundred bytes costs less than an I/O vector and its alignment padding.
INLINE_LIMIT = 1024
#: Frames up to this size are read into a shared scratch buffer and copied out (one copy);
#: larger ones are read straight into a buffer of their own.
SCRATCH_SIZE = 64 * 1024
_ZEROS = bytes(ALIGN)
_V1_MAP_MARKERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}  # fixmap, map16, map32


def align(offset: int) -> int:
    """The first multiple of ALIGN at or after ``offset`` (where a frame's buffer region starts)."""
    return (offset + ALIGN - 1) & ~(ALIGN - 1)


# --------------------------------------------------------------------------- sending


class OutOfBand:
    """Bytes that travel in the buffer region, not in the map (see wire.encode_tensor)."""

    __slots__ = ("view",)

    def __init__(self, data: Any) -> None:
        self.view = data if type(data) is memoryview else memoryview(data)

    @property
    def nbytes(self) -> int:
        return self.view.nbytes


class _FrameBuilder:
    """One per thread (a msgpack Packer is not thread-safe): packs a map, collects buffers."""

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self.end = 0  # where the region's content ends so far
        self.packer = msgpack.Packer(use_bin_type=True, default=self._out_of_band)

    def _out_of_band(self, obj: Any) -> Any:
        if type(obj) is not OutOfBand:
            raise TypeError(f"cannot serialize {type(obj).__name__} object")
        view = obj.view
        size = view.nbytes
        if size < INLINE_LIMIT:
            return view.tobytes()
        offset = align(self.end)
        if offset > self.end:
            self.buffers.append(_ZEROS[: offset - self.end])
        self.buffers.append(view)
        self.end = offset + size
        return msgpack.ExtType(BUFFER_EXT, REF.pack(offset, size))

    def parts(self, message: dict[str, Any]) -> list[Any]:
        self.buffers, self.end = [], 0
        try:
            body = self.packer.pack(message)  # a failed pack leaves the Packer empty
        except BaseException:
            self.buffers = []
            raise
        buffers, self.buffers = self.buffers, []
        map_end = HEAD_SIZE + len(body)
        region = align(map_end) if buffers else map_end
        head = HEAD.pack(region + self.end - 4, MARKER, LAYOUT, 0, len(body))
        return [head + body + _ZEROS[: region - map_end], *buffers]


_builders = threading.local()


def frame_parts(message: dict[str, Any]) -> list[Any]:
    """One frame as a list of buffers to write in order (``transport.writelines``): the head
    and map as one bytes, then the out-of-band values by reference, never copied."""
    try:
        builder = _builders.builder
    except AttributeError:
        builder = _builders.builder = _FrameBuilder()
    return builder.parts(message)


def pack(message: dict[str, Any]) -> bytes:
    """One frame as one bytes object (tests, small control messages)."""
    return b"".join(frame_parts(message))


def frame_size(parts: list[Any]) -> int:
    """The ``length`` field of a frame made by frame_parts: its size less 4 bytes."""
    return sum(memoryview(p).nbytes for p in parts) - LENGTH.size


def pack_v1(message: dict[str, Any]) -> bytes:
    """A frame in the version-1 layout: only to tell a version-1 client it is refused."""
    payload = msgpack.packb(message, use_bin_type=True)
    return LENGTH.pack(len(payload)) + payload


# --------------------------------------------------------------------------- receiving


@dataclass
class BadFrame:
    """A well-delimited frame whose request cannot be served: answer ``message['id']`` with
    ``error`` (in the version-1 layout when ``v1``) and go on with the connection."""

    message: dict[str, Any]
    error: TrtserveError
    v1: bool = False


Received = dict | BadFrame  # (or a memoryview: a raw FrameDecoder's whole frame)


class FrameDecoder:
    """Frames from a byte stream, for an ``asyncio.BufferedProtocol``::

        def get_buffer(self, sizehint): return decoder.get_buffer()
        def buffer_updated(self, nbytes): handle(decoder.buffer_updated(nbytes))

    Small frames land in a scratch buffer and are copied out whole; once a header announces
    a frame larger than the scratch buffer, the rest of it is read into a buffer of its own,
    so a tensor's bytes are never copied after the kernel delivered them.

    Raises FrameTooLargeError as soon as a header declares more than ``max_frame`` bytes,
    and ProtocolError for a frame that cannot be delimited or parsed; both end the
    connection.  A frame that parses but cannot be served comes back as a BadFrame.

    ``raw=True`` delimits frames without decoding them: each comes back as a memoryview of
    the whole frame, length field included (a relay that passes frames on as they are).
    """

    def __init__(
        self,
        max_frame: int,
        *,
        admit: Callable[[int], bool] | None = None,
        max_elements: int | None = None,
        raw: bool = False,
    ) -> None:
        self.max_frame = max_frame
        self.raw = raw
        # admit(size) at each frame's header: True to go on, False to leave the frame unread
        # until resume() (a server's memory budget); it may raise to refuse the frame.
        self.admit = admit
        self.waiting = False  # a frame's header is in, and admit said wait
        self.max_elements = max_elements  # per-frame msgpack value budget (limits.py)
        self._scratch = memoryview(bytearray(SCRATCH_SIZE))
        self._start = 0  # scratch[_start:_end] holds received bytes not yet parsed
        self._end = 0
        self._frame: memoryview | None = None  # a large frame being read into its own buffer
        self._filled = 0

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = value
        self.limits = unpack_limits(value)  # msgpack's per-container limits follow the frame's

    def resume(self) -> list[Received]:
        """Go on after admit said wait (the frame is admitted now)."""
        self.waiting = False
        return self._split()

    def clear(self) -> None:
        """Forget what is buffered of an incomplete frame (its connection is closing: a large
        frame's buffer goes at once, not when the connection object does)."""
        self._frame, self._filled = None, 0
        self._start = self._end = 0
        self.waiting = False

    @property
    def buffered(self) -> int:
        return self._filled if self._frame is not None else self._end - self._start

    def pending_partial_frame(self) -> bool:
        """True when bytes of an incomplete frame are buffered (a truncated frame at EOF)."""
        return self.buffered > 0

    def get_buffer(self) -> memoryview:
        if self._frame is not None:
            return self._frame[self._filled :]
        if self._end == SCRATCH_SIZE:  # a partial frame at the end: move it to the front
            pending = self._end - self._start
            self._scratch[:pending] = self._scratch[self._start : self._end]
            self._start, self._end = 0, pending
        return self._scratch[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Received]:
        if self._frame is not None:
            self._filled += nbytes
            if self._filled < len(self._frame):
                return []
            frame, self._frame, self._filled = self._frame, None, 0
            return [self._decoded(frame)]
        self._end += nbytes
        return self._split()

    def feed(self, data: bytes) -> list[Received]:
        """Everything in ``data``, copied in as a transport would (tests, simple peers)."""
        received: list[Received] = []
        view, pos = memoryview(data), 0
        while pos < len(view):
            buffer = self.get_buffer()
            n = min(len(buffer), len(view) - pos)
            buffer[:n] = view[pos : pos + n]
            pos += n
            received += self.buffer_updated(n)
        return received

    def _split(self) -> list[Received]:
        """Decode the complete frames in the scratch buffer; start a large one's own buffer."""
        received: list[Received] = []
        scratch = self._scratch
        while self._end - self._start >= LENGTH.size:
            (length,) = LENGTH.unpack_from(scratch, self._start)
            if length > self._max_frame:
                raise FrameTooLargeError(
                    f"frame of {length} bytes exceeds the maximum of {self._max_frame} bytes; "
                    "send smaller requests or raise the server's --max-frame",
                    length=length,
                    max_frame=self.max_frame,
                )
            total, have = LENGTH.size + length, self._end - self._start
            if self.admit is not None and not self.admit(total):
                self.waiting = True
                break
            if total > SCRATCH_SIZE:
                self._begin_own_frame(total)
                break
            if have < total:
                if self._start + total > SCRATCH_SIZE:  # it will not fit where it starts
                    scratch[:have] = scratch[self._start : self._end]
                    self._start, self._end = 0, have
                break
            frame = memoryview(scratch[self._start : self._start + total].tobytes())
            self._start += total
            received.append(self._decoded(frame))
        if self._start == self._end:
            self._start = self._end = 0
        return received

    def _decoded(self, frame: memoryview) -> Received:
        if self.raw:
            return cast(Received, frame)  # a raw decoder's caller takes whole frames
        return decode_frame(frame, self.limits, self.max_elements)

    def _begin_own_frame(self, total: int) -> None:
        have = self._end - self._start
        frame = FRAME_BUFFERS.take(total)
        frame[:have] = self._scratch[self._start : self._end]
        self._frame, self._filled = frame, have
        self._start = self._end = 0


def decode_frame(frame: memoryview, limits: tuple[int, int, int, int] | None = None,
                 max_elements: int | None = None) -> Received:
    """One whole frame (held in memory the result may keep referencing).  ``limits``:
    msgpack's per-container limits (limits.unpack_limits, from the frame itself when
    None); ``max_elements``: the frame's value budget (None: not counted)."""
    if len(frame) <= LENGTH.size:
        raise ProtocolError("empty frame: a frame carries at least a 12-byte head and a msgpack map",
                            payload_size=len(frame) - LENGTH.size)
    first = frame[LENGTH.size]
    if first != MARKER:
        if first in _V1_MAP_MARKERS:
            return _refuse_v1(frame)
        raise ProtocolError(
            f"frame payload starts with byte 0x{first:02x}; a version-2 frame starts with 0xC1, 2 "
            "(docs/PROTOCOL.md section 2)", first_byte=first)
    if len(frame) < HEAD_SIZE:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the 12-byte head", frame_size=len(frame))
    _, _, layout, reserved, map_length = HEAD.unpack_from(frame, 0)
    if layout != LAYOUT:
        raise UnsupportedProtocolError(
            f"frame layout {layout} is not spoken here; this peer speaks layout {LAYOUT} (protocol version 2)",
            version=layout, supported=[LAYOUT])
    if reserved:
        raise ProtocolError(f"frame head bytes 6-7 are reserved and must be 0, got {reserved}", reserved=reserved)
    map_end = HEAD_SIZE + map_length
    if map_end > len(frame):
        raise ProtocolError(f"map_length {map_length} runs past the end of the {len(frame)}-byte frame",
                            map_length=map_length, frame_size=len(frame))
    region = frame[min(align(map_end), len(frame)) :].toreadonly()
    refs = _References(region)
    problem, suspect = check_map(frame, HEAD_SIZE, map_end, max_elements)
    if problem is not None:
        raise ProtocolError(problem, map_length=map_length)
    message = unpack_map(frame[HEAD_SIZE:map_end], refs.resolve, limits or unpack_limits(len(frame)))
    too_deep, timestamp = inspect(message) if suspect else (False, False)
    if too_deep:
        raise ProtocolError(too_deep_message(MAX_DEPTH), map_length=map_length)
    if timestamp:
        refs.errors.append("msgpack ext type -1 (a timestamp) is not a value of this protocol "
                           f"(ext type {BUFFER_EXT} with 16 bytes, a buffer reference, is the only ext type)")
    bad = refs.problem()
    return message if bad is None else BadFrame(message, bad)


class _References:
    """Resolves ext-1 references to views of the region, remembering what was wrong."""

    __slots__ = ("region", "spans", "errors")

    def __init__(self, region: memoryview) -> None:
        self.region = region
        self.spans: list[tuple[int, int]] = []
        self.errors: list[str] = []

    def resolve(self, code: int, data: bytes) -> Any:
        if code != BUFFER_EXT or len(data) != REF.size:
            self.errors.append(f"msgpack ext type {code} with {len(data)} bytes is not a buffer reference "
                               f"(ext type {BUFFER_EXT} with 16 bytes: offset, length)")
            return None
        offset, length = REF.unpack(data)
        if offset + length > len(self.region):
            self.errors.append(f"buffer [{offset}, {offset + length}) lies past the end of the frame's "
                               f"{len(self.region)}-byte buffer region")
            return None
        if length:
            self.spans.append((offset, offset + length))
        return self.region[offset : offset + length]

    def problem(self) -> InvalidInputError | None:
        if not self.errors and len(self.spans) > 1:
            spans = sorted(self.spans)
            for (start, end), (next_start, next_end) in zip(spans, spans[1:]):
                if next_start < end:
                    self.errors.append(f"buffers [{start}, {end}) and [{next_start}, {next_end}) overlap; "
                                       "each value needs bytes of its own")
                    break
        if not self.errors:
            return None
        return InvalidInputError(f"bad buffer reference in the frame: {self.errors[0]}", reason=self.errors[0])


def _refuse_v1(frame: memoryview) -> BadFrame:
    """A version-1 frame: the id, if it has one, gets UNSUPPORTED_PROTOCOL in its layout."""
    try:
        message = msgpack.unpackb(frame[LENGTH.size :], raw=False, use_list=True)
    except Exception:
        message = None
    if not isinstance(message, dict):
        raise ProtocolError("frame payload is neither a version-2 frame nor a version-1 msgpack map")
    error = UnsupportedProtocolError(
        "this request uses the frame layout of protocol version 1; this server speaks protocol version "
        f"{LAYOUT}, where tensor data travels in raw buffers after the map: upgrade the client "
        "(pip install -U trtserve-client)", version=message.get("v") if type(message.get("v")) is int else 1,
        supported=[LAYOUT])
    return BadFrame(message, error, v1=True)
