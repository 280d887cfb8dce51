"""Run-time compiled CUDA kernels: NVRTC to a cubin for the device's own architecture,
loaded with the driver API and launched on a stream.

Compiled kernels are cached per process and device: the key is the source, the kernel
name, the options, and the device ordinal and compute capability, so every instance of a
backend shares one module and only the first instance pays the compile (~100 ms).  Modules
live until the process exits, as their functions may be enqueued at any time.
"""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

from ._lib import bindings
from .device import device_info, ensure_device
from .errors import CudaError, check
from .runtime import Stream, stream_handle

BASE_OPTIONS: tuple[str, ...] = ("--std=c++17",)  # IEEE float: kernels must match CPU references

_cache: dict[tuple, Kernel] = {}
_cache_lock = threading.Lock()


def kernel_cache_key(
    source: str, name: str, options: Sequence[str], device: int, compute_capability: tuple[int, int]
) -> tuple:
    """What makes two compiled kernels interchangeable within one process."""
    return (source, name, tuple(options), int(device), tuple(compute_capability))


def arch_option(compute_capability: tuple[int, int], supported: Sequence[int]) -> tuple[str, bool]:
    """The ``--gpu-architecture`` option and whether it yields a cubin (else PTX).

    The device's real architecture (``sm_90`` on an H100) when this NVRTC knows it, so the
    driver loads machine code with no JIT; a device newer than NVRTC gets PTX for the
    newest architecture NVRTC knows, which the driver compiles forward at load.
    """
    cc = compute_capability[0] * 10 + compute_capability[1]
    if cc in supported:
        return f"--gpu-architecture=sm_{cc}", True
    older = [a for a in supported if a <= cc]
    if not older:
        raise ValueError(f"NVRTC supports architectures {list(supported)}, none usable for compute capability {cc}")
    return f"--gpu-architecture=compute_{max(older)}", False


class Kernel:
    """A loaded ``extern "C" __global__`` function."""

    def __init__(self, name: str, module: Any, function: Any, device: int) -> None:
        self.name, self.module, self.function, self.device = name, module, function, device

    def launch(
        self,
        grid: int | Sequence[int],
        block: int | Sequence[int],
        args: Sequence[Any],
        stream: Stream | None = None,
        shared_mem: int = 0,
    ) -> None:
        """Enqueue on ``stream`` (default: the current stream).

        ``args`` are ctypes scalars (``ctypes.c_int32(n)``, ``ctypes.c_float(x)``: the C type
        must be explicit), or device memory (DeviceArray, DeviceBuffer, anything with
        ``__cuda_array_interface__``), passed as a pointer.
        """
        driver, _, _ = bindings()
        gx, gy, gz = _dims(grid, "grid")
        bx, by, bz = _dims(block, "block")
        params = [_param(a, i, self.name) for i, a in enumerate(args)]
        pointers = (ctypes.c_void_p * max(len(params), 1))(*[ctypes.addressof(p) for p in params])
        # cuLaunchKernel copies the parameter values before returning, so the ctypes
        # objects only need to live through this call.
        check(
            driver.cuLaunchKernel(
                self.function, gx, gy, gz, bx, by, bz, int(shared_mem), stream_handle(stream), ctypes.addressof(pointers), 0
            ),
            f"cuLaunchKernel({self.name}, grid=({gx},{gy},{gz}), block=({bx},{by},{bz}))",
        )

    def __repr__(self) -> str:
        return f"Kernel({self.name!r}, device={self.device})"


def _dims(value: int | Sequence[int], what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{what} must be a positive int or 1-3 positive ints, got {value!r}")
    return tuple(dims) + (1,) * (3 - len(dims))  # type: ignore[return-value]


def _param(arg: Any, index: int, kernel: str) -> ctypes._SimpleCData:
    if isinstance(arg, ctypes._SimpleCData):
        return arg
    ptr = getattr(arg, "ptr", None)  # DeviceArray / DeviceBuffer: skip building the whole interface dict
    if isinstance(ptr, int):
        return ctypes.c_void_p(ptr)
    if hasattr(arg, "__cuda_array_interface__"):
        return ctypes.c_void_p(int(arg.__cuda_array_interface__["data"][0]))
    raise TypeError(
        f"{kernel}: argument #{index} is {type(arg).__name__}; pass ctypes scalars that name the C type "
        "(ctypes.c_int32, ctypes.c_float, ctypes.c_double, ...) or device arrays"
    )


def compile_kernel(source: str, name: str, options: Sequence[str] = (), device: int | None = None) -> Kernel:
    """Compile ``source`` and return its kernel ``name`` for ``device`` (cached)."""
    ordinal = ensure_device(device)
    cc = device_info(ordinal).compute_capability
    key = kernel_cache_key(source, name, options, ordinal, cc)
    kernel = _cache.get(key)
    if kernel is not None:
        return kernel
    with _cache_lock:  # compile once even when several instances start together
        kernel = _cache.get(key)
        if kernel is None:
            kernel = _cache[key] = _build(source, name, tuple(options), ordinal, cc)
    return kernel


def _build(source: str, name: str, options: tuple[str, ...], ordinal: int, cc: tuple[int, int]) -> Kernel:
    driver, _, nvrtc = bindings()
    supported = check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    arch, _ = arch_option(cc, [int(a) for a in supported])
    image = compile_to_image(source, name, options, arch)
    module = check(driver.cuModuleLoadData(image), f"cuModuleLoadData({name})")
    function = check(driver.cuModuleGetFunction(module, name.encode()), f"cuModuleGetFunction({name})")
    return Kernel(name, module, function, ordinal)


def compile_to_image(source: str, name: str, options: Sequence[str], arch: str) -> bytes:
    """NVRTC only (no device needed): a cubin for ``--gpu-architecture=sm_XX``, PTX for
    ``compute_XX``.  Raises CudaError with the compiler log on a compile error."""
    _, _, nvrtc = bindings()
    program = check(nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in (arch,) + BASE_OPTIONS + tuple(options)]
        err = nvrtc.nvrtcCompileProgram(program, len(opts), opts)[0]
        if int(err) != 0:
            raise _compile_error(program, err, name, opts)
        if "=sm_" in arch:
            size = check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
            image = b" " * size
            check(nvrtc.nvrtcGetCUBIN(program, image), "nvrtcGetCUBIN")
        else:
            size = check(nvrtc.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
            image = b" " * size
            check(nvrtc.nvrtcGetPTX(program, image), "nvrtcGetPTX")
    finally:
        check(nvrtc.nvrtcDestroyProgram(program), "nvrtcDestroyProgram")
    return image


def _compile_error(program: Any, err: Any, name: str, opts: list[bytes]) -> CudaError:
    _, _, nvrtc = bindings()
    log = ""
    try:
        size = check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
        buf = b" " * size
        check(nvrtc.nvrtcGetProgramLog(program, buf), "nvrtcGetProgramLog")
        log = buf.rstrip(b"\0 ").decode(errors="replace")
    except CudaError as exc:
        log = f"(no compiler log: {exc.message})"
    options = " ".join(o.decode() for o in opts)
    return CudaError(
        f"NVRTC could not compile kernel {name!r} with options [{options}]: {err.name}\n{log}",
        api="nvrtc",
        error=err.name,
        code=int(err),
        sticky=False,
        log=log,
    )
