"""The infer operation: wire inputs to an item, the item through the model, outputs back.

There is one core: the model's callback pipeline.  ``InferCall.on_done`` runs on whichever
scheduler thread finished the item and hands the item to the event loop with
``loop.call_soon_threadsafe``, where the outputs are encoded and the call's asyncio future
resolved.  No thread pool hop, no per-request task.

``timeout_ms`` becomes both the scheduler deadline (a queued request is failed by the
scheduler's timer and never runs) and a loop timer (the client gets DEADLINE_EXCEEDED on
time even when the item is already running; its late result is dropped).

With metrics on, every answer is counted once, as the client sees it (success, or failure
by error name) and its duration observed, through the served model's meter
(server/metrics.py), which ``ModelIO`` caches next to the model's inputs.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import numpy as np
from trtserve_client.wire import decode_value, encode_value

from ..backend import TensorSpec
from ..errors import (
    BackendError,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidInputError,
    ModelUnavailableError,
    NoResultError,
    TrtserveError,
    VersionNotFoundError,
)
from ..repository import LoadedModel, ModelRepository
from ..scheduler import Request

DEFAULT_OUTPUT = "output"  # the output's name when a model declares none


# --------------------------------------------------------------------------- fields


def require_model(message: dict[str, Any]) -> str:
    name = message.get("model")
    if type(name) is not str or not name:
        raise InvalidArgumentError(
            f"field 'model' must be a non-empty string naming the model, got {type(name).__name__} {name!r}",
            field="model",
            value=repr(name),
        )
    return name


def optional_version(message: dict[str, Any]) -> int | None:
    version = message.get("version")
    if version is None or (type(version) is int and version >= 1):
        return version
    raise InvalidArgumentError(
        f"field 'version' must be a positive integer (or absent for the served version), got {version!r}",
        field="version",
        value=repr(version),
    )


def optional_priority(message: dict[str, Any]) -> int:
    """0 (absent) = the model's default level; the scheduler checks the range (1 = highest)."""
    priority = message.get("priority")
    if priority is None:
        return 0
    if type(priority) is int and priority >= 0:
        return priority
    raise InvalidArgumentError(
        f"field 'priority' must be an integer level >= 0 (1 = highest, 0 = the model's default), got {priority!r}",
        field="priority",
        value=repr(priority),
    )


def timeout_seconds(message: dict[str, Any]) -> float | None:
    value = message.get("timeout_ms")
    if value is None:
        return None
    if type(value) in (int, float) and value > 0 and math.isfinite(value):
        return value / 1000.0
    raise InvalidArgumentError(
        f"field 'timeout_ms' must be a number of milliseconds > 0, got {value!r}",
        field="timeout_ms",
        value=repr(value),
    )


# --------------------------------------------------------------------------- model I/O


class ModelIO:
    """A served model's known inputs and outputs, and the mapping between wire and item."""

    def __init__(self, model: LoadedModel) -> None:
        inputs, outputs = model.pipeline.io_spec()
        self.name = model.name
        self.inputs: dict[str, _Declared] | None = {t.name: _Declared(model.name, t) for t in inputs} if inputs else None
        self.outputs: list[str] | None = [t.name for t in outputs] if outputs else None
        self.single_output = self.outputs[0] if self.outputs else DEFAULT_OUTPUT
        self.meter: Any = None  # the model version's metrics (server/metrics.ModelMeter), when on

    def item_data(self, raw: Any) -> Any:
        """The item's ``data``: the value of a lone input, or a dict name -> value."""
        if not isinstance(raw, dict) or not raw:
            raise InvalidArgumentError(
                f"field 'inputs' must be a non-empty map of input name to tensor or bytes, got {raw!r:.80}",
                field="inputs",
            )
        values = {}
        for name, obj in raw.items():
            if type(name) is not str:
                raise InvalidArgumentError(f"field 'inputs': input names must be strings, got {name!r}", field="inputs")
            values[name] = decode_value(obj, f"inputs[{name!r}]")
        if self.inputs is not None:
            self._check(values)
        if len(values) == 1 and (self.inputs is None or len(self.inputs) == 1):
            return next(iter(values.values()))
        return values

    def _check(self, values: dict[str, Any]) -> None:
        expected = list(self.inputs)
        for name in values:
            if name not in self.inputs:
                raise InvalidInputError(
                    f"model {self.name!r} has no input {name!r}; its inputs are {expected}",
                    model=self.name, input=name, expected=expected,
                )
        missing = [name for name in expected if name not in values]
        if missing:
            raise InvalidInputError(
                f"model {self.name!r} needs input(s) {missing}; send every one of {expected}",
                model=self.name, missing=missing, expected=expected,
            )
        for name, value in values.items():
            self.inputs[name].check(value)

    def output_filter(self, raw: Any) -> list[str] | None:
        if raw is None:
            return None
        if not isinstance(raw, list) or not all(type(n) is str for n in raw):
            raise InvalidArgumentError(f"field 'outputs' must be a list of output names, got {raw!r:.80}", field="outputs")
        if self.outputs is not None:
            for name in raw:
                if name not in self.outputs:
                    raise self._unknown_output(name, self.outputs)
        return raw

    def encode(self, item: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
        if "result" not in item:
            raise NoResultError(
                f"model {self.name!r} finished the request without a result: a backend could not "
                "handle this input (an undecodable image, say)",
                model=self.name,
            )
        result = item["result"]
        values = result if isinstance(result, dict) else {self.single_output: result}
        if wanted is not None:
            for name in wanted:
                if name not in values:
                    raise self._unknown_output(name, list(values))
            values = {name: values[name] for name in wanted}
        outputs = {}
        for name, value in values.items():
            try:
                outputs[str(name)] = encode_value(value)
            except InvalidInputError as exc:  # the model's output, not the client's input
                raise BackendError(f"model {self.name!r} output {name!r}: {exc.message}", model=self.name, output=str(name)) from None
        return outputs

    def _unknown_output(self, name: str, known: list[str]) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"field 'outputs': model {self.name!r} has no output {name!r}; its outputs are {known}",
            field="outputs", model=self.name, output=name, expected=known,
        )


class _Declared:
    """One declared input, prepared for a cheap per-request check (dtype objects compare in C)."""

    __slots__ = ("model", "spec", "dtype", "shape")

    def __init__(self, model: str, spec: TensorSpec) -> None:
        self.model = model
        self.spec = spec
        self.dtype = None if spec.dtype == "bytes" else np.dtype(spec.dtype)
        self.shape = tuple(spec.shape)

    def check(self, value: Any) -> None:
        if self.dtype is None:
            if isinstance(value, (bytes, bytearray)):
                return
        elif isinstance(value, np.ndarray) and value.dtype == self.dtype and _shape_fits(value.shape, self.shape):
            return
        _check_tensor(self.model, self.spec, value)  # the slow path names exactly what is wrong


def _shape_fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    if len(shape) != len(declared):
        return False
    for got, want in zip(shape, declared):
        if want != -1 and want != got:
            return False
    return True


def _check_tensor(model: str, spec: TensorSpec, value: Any) -> None:
    """Declared dtype and shape (the shape includes the leading batch dim; -1 = any size)."""
    where = f"model {model!r} input {spec.name!r}"
    if spec.dtype == "bytes":
        if not isinstance(value, (bytes, bytearray)):
            raise InvalidInputError(
                f"{where} takes raw bytes (msgpack bin), got a {value.dtype} tensor of shape {list(value.shape)}",
                model=model, input=spec.name, expected_dtype="bytes", dtype=str(value.dtype),
            )
        return
    if not isinstance(value, np.ndarray):
        raise InvalidInputError(
            f"{where} takes a {spec.dtype} tensor, got raw bytes; send a tensor map {{dtype, shape, data}}",
            model=model, input=spec.name, expected_dtype=spec.dtype, dtype="bytes",
        )
    if value.dtype.name != spec.dtype:
        raise InvalidInputError(
            f"{where} must be {spec.dtype}, got {value.dtype.name}; convert it (array.astype('{spec.dtype}'))",
            model=model, input=spec.name, expected_dtype=spec.dtype, dtype=value.dtype.name,
        )
    shape = value.shape
    if not _shape_fits(shape, tuple(spec.shape)):
        raise InvalidInputError(
            f"{where} must have shape {list(spec.shape)} (-1 = any size, batch dimension first), got {list(shape)}",
            model=model, input=spec.name, expected_shape=list(spec.shape), shape=list(shape),
        )


# --------------------------------------------------------------------------- the call


class InferCall:
    """One infer request in flight: its asyncio future, scheduler request and deadline timer."""

    __slots__ = ("loop", "future", "request", "timer", "io", "model", "wanted", "started")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, model: LoadedModel, io: ModelIO, wanted: list[str] | None, started: float
    ):
        self.started = started  # time.perf_counter() when the request was read
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.request: Request | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.io = io
        self.model = model
        self.wanted = wanted

    def on_done(self, item: dict[str, Any], error: TrtserveError | None) -> None:
        """Scheduler thread: hand the finished item to the loop."""
        try:
            self.loop.call_soon_threadsafe(self._resolve, item, error)
        except RuntimeError:
            pass  # the loop is closed: the server is gone and nobody waits for this answer

    def _resolve(self, item: dict[str, Any], error: TrtserveError | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        future = self.future
        if future.done():  # expired or cancelled: the late answer is dropped
            return
        if error is not None:
            future.set_exception(error)
            self._count(error.name)
            return
        try:
            future.set_result({"model": self.model.name, "version": self.model.version, "outputs": self.io.encode(item, self.wanted)})
        except TrtserveError as exc:
            future.set_exception(exc)
            self._count(exc.name)
            return
        self._count(None)

    def _count(self, reason: str | None) -> None:
        meter = self.io.meter
        if meter is not None:
            meter.done(reason, time.perf_counter() - self.started)

    def expire(self, timeout_s: float) -> None:
        if self.future.done():
            return
        if self.request is not None:
            self.request.cancelled = True  # still queued: never run it
        self.future.set_exception(DeadlineExceededError(
            f"model {self.model.name!r} gave no answer within timeout_ms={timeout_s * 1e3:g}; "
            "raise timeout_ms or lower the load",
            model=self.model.name,
            timeout_ms=timeout_s * 1e3,
        ))
        self._count("DEADLINE_EXCEEDED")

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancelled = True
        if self.timer is not None:
            self.timer.cancel()
        self.future.cancel()


class InferHandler:
    def __init__(self, repository: ModelRepository, loop: asyncio.AbstractEventLoop, metrics: Any = None) -> None:
        self.repository = repository
        self.loop = loop
        self.metrics = metrics  # server/metrics.Metrics, or None when metrics are off
        self._io: dict[tuple[str, int], tuple[LoadedModel, ModelIO]] = {}

    def model_io(self, model: LoadedModel) -> ModelIO:
        """Known inputs/outputs, computed once per served model object (a reload replaces it)."""
        key = (model.name, model.version)
        cached = self._io.get(key)
        if cached is not None and cached[0] is model:
            return cached[1]
        io = ModelIO(model)
        if self.metrics is not None:
            io.meter = self.metrics.meter(model)
        self._io[key] = (model, io)
        return io

    def __call__(self, message: dict[str, Any]) -> InferCall:
        started = time.perf_counter()
        io = None
        try:
            model = self.repository.get(require_model(message), optional_version(message))
            io = self.model_io(model)
            item = {"data": io.item_data(message.get("inputs"))}
            call = InferCall(self.loop, model, io, io.output_filter(message.get("outputs")), started)
            priority = optional_priority(message)
            timeout = timeout_seconds(message)
            # The scheduler keeps the earlier of this deadline and the model's queue_timeout.
            deadline = None if timeout is None else time.monotonic() + timeout
            call.request = model.submit(item, call.on_done, deadline, priority)
        except TrtserveError as exc:
            if self.metrics is not None:
                self._count_refusal(message, io, exc)
            raise
        if timeout is not None:
            call.timer = self.loop.call_later(timeout, call.expire, timeout)
        return call

    def _count_refusal(self, message: dict[str, Any], io: ModelIO | None, exc: TrtserveError) -> None:
        """A request refused before it was queued.  Only names the server knows become label
        values, so a peer sending made-up model names cannot grow the metrics without bound."""
        if io is not None:
            io.meter.failed(exc.name)
            return
        known = isinstance(exc, (ModelUnavailableError, VersionNotFoundError))
        self.metrics.refused_request(message.get("model") if known else "", exc.name)
