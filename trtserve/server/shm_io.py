"""One infer request's use of its connection's shared-memory regions.

* An **input** given as ``{"dtype", "shape", "shm": {"region", "offset", "byte_size"}}``
  becomes a view of the region (numpy, read-only; or a DeviceArray for a CUDA region), and
  ``{"shm": ...}`` alone becomes raw bytes.  Every reference is checked before a view is
  made: the region exists on this connection, the span lies inside it, ``byte_size`` is
  exactly dtype x shape, a system region's object is still there.
* An **output** named in ``shm_outputs`` is written into its slot by the thread that
  finished the request (``write``, off the event loop), and the answer carries
  ``{"dtype", "shape", "shm": {... "byte_size": <bytes written>}}`` in its place.

Each region a request references is held (``in_use``) from parsing until the request's
item has left its model (``release``, on the loop), which is what ``shm_unregister`` waits for.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from trtserve_client.frames import OutOfBand
from trtserve_client.wire import SHM, dtype_name, encode_tensor, fast_layout, tensor_layout

from ..errors import BackendError, InvalidArgumentError, InvalidInputError, TrtserveError
from .shm import Region, RegionTable, region_error

def is_reference(obj: Any) -> bool:
    """A value whose bytes are in a region (a map with ``data`` is read by its ``data``)."""
    return type(obj) is dict and SHM in obj and "data" not in obj


def parse_reference(ref: Any, where: str, cls: type[TrtserveError]) -> tuple[Any, int, int]:
    """``{"region": str, "offset": int >= 0 (default 0), "byte_size": int >= 0}``."""
    if type(ref) is dict:
        name, offset, size = ref.get("region"), ref.get("offset", 0), ref.get("byte_size")
        if type(name) is str and type(offset) is int and type(size) is int and offset >= 0 and size >= 0:
            return name, offset, size
    raise region_error(
        cls, f"{where}: a shared-memory reference is {{region: str, offset: int >= 0, byte_size: int >= 0}}, got "
        f"{ref!r:.120}", "malformed", where=where)


def _wire_ref(name: str, offset: int, byte_size: int) -> dict[str, Any]:
    return {"region": name, "offset": offset, "byte_size": byte_size}


class ShmRequest:
    """The regions one infer request uses.  ``table`` is None when its connection registered
    none (every reference is then an unknown region)."""

    __slots__ = ("table", "leases", "slots", "placed")

    def __init__(self, table: RegionTable | None) -> None:
        self.table = table
        self.leases: list[Region] = []
        self.slots: dict[str, tuple[Region, int, int]] = {}  # output name -> region, offset, room
        self.placed: dict[str, dict[str, Any]] = {}  # output name -> the answer's reference map

    def _region(self, name: str, where: str, cls: type[TrtserveError]) -> Region:
        if self.table is None:
            raise region_error(
                cls, f"{where}: this connection has no shared-memory region named {name!r} (it registered none); "
                "register it with shm_register on this connection first", "unknown_region", where=where,
                region=name)
        region = self.table.get(name, where, cls)
        if region not in self.leases:  # in_use counts requests, not references (regions compare by identity)
            self.table.acquire(region)
            self.leases.append(region)
        return region

    def _span(self, ref: Any, where: str, cls: type[TrtserveError]) -> tuple[Region, int, int]:
        name, offset, size = parse_reference(ref, where, cls)
        region = self._region(name, where, cls)
        region.check_span(offset, size, where, cls)
        region.check_alive(where, cls)
        return region, offset, size

    # -- inputs (loop thread) ------------------------------------------------------------
    def input(self, obj: dict[str, Any], where: str) -> Any:
        region, offset, size = self._span(obj[SHM], where, InvalidInputError)
        if "dtype" not in obj and "shape" not in obj:
            return region.raw(offset, size, where)
        shape: Any = obj.get("shape")  # a list of ints once a layout is found for it
        np_dtype, nbytes = fast_layout(obj.get("dtype"), shape) or tensor_layout(obj.get("dtype"), shape, where)
        if nbytes != size:
            raise region_error(
                InvalidInputError, f"{where}: shape {shape} of {obj['dtype']} needs {nbytes} bytes but the reference "
                f"to region {region.name!r} gives byte_size {size}; make byte_size dtype x shape", "size_mismatch",
                where=where, region=region.name, expected_bytes=nbytes, byte_size=size)
        return region.tensor(offset, shape, np_dtype)

    # -- outputs ---------------------------------------------------------------------------
    def plan_outputs(self, raw: Any, known: list[str] | None, wanted: list[str] | None) -> None:
        """Check ``shm_outputs`` (loop thread): output names the answer will carry, slots
        inside their regions."""
        if raw is None:
            return
        if type(raw) is not dict or not raw:
            raise InvalidArgumentError(
                f"field 'shm_outputs' must be a non-empty map of output name to {{region, offset, byte_size}}, got "
                f"{raw!r:.80}", field="shm_outputs")
        for name, ref in raw.items():
            where = f"shm_outputs[{name!r}]"
            if type(name) is not str or (known is not None and name not in known) or (wanted is not None and name not in wanted):
                listed = wanted if wanted is not None else known
                raise InvalidArgumentError(
                    f"{where}: the answer has no output {name!r}; name one of {listed}", field="shm_outputs",
                    output=repr(name)[:80], expected=listed)
            self.slots[name] = self._span(ref, where, InvalidArgumentError)

    def write(self, values: dict[str, Any]) -> None:
        """Write the outputs named in shm_outputs (the finishing thread); raises a typed error."""
        for name, (region, offset, room) in self.slots.items():
            where = f"shm_outputs[{name!r}]"
            if name not in values:
                raise InvalidArgumentError(f"{where}: the model returned no output {name!r}; it returned "
                                           f"{sorted(map(str, values))}", field="shm_outputs", output=name)
            region.check_alive(where, InvalidArgumentError)
            self.placed[name] = _write(region, offset, room, values[name], where)

    # -- the end ---------------------------------------------------------------------------
    def release(self) -> None:
        """The request's item has left its model (loop thread): let go of every region."""
        leases, self.leases = self.leases, []
        if self.table is not None:
            for region in leases:
                self.table.release(region)


def _write(region: Region, offset: int, room: int, value: Any, where: str) -> dict[str, Any]:
    """One output into ``room`` bytes at ``offset``; returns the answer's map for it."""
    head: dict[str, Any]
    if hasattr(value, "__cuda_array_interface__") and not isinstance(value, np.ndarray):
        from .. import cuda  # a device result: the GPU path, where cuda is loaded already

        array = value if isinstance(value, cuda.DeviceArray) else cuda.DeviceArray.from_cuda_array(value)
        head = {"dtype": _output_dtype(array.dtype, where), "shape": list(array.shape)}
        nbytes = array.nbytes
        _check_room(region, nbytes, room, where)
        if nbytes:
            region.write_device(offset, array)
    else:
        if isinstance(value, (bytes, bytearray, memoryview)):
            head, data = {}, memoryview(value).cast("B")
        else:
            try:
                head = encode_tensor(value)  # wire dtype, little-endian C order: the frame's own rules
            except TrtserveError as exc:
                raise BackendError(f"{where}: the model's output cannot travel: {exc.message}", output=where) from None
            encoded = head.pop("data")
            data = encoded.view if type(encoded) is OutOfBand else memoryview(encoded)
        nbytes = data.nbytes
        _check_room(region, nbytes, room, where)
        if nbytes:
            region.write_host(offset, data)
    head[SHM] = _wire_ref(region.name, offset, nbytes)
    return head


def _output_dtype(dtype: Any, where: str) -> str:
    try:
        return dtype_name(dtype)
    except TrtserveError as exc:
        raise BackendError(f"{where}: the model's output cannot travel: {exc.message}", output=where) from None


def _check_room(region: Region, nbytes: int, room: int, where: str) -> None:
    if nbytes > room:
        raise region_error(
            InvalidArgumentError, f"{where}: the output needs {nbytes} bytes but the slot in region {region.name!r} "
            f"has byte_size {room}; give the slot at least {nbytes} bytes", "too_small", field="shm_outputs",
            region=region.name, needed_bytes=nbytes, byte_size=room)


def input_value(use: ShmRequest | None, obj: dict[str, Any], where: str) -> Any:
    """A referenced input; ``use`` None only outside the server (no regions anywhere)."""
    return (use if use is not None else ShmRequest(None)).input(obj, where)
