"""One execution context with its buffers: the GPU half of TensorrtTensor.

Written to the TensorRT 10 name-based API (set_input_shape, infer_shapes,
set_tensor_address, execute_async_v3); every call that reports failure through its return
value is checked.  The tests run it against an emulated runtime, on the CPU and on a GPU;
docs/tensorrt.md says what is tested with a real engine and what is not.

Buffers are sized once, at init, for the profile's largest shapes: device buffers for every
tensor (their addresses are bound to the context once, since they never move) and pinned
host buffers to stage inputs and outputs (async copies from pageable memory block the
caller).  A batch then costs: rows copied into pinned memory, one H2D copy per run of host
items (device items are copied device to device), one enqueue, one D2H copy per output, and
one blocking-sync event wait.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from ..backends.stacking import Prepared
from ..errors import BackendError, ConfigError, ModelUnavailableError
from .io import EngineIO
from .items import Bounds, DeviceInput
from .module import logger, quote_errors

if TYPE_CHECKING:
    from ..cuda import DeviceBuffer, Event, PinnedBuffer, Stream


class _Closable(Protocol):
    def close(self) -> None: ...


_Owned = TypeVar("_Owned", bound=_Closable)


class EngineRunner:
    """An IExecutionContext over ``engine``, bound to buffers for ``max_rows`` rows."""

    def __init__(self, trt: ModuleType, engine: Any, io: EngineIO, min_rows: int, max_rows: int, where: str) -> None:
        from .. import cuda

        self.cuda, self.trt, self.engine, self.io, self.where = cuda, trt, engine, io, where
        self._closers: list[_Closable] = []
        self.context: Any = None  # TensorRT's IExecutionContext (TensorRT ships no type information)
        try:
            self._setup(min_rows, max_rows)
        except BaseException:
            self.close()  # the scheduler never calls close() after a failed init
            raise

    def _setup(self, min_rows: int, max_rows: int) -> None:
        cuda, engine, io, where = self.cuda, self.engine, self.io, self.where
        stream = cuda.current_stream()  # SyncTensor's, when it wraps us
        if stream is None:
            stream = self._own(cuda.Stream())  # alone in a node: our own, never the legacy stream
        self.stream: Stream = stream
        with logger(self.trt).capture() as errors:
            self.context = engine.create_execution_context()
        if self.context is None:
            raise ModelUnavailableError(f"{where}: TensorRT could not create an execution context: {quote_errors(errors)}")
        self.bounds: list[Bounds] = [self._bounds(t, min_rows, max_rows) for t in io.inputs]
        self._set_shapes({b.tensor.name: b.hi for b in self.bounds}, "the profile's largest shapes", ModelUnavailableError)
        self.capacity: dict[str, int] = {}
        self.device: dict[str, DeviceBuffer] = {}
        self.pinned: dict[str, PinnedBuffer] = {}
        for tensor in io.inputs + io.outputs:
            shape = self._context_shape(tensor.name)
            nbytes = math.prod(shape) * np.dtype(tensor.dtype).itemsize
            self.capacity[tensor.name] = nbytes
            self.device[tensor.name] = self._own(cuda.DeviceBuffer(nbytes))
            self.pinned[tensor.name] = self._own(cuda.PinnedBuffer(nbytes))
            if not self.context.set_tensor_address(tensor.name, self.device[tensor.name].ptr):
                raise ModelUnavailableError(f"{where}: set_tensor_address({tensor.name!r}) was refused")
        self.done: Event = self._own(cuda.Event(blocking=True))  # waits sleep instead of spinning a core
        self.producer_ready: Event = self._own(cuda.Event(blocking=False))

    def _own(self, resource: _Owned) -> _Owned:
        self._closers.append(resource)
        return resource

    def _bounds(self, tensor: Any, min_rows: int, max_rows: int) -> Bounds:
        """The profile-0 range of an input, narrowed to the node's batch range."""
        shape = tuple(self.engine.get_tensor_shape(tensor.name))
        if -1 not in shape:
            lo, hi = shape, shape
        else:
            lo, _opt, hi = (tuple(d) for d in self.engine.get_tensor_profile_shape(tensor.name, 0))
        if not lo[0] <= min_rows <= max_rows <= hi[0]:
            raise ConfigError(
                f"{self.where}: the node's batch range min={min_rows} max={max_rows} is outside the engine's "
                f"range {lo[0]}..{hi[0]} for input {tensor.name!r}; set min and max within it (or use the "
                "ONNX model so trtserve builds an engine for the range you ask for)",
                key="max",
                value=max_rows,
            )
        return Bounds(tensor, (min_rows,) + lo[1:], (max_rows,) + hi[1:])

    def _set_shapes(self, shapes: dict[str, tuple[int, ...]], what: str, error: type = BackendError) -> None:
        trt_logger = logger(self.trt)
        with trt_logger.capture() as errors:
            for name, shape in shapes.items():
                if not self.context.set_input_shape(name, shape):
                    raise error(f"{self.where}: set_input_shape({name!r}, {list(shape)}) for {what} was refused: {quote_errors(errors)}")
            missing = self.context.infer_shapes()
        if missing:
            raise error(f"{self.where}: TensorRT cannot infer shapes for {what}; unspecified tensors: {missing} ({quote_errors(errors)})")

    def _context_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise ConfigError(
                f"{self.where}: tensor {name!r} has shape {list(shape)} even with every input shape set; "
                "its size depends on the data, which TensorrtTensor does not serve (it sizes outputs once)",
                tensor=name,
            )
        return shape

    # -- one execution -----------------------------------------------------------------
    def run(self, group: list[Prepared]) -> dict[str, np.ndarray]:
        """Execute a group of items that share their non-batch shapes; outputs as views of
        the pinned buffers, valid until the next run."""
        self.cuda.raise_if_poisoned()
        stream = self.cuda.current_stream() or self.stream
        total = sum(p.rows for p in group)
        shapes = {t.name: (total,) + tuple(group[0].arrays[t.name].shape[1:]) for t in self.io.inputs}
        self._set_shapes(shapes, f"a batch of {total} rows")
        for tensor in self.io.inputs:
            self._stage_input(tensor.name, np.dtype(tensor.dtype), [p.arrays[tensor.name] for p in group], stream)
        out_shapes = {t.name: self._context_shape(t.name) for t in self.io.outputs}
        for tensor in self.io.outputs:
            nbytes = math.prod(out_shapes[tensor.name]) * np.dtype(tensor.dtype).itemsize
            if nbytes > self.capacity[tensor.name]:
                raise BackendError(f"{self.where}: output {tensor.name!r} needs {nbytes} bytes, its buffer holds {self.capacity[tensor.name]}")
        with logger(self.trt).capture() as errors:
            enqueued = self.context.execute_async_v3(stream.handle)
        if not enqueued:
            # A sticky CUDA error behind the failure surfaces (typed, poisoning) on this wait.
            self.done.record(stream)
            self.done.synchronize()
            raise BackendError(f"{self.where}: execute_async_v3 failed for a batch of {total} rows: {quote_errors(errors)}")
        results = {}
        for tensor in self.io.outputs:
            dtype = np.dtype(tensor.dtype)
            nbytes = math.prod(out_shapes[tensor.name]) * dtype.itemsize
            self.cuda.copy_async(self.pinned[tensor.name].ptr, self.device[tensor.name].ptr, nbytes, "dtoh", stream)
            results[tensor.name] = self.pinned[tensor.name].as_numpy(dtype, out_shapes[tensor.name])
        self.done.record(stream)
        self.done.synchronize()  # outputs are read on the host next; CUDA errors surface here
        return results

    def _stage_input(self, name: str, dtype: np.dtype, parts: list[np.ndarray | DeviceInput], stream: Any) -> None:
        """Place each item's rows at its offset in the device buffer.

        Host rows go through the pinned buffer, one H2D copy per run of consecutive host
        items; device rows are copied device to device after their producer's stream.
        """
        pinned, device = self.pinned[name], self.device[name]
        staged = pinned.as_numpy(np.uint8)
        offset, run_start = 0, None
        for part in parts:
            nbytes = part.nbytes
            if offset + nbytes > self.capacity[name]:
                raise BackendError(f"{self.where}: input {name!r} batch needs more than {self.capacity[name]} bytes")
            if isinstance(part, DeviceInput):
                if run_start is not None:
                    self.cuda.copy_async(device.ptr + run_start, pinned.ptr + run_start, offset - run_start, "htod", stream)
                    run_start = None
                self._after_producer(part, stream)
                self.cuda.copy_async(device.ptr + offset, part.ptr, nbytes, "dtod", stream)
            else:
                rows = np.ascontiguousarray(part, dtype=dtype)
                staged[offset : offset + nbytes] = rows.reshape(-1).view(np.uint8)
                run_start = offset if run_start is None else run_start
            offset += nbytes
        if run_start is not None:
            self.cuda.copy_async(device.ptr + run_start, pinned.ptr + run_start, offset - run_start, "htod", stream)

    def _after_producer(self, part: DeviceInput, stream: Any) -> None:
        """Order our stream after the stream that produced a device input (CUDA array
        interface v3); nothing to do when it is ours or unnamed."""
        if part.stream is None or part.stream == stream.handle:
            return
        record_on_stream_handle(self.producer_ready, part.stream)
        stream.wait_event(self.producer_ready)  # a device-side wait: the host does not block

    def close(self) -> None:
        """Context first (it references the engine), then buffers, events and our stream."""
        self.context = None
        for resource in reversed(self._closers):
            resource.close()
        self._closers.clear()


def record_on_stream_handle(event: Any, handle: int) -> None:
    """Record ``event`` on a stream known only by its raw handle (a foreign producer's).

    CUDA array interface v3 reserves 1 for the legacy stream and 2 for per-thread default.
    """
    from ..cuda import check
    from ..cuda._lib import bindings

    _, runtime, _ = bindings()
    stream = {1: runtime.cudaStreamLegacy, 2: runtime.cudaStreamPerThread}.get(handle, handle)
    check(runtime.cudaEventRecord(event.raw, stream), f"cudaEventRecord(producer stream 0x{handle:x})")
