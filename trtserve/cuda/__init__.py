"""A thin, checked layer over cuda-python (cuda-bindings) for trtserve's GPU backends.

Importing this package touches neither cuda-python nor the driver: everything is loaded
on first use, so CPU-only machines import it freely and ``is_available()`` says False.

* errors: ``check(result)``, ``CudaError`` (a DeviceError, ``.sticky``), the poisoned flag
* device: ``is_available()``, ``unavailable_reason()``, ``ensure_device()``, ``current_device()``,
  ``device_info()``
* ipc: ``IpcMemory`` (CUDA IPC handles of other processes), ``export_handle()``; import it
  as ``trtserve.cuda.ipc``
* runtime: ``Stream``, ``Event``, ``PinnedBuffer``, ``DeviceBuffer``, ``current_stream()``,
  ``use_stream()``, ``set_current_stream()``, ``copy_async()``
* array: ``DeviceArray`` (``__cuda_array_interface__`` v3), ``HostStaging``, ``to_device()``,
  ``to_host()``
* nvrtc: ``compile_kernel(source, name, options) -> Kernel`` with ``Kernel.launch(...)``
"""
from .array import DeviceArray, HostStaging, cuda_array_interface, to_device, to_host
from .device import (
    DeviceInfo,
    current_device,
    device_count,
    device_info,
    ensure_device,
    is_available,
    require_device,
    unavailable_reason,
)
from .errors import STICKY_CODES, CudaError, check, is_poisoned, is_sticky, poisoned_error, raise_if_poisoned
from .nvrtc import Kernel, compile_kernel, kernel_cache_key
from .runtime import (
    DeviceBuffer,
    Event,
    PinnedBuffer,
    Stream,
    copy_async,
    current_stream,
    set_current_stream,
    use_stream,
)

__all__ = [
    "STICKY_CODES",
    "CudaError",
    "DeviceArray",
    "DeviceBuffer",
    "DeviceInfo",
    "Event",
    "HostStaging",
    "Kernel",
    "PinnedBuffer",
    "Stream",
    "check",
    "compile_kernel",
    "copy_async",
    "cuda_array_interface",
    "current_device",
    "current_stream",
    "device_count",
    "device_info",
    "ensure_device",
    "is_available",
    "is_poisoned",
    "is_sticky",
    "kernel_cache_key",
    "poisoned_error",
    "raise_if_poisoned",
    "require_device",
    "set_current_stream",
    "to_device",
    "to_host",
    "unavailable_reason",
    "use_stream",
]
