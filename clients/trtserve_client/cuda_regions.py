"""CUDA shared memory, the client's side: device memory the server maps through CUDA IPC.

Needs cuda-python (``pip install cuda-bindings``), imported only when a CUDA region is made.
``CudaSharedMemory`` allocates device memory (or takes yours: an address, or any object with
``__cuda_array_interface__`` such as a torch tensor), exports the allocation with
``cudaIpcGetMemHandle``, and registers handle, device and offset with the server, which
maps it on the same GPU.

Ordering, the client's part: finish writing an input region before sending the request
(``write`` does; after writing with your own stream, synchronise it first, e.g.
``torch.cuda.current_stream().synchronize()``), and leave the region alone until the answer
is in.  The server's part: when ``infer`` returns, the outputs it wrote are complete in
device memory, so any stream may read them at once.  An owned allocation is freed by
``close()``, which the client calls only after the server has let go of the region.
"""
from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np

from .errors import DeviceError, InvalidArgumentError
from .regions import Region

HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


def _bindings() -> tuple[Any, Any]:
    """(driver, runtime) of cuda-python: ``cuda.bindings`` (12.6+), else the older layout."""
    try:
        from cuda.bindings import driver, runtime
    except ImportError:
        try:
            from cuda import cuda as driver
            from cuda import cudart as runtime
        except ImportError:
            raise DeviceError("CUDA shared memory needs cuda-python: pip install cuda-bindings") from None
    return driver, runtime


def _check(result: Any, what: str) -> Any:
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise DeviceError(f"{what} failed with {getattr(err, 'name', err)}", call=what, error=getattr(err, "name", str(err)))
    return values[0] if len(values) == 1 else values


class DeviceView:
    """A C-contiguous array in device memory (``__cuda_array_interface__`` v3, no stream:
    its data is complete).  ``torch.as_tensor(view, device="cuda")`` and ``cupy.asarray(view)``
    read it in place; ``to_host()`` copies it out."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype, device: int, owner: Any) -> None:
        self.ptr, self.shape, self.dtype, self.device, self.owner = ptr, tuple(shape), np.dtype(dtype), device, owner

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3, "strides": None}

    def to_host(self) -> np.ndarray:
        _, runtime = _bindings()
        out = np.empty(self.shape, self.dtype)
        _check(runtime.cudaSetDevice(self.device), "cudaSetDevice")
        if self.nbytes:
            _check(runtime.cudaMemcpy(out.ctypes.data, self.ptr, self.nbytes, runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost),
                   "cudaMemcpy (device to host)")
        return out

    def __repr__(self) -> str:
        return f"DeviceView(shape={self.shape}, dtype={self.dtype}, ptr=0x{self.ptr:x}, device={self.device})"


class CudaSharedMemory(Region):
    """``byte_size`` bytes of device memory on ``device``, shared with the server.  Without
    ``memory`` they are allocated here (cudaMalloc) and freed by ``close()``; with ``memory``
    (a device address or an object with ``__cuda_array_interface__``) they are yours."""

    kind = "cuda"

    def __init__(self, name: str, byte_size: int, device: int = 0, memory: Any = None) -> None:
        super().__init__(name, byte_size)
        driver, runtime = _bindings()
        self.device, self.owned, self.memory = int(device), memory is None, memory
        _check(runtime.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        if memory is None:
            self.ptr = int(_check(runtime.cudaMalloc(byte_size), f"cudaMalloc({byte_size})"))
        else:
            self.ptr = int(memory) if isinstance(memory, int) else int(memory.__cuda_array_interface__["data"][0])
        try:
            # A handle exports a whole allocation: send where this region starts in it.
            base, size = _check(driver.cuMemGetAddressRange(self.ptr), "cuMemGetAddressRange")
            self.offset = self.ptr - int(base)
            if self.offset + byte_size > int(size):
                raise InvalidArgumentError(f"region {name!r}: {byte_size} bytes from 0x{self.ptr:x} run past the end "
                                           f"of their allocation ({int(size) - self.offset} bytes left)", field="byte_size")
            handle = _check(runtime.cudaIpcGetMemHandle(int(base)), "cudaIpcGetMemHandle")
            self.handle = ctypes.string_at(handle.getPtr(), HANDLE_BYTES)
        except BaseException:
            self.close()
            raise

    def device_array(self, shape: Any, dtype: Any, offset: int = 0) -> DeviceView:
        """A view of the region, e.g. to fill with your own kernels before ``tensor(...)``."""
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        self._span(offset, math.prod(shape) * dtype.itemsize)
        return DeviceView(self.ptr + offset, shape, dtype, self.device, self)

    def write(self, value: Any, offset: int = 0) -> dict[str, Any]:
        """Copy a numpy array (or a device array) into the region and wait for the copy;
        returns its input value."""
        _, runtime = _bindings()
        kinds = runtime.cudaMemcpyKind
        if hasattr(value, "__cuda_array_interface__"):
            cai = value.__cuda_array_interface__
            if cai.get("strides") is not None:
                raise InvalidArgumentError("write() takes C-contiguous device arrays only", field="value")
            shape, dtype, source, kind = tuple(cai["shape"]), np.dtype(cai["typestr"]), int(cai["data"][0]), kinds.cudaMemcpyDeviceToDevice
        else:
            host = np.ascontiguousarray(value, dtype=np.asarray(value).dtype.newbyteorder("<"))
            shape, dtype, source, kind = host.shape, host.dtype, host.ctypes.data, kinds.cudaMemcpyHostToDevice
        ref = self.tensor(shape, dtype, offset)
        nbytes = ref["shm"]["byte_size"]
        _check(runtime.cudaSetDevice(self.device), "cudaSetDevice")
        if nbytes:
            _check(runtime.cudaMemcpy(self.ptr + offset, source, nbytes, kind), "cudaMemcpy into the region")
            _check(runtime.cudaStreamSynchronize(0), "cudaStreamSynchronize")  # device-to-device returns early
        return ref

    def output(self, obj: dict[str, Any], where: str) -> DeviceView:
        np_dtype, offset, size = self._layout(obj, where)
        if np_dtype is None:  # raw bytes: a view of them as uint8
            return DeviceView(self.ptr + offset, (size,), np.dtype(np.uint8), self.device, self)
        return DeviceView(self.ptr + offset, tuple(obj["shape"]), np_dtype, self.device, self)

    def registration(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "cuda", "handle": self.handle, "device": self.device, "offset": self.offset,
                "byte_size": self.byte_size}

    def close(self) -> None:
        if self.owned and self.ptr:
            _, runtime = _bindings()
            ptr, self.ptr = self.ptr, 0
            _check(runtime.cudaFree(ptr), "cudaFree")

    def __repr__(self) -> str:
        return f"CudaSharedMemory({self.name!r}, {self.byte_size}, device={self.device}, ptr=0x{self.ptr:x})"
