"""CUDA error handling: ``check()``, the typed :class:`CudaError`, and the poisoned flag.

cuda-bindings never raises on a failed call: every function returns ``(err, *values)``.
``check()`` is the one place that looks at ``err``.  It knows the three result enums by
their type name (``CUresult`` from the driver, ``cudaError_t`` from the runtime,
``nvrtcResult`` from NVRTC), so this module imports nothing from cuda-python and works
(and is unit-tested) on machines without it.

Sticky errors (an illegal address, a failed launch, an ECC error, ...) corrupt the CUDA
context: every later call in the process fails with the same code.  The first one seen
marks the process *poisoned*; GPU backends then refuse new work at once with a typed error
instead of queueing it onto a dead device, and the server can report itself unhealthy.
"""
from __future__ import annotations

import threading
from typing import Any

from ..errors import DeviceError

# Driver and runtime share the numeric values of these codes (checked against
# cuda-bindings in tests/unit/test_cuda_logic.py).  After any of them the context is
# unusable until the process exits.
STICKY_CODES: dict[int, str] = {
    214: "ECC uncorrectable",
    220: "NVLink uncorrectable",
    700: "illegal address",
    702: "launch timeout",
    710: "device-side assert",
    714: "hardware stack error",
    715: "illegal instruction",
    716: "misaligned address",
    717: "invalid address space",
    718: "invalid program counter",
    719: "launch failure",
}

_API_BY_ENUM = {"CUresult": "driver", "cudaError_t": "runtime", "nvrtcResult": "nvrtc"}


class CudaError(DeviceError):
    """A failed CUDA driver, runtime or NVRTC call.

    ``details`` carries ``api`` ("driver", "runtime" or "nvrtc"), ``error`` (the enum
    name, e.g. ``cudaErrorIllegalAddress``), ``code`` (its number) and ``sticky``.  The
    constructor keeps the ``(message, **details)`` signature of the error tree so these
    errors pickle and travel on the wire like every other DeviceError.
    """

    @property
    def sticky(self) -> bool:
        return bool(self.details.get("sticky", False))

    @property
    def error_name(self) -> str:
        return str(self.details.get("error", "unknown"))

    @property
    def error_code(self) -> int:
        return int(self.details.get("code", -1))


def api_of(err: Any) -> str | None:
    """"driver", "runtime" or "nvrtc" for a cuda-bindings result enum, else None."""
    return _API_BY_ENUM.get(type(err).__name__)


def is_sticky(err: Any) -> bool:
    """Whether a driver/runtime error leaves the context unusable (NVRTC errors never do)."""
    return api_of(err) in ("driver", "runtime") and int(err) in STICKY_CODES


def describe(err: Any) -> str:
    """The library's own one-line description of an error code, or its enum name."""
    name = getattr(err, "name", str(err))
    try:
        from ._lib import bindings

        driver, runtime, nvrtc = bindings()
        api = api_of(err)
        if api == "nvrtc":
            text = nvrtc.nvrtcGetErrorString(err)[1]
        elif api == "runtime":
            text = runtime.cudaGetErrorString(err)[1]
        elif api == "driver":
            res, text = driver.cuGetErrorString(err)
            if int(res) != 0:
                return name
        else:
            return name
    except Exception:  # describing an error must never raise a second one
        return name
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


def error_for(err: Any, what: str | None = None) -> CudaError:
    """The CudaError for a failed result code; marks the process poisoned when sticky."""
    name = getattr(err, "name", str(err))
    sticky = is_sticky(err)
    where = f"{what}: " if what else ""
    message = f"{where}CUDA call failed with {name} ({describe(err)})"
    if sticky:
        message += (
            "; this error is sticky: the CUDA context of this process is unusable and every "
            "later GPU call fails. Restart the server process"
        )
    error = CudaError(message, api=api_of(err) or "unknown", error=name, code=int(err), sticky=sticky)
    if sticky:
        poison(error)
    return error


def check(result: Any, what: str | None = None) -> Any:
    """Check a cuda-bindings result ``(err, *values)`` and return the values.

    One value is returned bare, several as a tuple, none as None.  ``what`` names the
    call in the error message (e.g. ``"cudaMalloc(1048576)"``).
    """
    if isinstance(result, tuple):
        if not result:
            raise TypeError("check() got an empty tuple; pass the whole result of a cuda-bindings call")
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if api_of(err) is None:
        raise TypeError(
            f"check() expects a cuda-bindings result whose first element is CUresult, cudaError_t "
            f"or nvrtcResult, got {type(err).__name__}"
        )
    if int(err) != 0:
        raise error_for(err, what)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------- poisoning

_poison_lock = threading.Lock()
_poisoned: CudaError | None = None


def poison(error: CudaError) -> None:
    """Record the first sticky error of the process; later ones keep the first."""
    global _poisoned
    with _poison_lock:
        if _poisoned is None:
            _poisoned = error


def is_poisoned() -> bool:
    return _poisoned is not None


def poisoned_error() -> CudaError | None:
    """The sticky error that poisoned the process, if any."""
    return _poisoned


def raise_if_poisoned() -> None:
    """Refuse GPU work once the device is poisoned, naming the original error."""
    first = _poisoned
    if first is not None:
        raise CudaError(
            f"the CUDA device is unusable after an earlier sticky error ({first.error_name}: "
            f"{first.message}); no GPU work can run in this process any more. Restart the server process",
            api=first.details.get("api", "unknown"),
            error=first.error_name,
            code=first.error_code,
            sticky=True,
            poisoned=True,
        )
