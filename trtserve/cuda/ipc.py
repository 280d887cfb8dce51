"""CUDA IPC: device memory another process on this host exported with cudaIpcGetMemHandle.

``IpcMemory.open(handle, device)`` maps the allocation behind a 64-byte
``cudaIpcMemHandle_t`` into this process and checks, before anything reads or writes it,
that the memory lives on ``device`` and how large the whole allocation is, so a caller can
refuse offsets past its end instead of faulting the device (an illegal address is sticky:
it would poison every GPU model of the process).

The mapping is closed (cudaIpcCloseMemHandle) exactly once: by ``close()``, or when the
object is collected.  Views of it (DeviceArrays whose ``owner`` is the IpcMemory) keep it
open, so memory a running batch reads is never unmapped under it.
"""
from __future__ import annotations

import ctypes

from ._lib import bindings
from .device import current_device, ensure_device
from .errors import CudaError, check
from .runtime import _Resource

HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


class ForeignDevice(Exception):
    """The handle's memory lives on another device than the one asked for."""

    def __init__(self, device: int) -> None:
        super().__init__(f"the memory lives on device {device}")
        self.device = device


def handle_struct(handle: bytes):
    """A cudaIpcMemHandle_t holding ``handle``.  Through its address: cuda-bindings 13 has no
    accessor for the struct's bytes, 12.x names it ``reserved``."""
    _, runtime, _ = bindings()
    raw = runtime.cudaIpcMemHandle_t()
    ctypes.memmove(raw.getPtr(), bytes(handle), HANDLE_BYTES)
    return raw


def handle_bytes(raw) -> bytes:
    """The 64 bytes of a cudaIpcMemHandle_t, to send to another process."""
    return ctypes.string_at(raw.getPtr(), HANDLE_BYTES)


def export_handle(ptr: int) -> bytes:
    """cudaIpcGetMemHandle of the allocation that starts at ``ptr``, as bytes."""
    _, runtime, _ = bindings()
    return handle_bytes(check(runtime.cudaIpcGetMemHandle(ptr), "cudaIpcGetMemHandle"))


class IpcMemory(_Resource):
    """An allocation of another process, mapped here: ``ptr``, ``nbytes`` (the whole
    allocation), and ``device``, the ordinal its memory lives on."""

    def __init__(self, ptr: int, nbytes: int, device: int) -> None:
        self.ptr, self.nbytes, self.device = ptr, nbytes, device
        self._track(_close_handle, ptr, device)

    @classmethod
    def open(cls, handle: bytes, device: int) -> IpcMemory:
        """Map ``handle`` on ``device``.  CudaError when the driver refuses the handle;
        ForeignDevice (naming the device the memory is on) when it belongs to another one."""
        if len(handle) != HANDLE_BYTES:
            raise ValueError(f"a cudaIpcMemHandle_t has {HANDLE_BYTES} bytes, got {len(handle)}")
        previous = current_device()
        ensure_device(device)
        try:
            driver, runtime, _ = bindings()
            ptr = int(check(runtime.cudaIpcOpenMemHandle(handle_struct(handle), runtime.cudaIpcMemLazyEnablePeerAccess),
                            "cudaIpcOpenMemHandle"))
            memory = cls(ptr, 0, device)  # closes the handle if a check below fails
            owner = int(check(runtime.cudaPointerGetAttributes(ptr), "cudaPointerGetAttributes").device)
            if owner != device:
                memory.close()
                raise ForeignDevice(owner)
            _, size = check(driver.cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
            memory.nbytes = int(size)
            return memory
        finally:
            if previous is not None and previous != device:
                ensure_device(previous)

    def __repr__(self) -> str:
        return f"IpcMemory(ptr=0x{self.ptr:x}, nbytes={self.nbytes}, device={self.device})"


def _close_handle(ptr: int, device: int) -> None:
    _, runtime, _ = bindings()
    previous = current_device()
    ensure_device(device)
    try:
        check(runtime.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")
    finally:
        if previous is not None and previous != device:
            ensure_device(previous)


__all__ = ["HANDLE_BYTES", "CudaError", "ForeignDevice", "IpcMemory", "export_handle", "handle_bytes", "handle_struct"]
