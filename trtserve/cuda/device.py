"""Is there a usable CUDA device, and bind the calling thread to one.

``is_available()`` answers once per process and never raises: it catches a missing
cuda-python, a missing driver library (cuda-bindings raises a Python exception for that
instead of returning an error code) and a machine with zero devices, and keeps the reason
for the error message a GPU backend shows on a CPU-only machine.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from .errors import CudaError, check, describe

_probe_lock = threading.Lock()
_probed = False
_count = 0
_reason: str | None = None
_tls = threading.local()
_info_cache: dict[int, DeviceInfo] = {}
_pools_configured: set[int] = set()
_pool_lock = threading.Lock()


@dataclass(frozen=True)
class DeviceInfo:
    ordinal: int
    name: str
    compute_capability: tuple[int, int]
    multiprocessors: int


def _probe() -> None:
    global _probed, _count, _reason
    if _probed:
        return
    with _probe_lock:
        if _probed:
            return
        try:
            from ._lib import bindings

            _, runtime, _ = bindings()
            err, count = runtime.cudaGetDeviceCount()
            if int(err) != 0:
                _reason = f"cudaGetDeviceCount failed with {err.name} ({describe(err)})"
            elif count == 0:
                _reason = "the NVIDIA driver reports zero CUDA devices"
            else:
                _count = int(count)
        except ImportError as exc:
            _reason = str(exc)
        except Exception as exc:  # e.g. cuda.pathfinder's DynamicLibNotFoundError: no libcuda.so
            _reason = f"the NVIDIA driver could not be loaded ({type(exc).__name__}: {exc})"
        _probed = True


def is_available() -> bool:
    """True when cuda-python imports, the driver loads and at least one device exists."""
    _probe()
    return _count > 0


def unavailable_reason() -> str | None:
    """Why ``is_available()`` is False (None when a device is available)."""
    _probe()
    return _reason


def device_count() -> int:
    _probe()
    return _count


def require_device(ordinal: int = 0) -> None:
    """Raise a DeviceError that says why, unless device ``ordinal`` exists."""
    if not is_available():
        raise CudaError(f"no CUDA device: {unavailable_reason()}", api="runtime", error="noDevice", code=-1, sticky=False)
    if not 0 <= ordinal < _count:
        raise CudaError(
            f"CUDA device {ordinal} does not exist: this machine has {_count} device(s) (0..{_count - 1}); "
            "fix the device_id key",
            api="runtime",
            error="cudaErrorInvalidDevice",
            code=101,
            sticky=False,
        )


def current_device() -> int | None:
    """The device ``ensure_device`` made current on the calling thread, or None."""
    return getattr(_tls, "device", None)


def ensure_device(ordinal: int | None = None) -> int:
    """Make ``ordinal`` (default: this thread's device, else 0) current on the calling thread.

    Creates the primary context on first use and makes it current for the driver API too,
    so NVRTC modules and ``cuLaunchKernel`` work on any thread.  Cheap after the first call
    per thread.  Returns the ordinal.
    """
    current = getattr(_tls, "device", None)
    if ordinal is None:
        ordinal = 0 if current is None else current
    if current == ordinal:
        return ordinal
    require_device(ordinal)
    from ._lib import bindings

    driver, runtime, _ = bindings()
    check(runtime.cudaSetDevice(ordinal), f"cudaSetDevice({ordinal})")
    check(runtime.cudaFree(0), "cudaFree(0) (creating the primary context)")
    ctx = check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if int(ctx) == 0:  # a runtime that creates contexts lazily: bind the primary one ourselves
        dev = check(driver.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
        ctx = check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
        check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    _tls.device = ordinal
    return ordinal


def device_info(ordinal: int = 0) -> DeviceInfo:
    """Name, compute capability and SM count of a device (cached)."""
    info = _info_cache.get(ordinal)
    if info is not None:
        return info
    ensure_device(ordinal)
    from ._lib import bindings

    driver, runtime, _ = bindings()
    attr = runtime.cudaDeviceAttr
    major = check(runtime.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, ordinal), "cc major")
    minor = check(runtime.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, ordinal), "cc minor")
    sms = check(runtime.cudaDeviceGetAttribute(attr.cudaDevAttrMultiProcessorCount, ordinal), "SM count")
    dev = check(driver.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
    raw = check(driver.cuDeviceGetName(256, dev), "cuDeviceGetName")
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    info = DeviceInfo(ordinal, name, (int(major), int(minor)), int(sms))
    _info_cache[ordinal] = info
    return info


def configure_mempool(ordinal: int) -> None:
    """Let the device's default stream-ordered pool keep freed memory (once per device).

    The default release threshold (0) hands memory back to the OS at every synchronise,
    which turns each cudaMallocAsync after a SyncTensor wait into a real allocation.
    Servers keep their peak, as PyTorch's caching allocator does.
    """
    if ordinal in _pools_configured:
        return
    with _pool_lock:
        if ordinal in _pools_configured:
            return
        from ._lib import bindings

        driver, runtime, _ = bindings()
        pool = check(runtime.cudaDeviceGetDefaultMemPool(ordinal), "cudaDeviceGetDefaultMemPool")
        keep_all = driver.cuuint64_t(0xFFFF_FFFF_FFFF_FFFF)
        check(
            runtime.cudaMemPoolSetAttribute(pool, runtime.cudaMemPoolAttr.cudaMemPoolAttrReleaseThreshold, keep_all),
            "cudaMemPoolSetAttribute(ReleaseThreshold)",
        )
        _pools_configured.add(ordinal)
