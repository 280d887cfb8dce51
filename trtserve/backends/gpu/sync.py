"""SyncTensor[X]: owns the instance's CUDA stream; X enqueues on it; one wait per batch.

The leaf form, TorchPipe's ``S[DecodeTensor,ResizeTensor,CvtColorTensor,SyncTensor]``, does
the same for the stages before it: Sequential initialises its stages last to first, so
SyncTensor makes its stream current on the instance thread before they initialise; they
enqueue on it during forward, and SyncTensor, the last stage, passes ``data`` through as
``result`` after waiting for the stream.

At init (on the instance thread) SyncTensor creates the instance's stream and makes it the
thread's current stream *before* X initialises, so X can bind to it (TorchScriptTensor
wraps it as a torch ExternalStream, image backends enqueue on it).  Each forward runs
X.forward with that stream current, records a blocking-sync event and waits on it: the
instance thread sleeps in the driver (GIL released) instead of spinning, and every result
X produced is complete when forward returns.  Two instances never share a stream, so their
batches overlap on the GPU and their results cannot mix.

Sticky CUDA errors (illegal address, launch failure, ...) poison the process: the batch
fails with a DeviceError (``details['sticky']``), and every later forward of every GPU
instance is refused at once with a DeviceError naming the original error.  An exception
from a framework that does not speak cuda-python (torch raises RuntimeError) is followed by
a synchronise of the instance stream, so a sticky error behind it is classified by its
code, never by message text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ... import cuda
from ...backend import Backend, BackendOptions, InstanceContext, Key, option
from ...completion import Completion
from ...errors import ConfigError, ModelUnavailableError, TrtserveError


def _expression(backend: Backend) -> str:
    """The backend tree as an expression, for messages: SyncTensor[Sequential[DecodeTensor,...]]."""
    name = type(backend).__name__
    if not backend.children:
        return name
    return f"{name}[{','.join(_expression(c) for c in backend.children)}]"


def _mark_complete(items: list[dict[str, Any]]) -> None:
    """Results leaving SyncTensor are complete: drop their producer stream, so a consumer on
    another stream (torch, cupy, the next node) never waits on this instance's next batch."""
    for item in items:
        result = item.get("result")
        for value in result.values() if isinstance(result, dict) else (result,):
            if isinstance(value, cuda.DeviceArray):
                value.stream = None


def _non_negative(value: int) -> str | None:
    return None if value >= 0 else "must be a CUDA device ordinal (0, 1, ...)"


@dataclass(frozen=True)
class SyncTensorOptions(BackendOptions):
    device_id: int = option(Key(int, 0, "CUDA device this node's instances run on", check=_non_negative))
    overlap: bool = option(Key(bool, False, "return before the GPU finishes a batch, so the instance prepares its "
                                            "next batch meanwhile and waits afterwards (the whole node must be SyncTensor[X])"))


class SyncTensor(Backend):
    children_arity = (0, 1)
    thread_bound = True  # its stream is the instance thread's current stream
    Options = SyncTensorOptions

    def __init__(self) -> None:
        super().__init__()
        self.stream: cuda.Stream | None = None
        self.done: cuda.Event | None = None
        self.overlap = False
        self._events: list[cuda.Event] = []  # overlap: one per batch in flight (two), in turn
        self._turn = 0

    def init(self, context: InstanceContext) -> None:
        self.config = context.config
        options = context.options(SyncTensorOptions)
        self.overlap = options.overlap
        if self.overlap and (not self.children or not self.is_root):
            raise ConfigError(
                f"overlap = true needs SyncTensor to wrap the whole node, as in SyncTensor[X]; here it is "
                f"{'the last stage' if not self.children else 'inside another backend'} of the node's expression. "
                "Make the node's backend SyncTensor[...] (SyncTensor[S[A,B]] for a chain), or remove overlap",
                key="overlap",
                backend="SyncTensor",
            )
        if not cuda.is_available():
            raise ModelUnavailableError(
                f"no CUDA device: {cuda.unavailable_reason()}. {_expression(self)} needs an NVIDIA "
                "GPU with its driver and cuda-python (pip install 'trtserve[gpu]'); on a CPU-only machine use "
                "the CPU backends (DecodeMat, ResizeMat, CvtColorMat, OnnxRuntime)",
                backend="SyncTensor",
                node=context.node,
                reason=cuda.unavailable_reason(),
            )
        cuda.raise_if_poisoned()
        ordinal = options.device_id
        cuda.require_device(ordinal)
        cuda.ensure_device(ordinal)
        self.stream = cuda.Stream(device=ordinal)
        self.done = cuda.Event(blocking=True, device=ordinal)
        if self.overlap:
            self._events = [self.done, cuda.Event(blocking=True, device=ordinal)]
        # Current for the rest of this instance thread's life: X binds to it in init and
        # any work X does outside forward (close, say) lands on it too.
        cuda.set_current_stream(self.stream)
        try:
            for child in self.children:
                child.init(context)
        except BaseException:
            self._release()
            raise

    def forward(self, items: list[dict[str, Any]]) -> Completion | None:
        cuda.raise_if_poisoned()
        stream, done = self.stream, self.done
        assert stream is not None and done is not None, "SyncTensor.forward before init"
        with cuda.use_stream(stream):
            try:
                if self.children:
                    self.children[0].forward(items)
                else:  # the leaf form: the stages before this one enqueued on our stream
                    for item in items:
                        item["result"] = item["data"]
                if self.overlap:
                    return self._completion(items, stream)
                done.record(stream)
                done.synchronize()
                _mark_complete(items)
                return None
            except TrtserveError:
                raise  # CudaError included: check() already poisoned the process if sticky
            except Exception as exc:
                self._raise_if_device_failed(exc, stream)
                raise

    def _completion(self, items: list[dict[str, Any]], stream: cuda.Stream) -> Completion:
        """overlap: mark the batch's end on the stream and return; the instance thread waits
        on that event later (after preparing its next batch, when it has one).  The scheduler keeps at most two batches of an
        instance in flight, so the two events are never re-recorded while still awaited."""
        event = self._events[self._turn]
        self._turn ^= 1
        event.record(stream)

        def finish() -> None:
            event.synchronize()
            _mark_complete(items)

        return Completion(finish)

    @staticmethod
    def _raise_if_device_failed(exc: Exception, stream: cuda.Stream) -> None:
        """After a foreign exception, surface a CUDA error on ``stream`` as a typed one."""
        try:
            stream.synchronize()
        except cuda.CudaError as device_error:
            raise device_error from exc

    def close(self) -> None:
        try:
            if self.stream is not None:
                with cuda.use_stream(self.stream):
                    super().close()
        finally:
            self._release()

    def _release(self) -> None:
        """Free the event and stream; after a sticky error the dead context is left alone."""
        if cuda.current_stream() is self.stream:
            cuda.set_current_stream(None)
        for resource in (*self._events[1:], self.done, self.stream):
            if resource is None:
                continue
            try:
                resource.close()
            except cuda.CudaError:
                if not cuda.is_poisoned():
                    raise
        self.done = self.stream = None
        self._events = []
