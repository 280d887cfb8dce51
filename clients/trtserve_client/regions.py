"""Shared memory between a client and a server on the same host: the client's side.

A region is memory both processes map.  The client registers it under a name (on every
connection of its pool, again after each reconnect: regions belong to a connection on the
server), then

* passes ``region.tensor(shape, dtype, offset)`` (or ``region.write(array, offset)``, which
  copies the array in first) as an input value instead of an array: the request carries a
  reference, never the bytes;
* names ``region`` or ``region.slot(offset, byte_size)`` in ``infer(..., shm_outputs=...)``:
  the server writes that output there, and ``infer`` returns a view of it (a numpy array
  for system memory, a DeviceView for CUDA memory: cuda_regions.py).

A region's bytes belong to the caller between calls: the server reads an input region and
writes an output region only while the request that names them is in flight.  A returned
view is overwritten by the next request that writes the same bytes; copy it to keep it.
docs/PROTOCOL.md (sections 5 and 6.12) is the normative description.
"""
from __future__ import annotations

import math
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, ProtocolError
from .wire import SHM, dtype_name, tensor_layout


def reference(region: str, offset: int, byte_size: int) -> dict[str, Any]:
    """The wire form of ``byte_size`` bytes at ``offset`` of a registered region."""
    return {"region": region, "offset": int(offset), "byte_size": int(byte_size)}


class Region:
    """What system and CUDA regions share: a name, a size, references into it."""

    kind = "region"

    def __init__(self, name: str, byte_size: int) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"a region's name must be a non-empty string, got {name!r}", field="name")
        if isinstance(byte_size, bool) or not isinstance(byte_size, int) or byte_size < 1:
            raise InvalidArgumentError(f"byte_size must be an integer >= 1, got {byte_size!r}", field="byte_size")
        self.name, self.byte_size = name, byte_size

    def _span(self, offset: int, nbytes: int) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + nbytes > self.byte_size:
            raise InvalidArgumentError(
                f"bytes [{offset}, {offset + nbytes}) do not fit in region {self.name!r} of {self.byte_size} bytes",
                region=self.name, offset=repr(offset), byte_size=nbytes)

    def tensor(self, shape: Any, dtype: Any, offset: int = 0) -> dict[str, Any]:
        """An input value: the tensor of ``shape`` and ``dtype`` at ``offset`` of this region."""
        shape = [int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,))]
        name = dtype_name(dtype)
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        self._span(offset, nbytes)
        return {"dtype": name, "shape": shape, SHM: reference(self.name, offset, nbytes)}

    def raw(self, byte_size: int, offset: int = 0) -> dict[str, Any]:
        """An input value: ``byte_size`` raw bytes at ``offset`` (system regions only)."""
        self._span(offset, byte_size)
        return {SHM: reference(self.name, offset, byte_size)}

    def slot(self, offset: int = 0, byte_size: int | None = None) -> dict[str, Any]:
        """Where an output goes (``infer(shm_outputs={name: slot})``): by default the whole region."""
        size = self.byte_size - offset if byte_size is None else byte_size
        self._span(offset, size)
        return reference(self.name, offset, size)

    def output(self, obj: dict[str, Any], where: str) -> Any:
        """The answer's map for an output written here, as a view of this region."""
        raise NotImplementedError

    def _layout(self, obj: dict[str, Any], where: str) -> tuple[np.dtype | None, int, int]:
        """(numpy dtype or None for raw bytes, offset, byte_size) of an answer's reference."""
        ref = obj.get(SHM)
        offset, size = (ref.get("offset"), ref.get("byte_size")) if isinstance(ref, dict) else (None, None)
        if type(offset) is not int or type(size) is not int or offset < 0 or offset + size > self.byte_size:
            raise ProtocolError(f"{where}: the server sent a bad reference into region {self.name!r}: {ref!r:.120}")
        if "dtype" not in obj:
            return None, offset, size
        np_dtype, nbytes = tensor_layout(obj.get("dtype"), obj.get("shape"), where)
        if nbytes != size:
            raise ProtocolError(f"{where}: the server wrote {size} bytes for a {nbytes}-byte tensor")
        return np_dtype, offset, size

    def registration(self) -> dict[str, Any]:
        """The shm_register fields that register this region on a connection."""
        raise NotImplementedError

    def close(self) -> None:
        """Release this process's side (the client calls it when the region is unregistered)."""


class SystemSharedMemory(Region):
    """A POSIX shared-memory region: ``byte_size`` bytes at ``offset`` of the object ``key``.
    Without ``key`` a new object is created for it, owned by this region and removed
    (unlinked) by ``close()``; with ``key``, an existing object is used and left in place.
    The server must run as the same user (or one allowed to open the object read-write)."""

    kind = "system"

    def __init__(self, name: str, byte_size: int, key: str | None = None, offset: int = 0) -> None:
        super().__init__(name, byte_size)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgumentError(f"offset must be an integer >= 0, got {offset!r}", field="offset")
        self.offset, self.owned = offset, key is None
        shm = shared_memory.SharedMemory(create=True, size=offset + byte_size) if key is None else _attach(key)
        self._shm: shared_memory.SharedMemory | None = shm
        if shm.size < offset + byte_size:
            self.close()
            raise InvalidArgumentError(f"shared-memory object {key!r} holds {shm.size} bytes, fewer than offset {offset} "
                                       f"+ byte_size {byte_size}", field="byte_size", key=key)
        self.key = "/" + shm.name.lstrip("/")
        assert shm.buf is not None  # only a closed SharedMemory has none
        self.buffer = shm.buf[offset : offset + byte_size]  # this region's bytes, writable

    def ndarray(self, shape: Any, dtype: Any, offset: int = 0) -> np.ndarray:
        """A numpy view of the region to fill in place (then pass ``tensor(...)``)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        self._span(offset, math.prod(shape) * dtype.itemsize)
        return np.frombuffer(self.buffer, dtype, math.prod(shape), offset).reshape(shape)

    def write(self, value: Any, offset: int = 0) -> dict[str, Any]:
        """Copy an array (or bytes) into the region at ``offset``; returns its input value."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = memoryview(value).cast("B")
            self._span(offset, data.nbytes)
            self.buffer[offset : offset + data.nbytes] = data
            return self.raw(data.nbytes, offset)
        array = np.asarray(value)
        ref = self.tensor(array.shape, array.dtype, offset)
        self.ndarray(array.shape, array.dtype.newbyteorder("<"), offset)[...] = array  # the wire's byte order
        return ref

    def output(self, obj: dict[str, Any], where: str) -> Any:
        np_dtype, offset, size = self._layout(obj, where)
        if np_dtype is None:
            return self.buffer[offset : offset + size].tobytes()
        return np.frombuffer(self.buffer, np_dtype, size // np_dtype.itemsize, offset).reshape(obj["shape"])

    def registration(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "system", "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def close(self) -> None:
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        if self.owned:
            shm.unlink()  # the name goes now; the memory when the last mapping does
        try:
            self.buffer.release()
            shm.close()
        except BufferError:
            # Views handed out still use the mapping: it is unmapped with the last of them.
            shm._mmap = None  # type: ignore[attr-defined]  # (so SharedMemory.__del__ does not retry)

    def __repr__(self) -> str:
        return f"SystemSharedMemory({self.name!r}, {self.byte_size}, key={self.key!r}, offset={self.offset})"


def _attach(key: str) -> shared_memory.SharedMemory:
    name = key.lstrip("/")
    try:
        try:
            return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg,unused-ignore]  # Python 3.13+
        except TypeError:
            shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        raise InvalidArgumentError(f"no shared-memory object {key!r}; create it first, or leave key out to "
                                   "create one", field="key", key=key) from None
    # Before 3.13 attaching registers the object with the resource tracker, which would
    # unlink it (another process's object) when this process exits.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def decode_outputs(outputs: Any, regions: dict[str, Region], decode: Any) -> dict[str, Any]:
    """An answer's ``outputs``: values in regions as views of them, the rest by ``decode``."""
    if not isinstance(outputs, dict):
        raise ProtocolError(f"outputs must be a map of name to value, got {type(outputs).__name__}")
    values = {}
    for name, obj in outputs.items():
        where = f"outputs[{name!r}]"
        if type(obj) is dict and SHM in obj and "data" not in obj:
            ref = obj[SHM]
            region_name = ref.get("region") if isinstance(ref, dict) else None
            region = regions.get(region_name) if type(region_name) is str else None
            if region is None:
                raise ProtocolError(f"{where}: the server wrote into a region this client did not register: {ref!r:.120}")
            values[str(name)] = region.output(obj, where)
        else:
            values[str(name)] = decode(obj, where)
    return values
