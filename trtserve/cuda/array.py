"""DeviceArray: a typed view of device memory that torch and cupy read without a copy.

GPU backends pass DeviceArrays between stages in ``item["data"]``/``item["result"]``.
Each array exposes ``__cuda_array_interface__`` version 3 with ``stream`` set to the
stream its data was produced on, so a consumer on another stream can order itself after
the producer (``torch.as_tensor``, ``cupy.asarray``).  Only C-contiguous arrays exist here:
every producer in trtserve writes dense outputs.

Uploads go through a :class:`HostStaging` pinned buffer that is allocated once per
instance and grows on demand; pageable uploads would block the caller for the whole copy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends.stacking import contiguous_strides
from .runtime import DeviceBuffer, Event, PinnedBuffer, Stream, copy_async, current_stream

_ALIGN = 256  # keep each staged upload aligned like cudaMalloc's allocations


def cuda_array_interface(ptr: int, shape: Sequence[int], dtype: Any, stream_handle: int | None) -> dict[str, Any]:
    """The ``__cuda_array_interface__`` (v3) dict of a C-contiguous device array.

    ``stream_handle`` None means "no synchronisation needed"; the protocol reserves 0, so
    a legacy-stream producer must say 1 (its documented value for the legacy stream).
    """
    interface: dict[str, Any] = {
        "shape": tuple(int(d) for d in shape),
        "typestr": np.dtype(dtype).str,
        "data": (int(ptr), False),
        "version": 3,
        "strides": None,
    }
    if stream_handle is not None:
        interface["stream"] = int(stream_handle) if stream_handle != 0 else 1
    return interface


class DeviceArray:
    """A C-contiguous array in device memory, kept alive by ``owner``."""

    def __init__(
        self,
        ptr: int,
        shape: Sequence[int],
        dtype: Any,
        stream: Stream | None = None,
        owner: Any = None,
        device: int | None = None,
    ) -> None:
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._stream = stream
        self.owner = owner  # a DeviceBuffer, a torch tensor, another DeviceArray, ...
        self.device = device if device is not None else (stream.device if stream is not None else 0)

    @classmethod
    def empty(cls, shape: Sequence[int], dtype: Any, stream: Stream | None = None) -> DeviceArray:
        """A new array allocated stream-ordered on ``stream`` (default: the current stream)."""
        stream = stream if stream is not None else current_stream()
        nbytes = math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize
        buffer = DeviceBuffer(nbytes, stream=stream)
        return cls(buffer.ptr, shape, dtype, stream, owner=buffer, device=buffer.device)

    @classmethod
    def from_cuda_array(cls, obj: Any, stream: Stream | None = None) -> DeviceArray:
        """Wrap any C-contiguous ``__cuda_array_interface__`` object (torch, cupy) without a copy."""
        cai = obj.__cuda_array_interface__
        shape, dtype = tuple(cai["shape"]), np.dtype(cai["typestr"])
        strides = cai.get("strides")
        if strides is not None and tuple(strides) != contiguous_strides(shape, dtype.itemsize):
            raise ValueError(f"only C-contiguous device arrays are supported, got strides {strides} for shape {shape}")
        return cls(cai["data"][0], shape, dtype, stream, owner=obj)

    @property
    def stream(self) -> Stream | None:
        """The stream the data is being produced on; None once that work is known complete.

        SyncTensor clears it on the results it returns (they are complete, and a consumer
        must not order itself after the producer's *next* batch), and a closed stream
        (an unloaded model's) reads as None, so no one ever enqueues on a destroyed handle.
        """
        stream = self._stream
        return None if stream is None or stream.closed else stream

    @stream.setter
    def stream(self, stream: Stream | None) -> None:
        self._stream = stream

    # -- numpy-like attributes ---------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        stream = self.stream
        return cuda_array_interface(self.ptr, self.shape, self.dtype, stream.handle if stream is not None else None)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def reshape(self, *shape: Any) -> DeviceArray:
        new = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
        if -1 in new:
            known = math.prod(d for d in new if d != -1)
            new = tuple(self.size // known if d == -1 else d for d in new)
        if math.prod(new) != self.size:
            raise ValueError(f"cannot reshape a DeviceArray of shape {self.shape} into {new}")
        return DeviceArray(self.ptr, new, self.dtype, self.stream, owner=self, device=self.device)

    def rows(self, start: int, stop: int) -> DeviceArray:
        """Rows ``[start, stop)`` along the first dimension, as a view."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows [{start}, {stop}) out of range for first dimension {self.shape[0]}")
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        return DeviceArray(
            self.ptr + start * row_bytes, (stop - start,) + self.shape[1:], self.dtype, self.stream, owner=self, device=self.device
        )

    def to_host(self, out: np.ndarray | None = None) -> np.ndarray:
        """Copy to host memory and wait for it (synchronises this array's stream)."""
        return to_host(self, out)

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x}, device={self.device})"


class HostStaging:
    """A pinned upload buffer reused across batches, with a fence so it is never overwritten
    while the previous batch's copies are still reading it."""

    def __init__(self, nbytes: int = 0, device: int | None = None) -> None:
        self.device = device
        self.buffer = PinnedBuffer(nbytes, device=device)
        self.fence: Event | None = None

    def upload(self, arrays: Sequence[np.ndarray], stream: Stream | None = None) -> list[DeviceArray]:
        """Copy host arrays to new device arrays on ``stream`` (default: the current one).

        Returns at once; the copies complete in stream order.
        """
        stream = stream if stream is not None else current_stream()
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        staged = self.reserve(total)
        out = []
        for a, offset in zip(arrays, offsets):
            if staged is not None:  # None: every array is empty, nothing to stage
                staged[offset : offset + a.nbytes] = a.reshape(-1).view(np.uint8)
            dev = DeviceArray.empty(a.shape, a.dtype, stream)
            copy_async(dev.ptr, self.buffer.ptr + offset, a.nbytes, "htod", stream)
            out.append(dev)
        self.fence_on(stream)
        return out

    def reserve(self, nbytes: int) -> np.ndarray | None:
        """The buffer as bytes, at least ``nbytes`` long, once nothing reads it any more: for
        a caller that fills it itself, then copies from ``ptr`` and calls ``fence_on``."""
        if self.fence is not None:
            self.fence.synchronize()  # the previous upload's copies have finished reading
        if nbytes > self.buffer.nbytes:
            self.buffer.close()  # cudaFreeHost; nothing reads it now (fence above)
            self.buffer = PinnedBuffer(max(nbytes, 2 * self.buffer.nbytes), device=self.device)
        return self.buffer.as_numpy(np.uint8) if nbytes else None

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    def fence_on(self, stream: Stream | None) -> None:
        """Mark the buffer in use until the copies enqueued on ``stream`` so far have run."""
        if self.fence is None:
            self.fence = Event(blocking=True, device=self.device)
        self.fence.record(stream)

    def close(self) -> None:
        if self.fence is not None:
            self.fence.close()
        self.buffer.close()


def to_device(host: np.ndarray, stream: Stream | None = None, staging: HostStaging | None = None) -> DeviceArray:
    """Upload one array.  Through ``staging`` it is asynchronous; without, the pageable
    copy blocks the caller until it is done (correct, just slow)."""
    if staging is not None:
        return staging.upload([host], stream)[0]
    host = np.ascontiguousarray(host)
    stream = stream if stream is not None else current_stream()
    dev = DeviceArray.empty(host.shape, host.dtype, stream)
    copy_async(dev.ptr, host.ctypes.data, host.nbytes, "htod", stream)
    return dev


def to_host(array: Any, out: np.ndarray | None = None, stream: Stream | None = None) -> np.ndarray:
    """Copy a device array (DeviceArray or any CUDA array interface object) to host memory
    and wait for the copy; ordered after ``array``'s producing stream."""
    if not isinstance(array, DeviceArray):
        array = DeviceArray.from_cuda_array(array)
    if out is None:
        out = np.empty(array.shape, array.dtype)
    elif out.nbytes != array.nbytes or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous with {array.nbytes} bytes, got {out.nbytes}")
    stream = stream or array.stream or current_stream()
    copy_async(out.ctypes.data, array.ptr, array.nbytes, "dtoh", stream)
    with Event(blocking=True, device=array.device) as done:
        done.record(stream)
        done.synchronize()
    return out
