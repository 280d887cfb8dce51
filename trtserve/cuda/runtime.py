"""Streams, events, pinned and device buffers, and the thread's current stream.

Every object owns one CUDA handle and releases it exactly once: ``close()`` is idempotent,
each class is a context manager, and a forgotten object is released when collected.  The
collection path never raises (it runs on whatever thread dropped the last reference) and
is skipped at interpreter exit and once the process is poisoned, when the driver frees
everything anyway and a call into a dead context would only fail.

GPU backends never pick a stream themselves: they enqueue on ``current_stream()``, which
SyncTensor sets on its instance thread (``use_stream`` / ``set_current_stream``).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from ._lib import bindings
from .device import configure_mempool, ensure_device
from .errors import CudaError, check, is_poisoned

log = logging.getLogger("trtserve.cuda")
_tls = threading.local()


class _Resource:
    """Idempotent close, context manager, and a quiet release when garbage collected."""

    _finalizer: weakref.finalize | None = None

    def _track(self, release, *args: Any) -> None:
        self._finalizer = weakref.finalize(self, _release_quietly, release, args)
        self._finalizer.atexit = False  # the driver frees everything at exit; calls may fail then

    @property
    def closed(self) -> bool:
        return self._finalizer is None or not self._finalizer.alive

    def close(self) -> None:
        finalizer = self._finalizer
        detached = finalizer.detach() if finalizer is not None else None
        if detached is not None and not is_poisoned():
            release, args = detached[2]
            release(*args)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _release_quietly(release, args) -> None:
    if is_poisoned():
        return
    try:
        release(*args)
    except CudaError as exc:  # sticky ones already poisoned the process in check()
        log.warning("releasing a CUDA resource on collection failed: %s", exc.message)
    except Exception:
        log.exception("releasing a CUDA resource on collection failed")


# --------------------------------------------------------------------------- streams


class Stream(_Resource):
    """A CUDA stream; non-blocking by default so it never serialises with the legacy stream."""

    def __init__(self, *, non_blocking: bool = True, priority: int = 0, device: int | None = None) -> None:
        self.device = ensure_device(device)
        _, runtime, _ = bindings()
        flags = runtime.cudaStreamNonBlocking if non_blocking else runtime.cudaStreamDefault
        self.raw = check(runtime.cudaStreamCreateWithPriority(flags, priority), "cudaStreamCreateWithPriority")
        self.handle = int(self.raw)  # the cudaStream_t value, for torch.cuda.ExternalStream and friends
        self.non_blocking = non_blocking
        self._track(_destroy_stream, self.raw)

    def synchronize(self) -> None:
        """Block until the stream's work is done (prefer a blocking-sync Event: no spinning)."""
        _, runtime, _ = bindings()
        check(runtime.cudaStreamSynchronize(self.raw), "cudaStreamSynchronize")

    def query(self) -> bool:
        """True when all work enqueued so far has finished."""
        _, runtime, _ = bindings()
        err = runtime.cudaStreamQuery(self.raw)[0]
        if err == runtime.cudaError_t.cudaErrorNotReady:
            return False
        check((err,), "cudaStreamQuery")
        return True

    def wait_event(self, event: Event) -> None:
        """Make later work on this stream wait for ``event`` (no host blocking)."""
        _, runtime, _ = bindings()
        check(runtime.cudaStreamWaitEvent(self.raw, event.raw, 0), "cudaStreamWaitEvent")

    def __repr__(self) -> str:
        return f"Stream(handle=0x{self.handle:x}, device={self.device}{', closed' if self.closed else ''})"


def _destroy_stream(raw) -> None:
    _, runtime, _ = bindings()
    check(runtime.cudaStreamDestroy(raw), "cudaStreamDestroy")


def current_stream() -> Stream | None:
    """The calling thread's current stream (set by SyncTensor on its instance thread)."""
    return getattr(_tls, "stream", None)


def set_current_stream(stream: Stream | None) -> None:
    """Make ``stream`` current on the calling thread until changed (SyncTensor's init)."""
    _tls.stream = stream


@contextlib.contextmanager
def use_stream(stream: Stream | None) -> Iterator[Stream | None]:
    """Make ``stream`` current on this thread inside the block; restores the previous one."""
    previous = getattr(_tls, "stream", None)
    _tls.stream = stream
    try:
        yield stream
    finally:
        _tls.stream = previous


def stream_handle(stream: Stream | None) -> Any:
    """What to pass to cuda-bindings for ``stream``; None means the current one, else legacy 0."""
    stream = stream if stream is not None else current_stream()
    return stream.raw if stream is not None else 0


# --------------------------------------------------------------------------- events


class Event(_Resource):
    """A CUDA event.  Blocking-sync by default, so ``synchronize()`` sleeps instead of spinning
    a core (N instances waiting would otherwise burn N cores); timing only when asked for."""

    def __init__(self, *, blocking: bool = True, timing: bool = False, device: int | None = None) -> None:
        self.device = ensure_device(device)
        _, runtime, _ = bindings()
        flags = runtime.cudaEventDefault
        if blocking:
            flags |= runtime.cudaEventBlockingSync
        if not timing:
            flags |= runtime.cudaEventDisableTiming  # cheaper record and wait
        self.raw = check(runtime.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
        self.blocking, self.timing = blocking, timing
        self._track(_destroy_event, self.raw)

    def record(self, stream: Stream | None = None) -> Event:
        """Record on ``stream`` (default: the current stream, else the legacy stream)."""
        _, runtime, _ = bindings()
        check(runtime.cudaEventRecord(self.raw, stream_handle(stream)), "cudaEventRecord")
        return self

    def synchronize(self) -> None:
        """Wait for the recorded work; async errors of that work surface here."""
        _, runtime, _ = bindings()
        check(runtime.cudaEventSynchronize(self.raw), "cudaEventSynchronize")

    def query(self) -> bool:
        _, runtime, _ = bindings()
        err = runtime.cudaEventQuery(self.raw)[0]
        if err == runtime.cudaError_t.cudaErrorNotReady:
            return False
        check((err,), "cudaEventQuery")
        return True

    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to ``end`` (both recorded, completed, timing=True)."""
        if not (self.timing and end.timing):
            raise ValueError("elapsed_ms needs two events created with Event(timing=True)")
        _, runtime, _ = bindings()
        return float(check(runtime.cudaEventElapsedTime(self.raw, end.raw), "cudaEventElapsedTime"))


def _destroy_event(raw) -> None:
    _, runtime, _ = bindings()
    check(runtime.cudaEventDestroy(raw), "cudaEventDestroy")


# --------------------------------------------------------------------------- buffers


class PinnedBuffer(_Resource):
    """Page-locked host memory (cudaMallocHost): async copies from it do not block the caller
    and run at full link speed; from pageable memory cudaMemcpyAsync is synchronous."""

    def __init__(self, nbytes: int, device: int | None = None) -> None:
        if nbytes < 0:
            raise ValueError(f"PinnedBuffer size must be >= 0, got {nbytes}")
        self.device = ensure_device(device)
        self.nbytes = int(nbytes)
        self.ptr = 0
        if self.nbytes:
            _, runtime, _ = bindings()
            self.ptr = int(check(runtime.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        self._track(_free_host, self.ptr)

    def as_numpy(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A numpy view of the buffer (no copy).  Valid until close(); the view keeps the
        buffer from being collected."""
        dtype = np.dtype(dtype)
        count = self.nbytes // dtype.itemsize if shape is None else math.prod(shape)
        if count * dtype.itemsize > self.nbytes:
            raise ValueError(f"{count} x {dtype} ({count * dtype.itemsize} bytes) does not fit in {self.nbytes} bytes")
        if self.closed:
            raise ValueError("PinnedBuffer is closed")
        if count == 0:
            return np.empty(shape if shape is not None else (0,), dtype)
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(self.ptr)
        raw.owner = self  # the view's base keeps this buffer alive
        view = np.frombuffer(raw, dtype=dtype, count=count)
        return view.reshape(shape) if shape is not None else view


def _free_host(ptr: int) -> None:
    if ptr:
        _, runtime, _ = bindings()
        check(runtime.cudaFreeHost(ptr), "cudaFreeHost")


class DeviceBuffer(_Resource):
    """Device memory.  With ``stream``, allocated stream-ordered (cudaMallocAsync from the
    device's pool: cheap enough per batch); otherwise with cudaMalloc.

    A stream-ordered buffer is freed on the *freeing* thread's current stream (else the
    legacy stream): work that may still read it was enqueued by that thread on that stream,
    and SyncTensor has already waited for everything other streams did with it.
    """

    def __init__(self, nbytes: int, stream: Stream | None = None, device: int | None = None) -> None:
        if nbytes < 0:
            raise ValueError(f"DeviceBuffer size must be >= 0, got {nbytes}")
        self.device = ensure_device(stream.device if stream is not None else device)
        self.nbytes = int(nbytes)
        self.stream_ordered = stream is not None
        self.ptr = 0
        _, runtime, _ = bindings()
        if self.nbytes and stream is not None:
            configure_mempool(self.device)
            self.ptr = int(check(runtime.cudaMallocAsync(self.nbytes, stream.raw), f"cudaMallocAsync({self.nbytes})"))
        elif self.nbytes:
            self.ptr = int(check(runtime.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))
        self._track(_free_device, self.ptr, self.device, self.stream_ordered)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3, "strides": None}


def _free_device(ptr: int, device: int, stream_ordered: bool) -> None:
    if not ptr:
        return
    _, runtime, _ = bindings()
    ensure_device(device)
    if stream_ordered:
        stream = current_stream()
        handle = stream.raw if stream is not None and stream.device == device and not stream.closed else 0
        check(runtime.cudaFreeAsync(ptr, handle), "cudaFreeAsync")
    else:
        check(runtime.cudaFree(ptr), "cudaFree")


# --------------------------------------------------------------------------- copies

_KINDS = {"htod": "cudaMemcpyHostToDevice", "dtoh": "cudaMemcpyDeviceToHost", "dtod": "cudaMemcpyDeviceToDevice"}


def copy_async(dst: int, src: int, nbytes: int, kind: str, stream: Stream | None = None) -> None:
    """cudaMemcpyAsync between raw addresses; ``kind`` is "htod", "dtoh" or "dtod".

    From or to pageable host memory the call is synchronous with the host (the driver
    stages it); use a PinnedBuffer on hot paths.
    """
    if nbytes == 0:
        return
    _, runtime, _ = bindings()
    check(
        runtime.cudaMemcpyAsync(dst, src, nbytes, getattr(runtime.cudaMemcpyKind, _KINDS[kind]), stream_handle(stream)),
        f"cudaMemcpyAsync({kind}, {nbytes} bytes)",
    )
