"""Frames passed on by a front door: a request's map re-packed, an answer's id swapped.

A front door relays infer frames between its clients and the replicas' servers without
turning tensors into arrays and back (docs/PROTOCOL.md section 2 for the layout):

* **Requests.**  The front door has unpacked the client's map already (its envelope is
  checked like any request's); :func:`request_parts` packs that map again with the id of
  the replica connection, and each out-of-band value (a view of the received frame) goes
  back out of band by reference.  Inline values are the bytes msgpack made of them.
* **Answers.**  A trtserve server writes every answer as ``{"id": <uint>, ...}`` with
  ``id`` the first key (server/protocol.py).  :func:`read_answer` reads that id from the
  raw bytes, and :func:`with_id` swaps it for the client's, keeping every other byte of
  the map and the buffer region as they came: nothing of the answer is unpacked.
  A frame of another shape is not a trtserve server's answer (None: the link drops the
  connection).
"""
from __future__ import annotations

import struct
from typing import Any

import msgpack

from trtserve_client.frames import ALIGN, HEAD, HEAD_SIZE, LAYOUT, MARKER, OutOfBand, align, frame_parts

_ID_KEY = b"\xa2id"  # fixstr "id"
_ERROR_KEY = b"\xa5error"  # fixstr "error": the key after the id of an error answer
_UINTS = {0xCC: struct.Struct(">B"), 0xCD: struct.Struct(">H"), 0xCE: struct.Struct(">I"), 0xCF: struct.Struct(">Q")}
_ZEROS = bytes(ALIGN)
_LENGTH = struct.Struct(">I")
# The head, the map's first byte, "id", a uint64 (type byte + 8) and the key after it.
_PREFIX = HEAD_SIZE + 4 + 9 + len(_ERROR_KEY)


# --------------------------------------------------------------------------- requests


def request_parts(message: dict[str, Any], request_id: int, timeout_ms: float | None = None) -> list[Any]:
    """The client's request ``message`` as a frame for a replica: ``id`` replaced (and
    ``timeout_ms``, when given: what is left of the client's), the rest as received."""
    fields = dict(message)
    fields["id"] = request_id
    if timeout_ms is not None:
        fields["timeout_ms"] = timeout_ms
    inputs = fields.get("inputs")
    if type(inputs) is dict:
        fields["inputs"] = _out_of_band(inputs)
    return frame_parts(fields)


def _out_of_band(values: dict[Any, Any]) -> dict[Any, Any]:
    """``values`` with each received buffer (a memoryview of the client's frame, raw or a
    tensor's ``data``) marked to travel out of band again; the dict itself when none is."""
    marked = None
    for name, value in values.items():
        kind = type(value)
        if kind is memoryview:
            value = OutOfBand(value)
        elif kind is dict and type(value.get("data")) is memoryview:
            value = {**value, "data": OutOfBand(value["data"])}
        else:
            continue
        if marked is None:
            marked = dict(values)
        marked[name] = value
    return values if marked is None else marked


# --------------------------------------------------------------------------- answers


def read_answer(frame: memoryview) -> tuple[int, int, bool] | None:
    """``(id, where its value ends, whether it is an error)`` of a trtserve server's answer
    frame (``{"id": <uint>, "result" | "error": ...}``, id first); None for anything else,
    a connection-level ``"id": nil`` included."""
    head = bytes(frame[:_PREFIX])
    if len(head) < HEAD_SIZE + 5 or head[4] != MARKER or head[5] != LAYOUT or head[6] or head[7]:
        return None
    first = head[HEAD_SIZE]
    if first & 0xF0 != 0x80 or first == 0x80 or head[HEAD_SIZE + 1 : HEAD_SIZE + 4] != _ID_KEY:
        return None
    kind, end = head[16], 17
    if kind < 0x80:  # positive fixint
        value = kind
    else:
        uint = _UINTS.get(kind)
        if uint is None or end + uint.size > len(head):
            return None
        value, end = uint.unpack_from(head, end)[0], end + uint.size
    return value, end, head[end : end + len(_ERROR_KEY)] == _ERROR_KEY


def with_id(frame: memoryview, id_end: int, new_id: int) -> list[Any]:
    """The answer ``frame`` (id first, ending at ``id_end``: :func:`read_answer`) with the id
    ``new_id``: a new head and map start, then the rest of the map and the buffer region
    as they are (the region starts at a multiple of 64 again, so its references hold)."""
    map_end = HEAD_SIZE + _LENGTH.unpack_from(frame, 8)[0]
    start = frame[HEAD_SIZE : HEAD_SIZE + 4]  # the map's header and "id"
    new = msgpack.packb(new_id)  # an unsigned integer in its shortest form, as servers write ids
    rest = frame[id_end:map_end]
    new_map_end = HEAD_SIZE + 4 + len(new) + len(rest)
    if len(frame) <= map_end:  # nothing out of band
        return [b"".join((HEAD.pack(new_map_end - 4, MARKER, LAYOUT, 0, new_map_end - HEAD_SIZE), start, new, rest))]
    region = frame[align(map_end) :]
    new_region = align(new_map_end)
    head = HEAD.pack(new_region + len(region) - 4, MARKER, LAYOUT, 0, new_map_end - HEAD_SIZE)
    return [b"".join((head, start, new, rest, _ZEROS[: new_region - new_map_end])), region]

