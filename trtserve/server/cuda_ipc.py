"""CUDA regions: device memory a client process exported with cudaIpcGetMemHandle.

Imported only when a client registers one (``kind = "cuda"``), so a CPU-only server never
loads cuda-python.  The server opens the handle on the device the client names, checks that
the memory is on that device and that the region fits in the exported allocation
(trtserve/cuda/ipc.py), and from then on:

* **inputs** are DeviceArrays of the client's memory, without a producer stream: the client
  finished writing them before it sent the request (docs/PROTOCOL.md 6.12).  GPU backends
  read them in place (``SyncTensor[TorchScriptTensor]`` through ``__cuda_array_interface__``);
* **outputs** are copied into the region on the GPU, on the stream current on the thread
  that finished the request when it is on the region's device (the model's instance stream,
  when its instance thread finishes it), else on a writer stream of that device; then that
  thread waits for the copy.  So when the answer reaches the client, the output bytes are in
  its memory, and any stream of the client may read them.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .. import cuda
from ..cuda.ipc import ForeignDevice, IpcMemory
from ..errors import DeviceError, InvalidArgumentError, InvalidInputError
from .shm import Region, region_error

_writers: dict[int, cuda.Stream] = {}  # device -> the stream writes use off the device's own threads
_writers_lock = threading.Lock()


def _writer_stream(device: int) -> cuda.Stream:
    stream = cuda.current_stream()
    if stream is not None and stream.device == device and not stream.closed:
        return stream  # the instance thread's own stream: the copy is ordered after its work
    with _writers_lock:
        stream = _writers.get(device)
        if stream is None:
            stream = _writers[device] = cuda.Stream(device=device)
        return stream


class CudaRegion(Region):
    """``byte_size`` bytes at ``offset`` of an exported allocation on ``device``."""

    kind = "cuda"

    def __init__(self, name: str, handle: bytes, device: int, offset: int, byte_size: int) -> None:
        super().__init__(name, byte_size)
        self.device, self.offset = device, offset
        self.memory = _open(name, handle, device)
        if offset + byte_size > self.memory.nbytes:
            raise region_error(
                InvalidArgumentError, f"region {name!r} (offset {offset} + byte_size {byte_size}) does not fit in the "
                f"exported allocation of {self.memory.nbytes} bytes; register a region inside it", "out_of_bounds",
                field="byte_size", region=name, allocation_bytes=self.memory.nbytes)
        self.ptr = self.memory.ptr + offset

    def tensor(self, offset: int, shape: list[int], dtype: np.dtype) -> cuda.DeviceArray:
        # No producer stream: the client completed its writes before sending the request.
        return cuda.DeviceArray(self.ptr + offset, shape, dtype, None, owner=self.memory, device=self.device)

    def raw(self, offset: int, byte_size: int, where: str) -> bytes:
        raise region_error(  # a bad input reference, as size_mismatch is: INVALID_INPUT
            InvalidInputError, f"{where}: raw bytes cannot come from CUDA region {self.name!r}: backends take raw "
            "bytes in host memory; put them in a system region, or send a tensor (dtype, shape)", "wrong_kind",
            where=where, region=self.name)

    def write_host(self, offset: int, data: memoryview) -> None:
        source = np.frombuffer(data, np.uint8)
        self._copy(offset, source.ctypes.data, source.nbytes, "htod", None)

    def write_device(self, offset: int, array: cuda.DeviceArray) -> None:
        self._copy(offset, array.ptr, array.nbytes, "dtod", array.stream)

    def _copy(self, offset: int, source: int, nbytes: int, kind: str, producer: cuda.Stream | None) -> None:
        previous = cuda.current_device()
        cuda.ensure_device(self.device)
        try:
            stream = _writer_stream(self.device)
            with cuda.Event(blocking=True, device=self.device) as done:
                if producer is not None and producer is not stream:
                    stream.wait_event(done.record(producer))  # after the work that produces the value
                cuda.copy_async(self.ptr + offset, source, nbytes, kind, stream)
                done.record(stream)
                done.synchronize()  # the answer leaves only once the bytes are in the client's memory
        finally:
            if previous is not None and previous != self.device:
                cuda.ensure_device(previous)

    def row(self) -> dict[str, Any]:
        return dict(super().row(), device=self.device, offset=self.offset)


def _open(name: str, handle: bytes, device: int) -> IpcMemory:
    if not cuda.is_available():
        raise DeviceError(f"this server has no usable CUDA device ({cuda.unavailable_reason()}); register region "
                          f"{name!r} as system shared memory instead", region=name, sticky=False)
    if not 0 <= device < cuda.device_count():
        raise region_error(
            InvalidArgumentError, f"region {name!r}: the server has no CUDA device {device} (it has "
            f"{cuda.device_count()}: 0..{cuda.device_count() - 1}); name the device as the server numbers it "
            "(CUDA_VISIBLE_DEVICES may differ between the processes)", "wrong_device", field="device", device=device)
    try:
        return IpcMemory.open(handle, device)
    except ForeignDevice as exc:
        raise region_error(
            InvalidArgumentError, f"region {name!r}: the handle's memory is on CUDA device {exc.device}, not on device "
            f"{device}; register it with device = {exc.device} as the server numbers devices", "wrong_device",
            field="device", device=device, memory_device=exc.device) from None
    except cuda.CudaError as exc:
        if exc.sticky:
            raise
        raise region_error(
            InvalidArgumentError, f"region {name!r}: the driver refused the CUDA IPC handle ({exc.error_name}); send "
            "the 64 bytes of cudaIpcGetMemHandle for a live allocation of another process on this host, on a "
            "device that supports IPC", "bad_handle", field="handle", error=exc.error_name) from None

