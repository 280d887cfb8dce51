"""An emulated TensorRT 10 runtime and CUDA layer, for running TensorrtTensor's real code on a CPU.

This is NOT TensorRT: "device memory" is host memory, copies are memmove, and the engine
computes its outputs with numpy.  It reproduces the API surface TensorrtTensor uses (the
name-based engine/context calls and their bool/list return values) so the staging offsets,
shape handling, return-value checks and item splitting of trtserve.tensorrt.execution are
exercised for real.  Whether TensorRT itself behaves so is not tested here
(docs/tensorrt.md).
"""
from __future__ import annotations

import ctypes
import enum
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


class DataType(enum.Enum):
    FLOAT = np.float32
    HALF = np.float16
    INT32 = np.int32
    INT64 = np.int64
    BF16 = "bf16"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class TensorLocation(enum.Enum):
    DEVICE = 0
    HOST = 1


class ILogger:
    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self) -> None:
        pass


def nptype(dtype: DataType):
    if isinstance(dtype.value, str):
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return dtype.value


def module() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99-emulated"
    for obj in (DataType, TensorIOMode, TensorLocation, ILogger, nptype):
        setattr(trt, obj.__name__, obj)
    trt.BuilderFlag = types.SimpleNamespace(FP16=1)
    return trt


@dataclass
class Tensor:
    dtype: DataType
    shape: tuple[int, ...]  # -1 = dynamic
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None  # inputs only


@dataclass
class FakeEngine:
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    fail: dict[str, object] = field(default_factory=dict)  # which call misbehaves, and how
    contexts: list[FakeContext] = field(default_factory=list)
    context_class: type = None  # FakeContext unless a test computes elsewhere (on a GPU)

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    def _all(self) -> dict[str, Tensor]:
        return {**self.inputs, **self.outputs}

    def get_tensor_name(self, index: int) -> str:
        return list(self._all())[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._all()[name].dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._all()[name].shape

    def get_tensor_location(self, name: str) -> TensorLocation:
        return TensorLocation.DEVICE

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        assert profile == 0
        return list(self.inputs[name].profile)

    def create_execution_context(self):
        if self.fail.get("context"):
            return None
        self.contexts.append((self.context_class or FakeContext)(self))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions: list[int] = []
        self.streams: list[int] = []

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.inputs[name].profile
        shape = tuple(shape)
        if self.engine.fail.get("set_input_shape") or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        return True

    def infer_shapes(self) -> list[str]:
        forced = self.engine.fail.get("infer_shapes")
        if forced:
            return list(forced)
        return [n for n in self.engine.inputs if n not in self.shapes]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.inputs:
            return self.shapes[name]
        batch = next(iter(self.shapes.values()))[0]
        return (batch,) + self.engine.outputs[name].shape[1:]  # a -1 left here: data-dependent size

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if self.engine.fail.get("set_tensor_address"):
            return False
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if self.engine.fail.get("execute"):
            return False
        self.streams.append(stream_handle)
        feeds = {name: _view(self.addresses[name], np.dtype(nptype(t.dtype)), self.shapes[name])
                 for name, t in self.engine.inputs.items()}
        self.executions.append(next(iter(feeds.values())).shape[0])
        for name, value in self.engine.compute(feeds).items():
            out = _view(self.addresses[name], value.dtype, value.shape)
            out[...] = value
        return True


def _view(ptr: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


# --------------------------------------------------------------------------- the CUDA layer

class FakeCuda:
    """Replaces trtserve.cuda's functions and classes (monkeypatched by the tests)."""

    def __init__(self) -> None:
        self.copies: list[tuple[str, int]] = []
        self.live: set[int] = set()
        self.closed: list[str] = []
        fake = self

        class Resource:
            def close(self) -> None:
                if id(self) in fake.live:
                    fake.live.discard(id(self))
                    fake.closed.append(type(self).__name__)

        class Stream(Resource):
            def __init__(self, **_):
                fake.live.add(id(self))
                self.handle = self.raw = 0x5000 + len(fake.live)
                self.waited = []

            def wait_event(self, event):
                self.waited.append(event)

        class Buffer(Resource):
            def __init__(self, nbytes: int, **_):
                fake.live.add(id(self))
                self.nbytes = nbytes
                self.memory = np.zeros(max(nbytes, 1), np.uint8)
                self.ptr = self.memory.ctypes.data

            def as_numpy(self, dtype=np.uint8, shape=None):
                dtype = np.dtype(dtype)
                count = self.nbytes // dtype.itemsize if shape is None else int(np.prod(shape))
                view = self.memory[: count * dtype.itemsize].view(dtype)
                return view.reshape(shape) if shape is not None else view

        class DeviceBuffer(Buffer):
            pass

        class PinnedBuffer(Buffer):
            pass

        class Event(Resource):
            def __init__(self, **_):
                fake.live.add(id(self))
                self.raw = id(self)
                self.recorded = 0

            def record(self, stream=None):
                self.recorded += 1
                return self

            def synchronize(self):
                pass

        self.Stream, self.DeviceBuffer, self.PinnedBuffer, self.Event = Stream, DeviceBuffer, PinnedBuffer, Event
        self.stream: object | None = None  # what current_stream() returns (SyncTensor's)

    def copy_async(self, dst: int, src: int, nbytes: int, kind: str, stream=None) -> None:
        assert kind in ("htod", "dtoh", "dtod") and nbytes > 0
        self.copies.append((kind, nbytes))
        ctypes.memmove(dst, src, nbytes)

    def current_stream(self):
        return self.stream

    def install(self, monkeypatch, cuda_module) -> None:
        for name in ("Stream", "DeviceBuffer", "PinnedBuffer", "Event", "copy_async", "current_stream"):
            monkeypatch.setattr(cuda_module, name, getattr(self, name))
        monkeypatch.setattr(cuda_module, "is_available", lambda: True)
        monkeypatch.setattr(cuda_module, "ensure_device", lambda ordinal=None: 0)
        monkeypatch.setattr(cuda_module, "raise_if_poisoned", lambda: None)
        self.recorded_on: list[int] = []
        monkeypatch.setattr("trtserve.tensorrt.execution.record_on_stream_handle",
                            lambda event, handle: self.recorded_on.append(handle))
