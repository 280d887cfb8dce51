"""OnnxRuntime: an ONNX model on onnxruntime's CPU provider, with dynamic batching.

Items:

* a single-input model takes ``item["data"]`` as an ndarray (or a one-entry dict); a
  multi-input model takes a dict name -> ndarray.  A single-output model's ``result`` is an
  ndarray, a multi-output model's a dict name -> ndarray.
* An input with the model's rank is *batched*: its first dimension counts rows (n rows use n
  of ``max``).  An input one rank short is *one unbatched sample*: it gets a leading batch
  dimension of 1 on the way in, loses it again on the way out, and counts 1.  This is how an
  HWC image coming out of ``S[DecodeMat,ResizeMat,CvtColorMat]`` feeds an NHWC model without
  an extra stage.

A batch stacks every input along axis 0, runs once, and splits each output back by each
item's row count.  Items whose other dimensions differ (dynamic dims) run as one call per
shape, or padded into one call where the ``pad`` key says so (shapes.py).  Every call is
counted in the node's statistics (``model_calls``, ``call_rows``).  Inputs are checked
against the model in ``validate`` (before queueing) so one bad request never fails a batch
of good ones.

One InferenceSession per instance, created on the instance's own thread; ``run`` releases
the GIL, so instances run in parallel.  ``intra_op_threads`` defaults to 1 because
parallelism comes from ``instance_num``, and more threads per instance oversubscribe cores.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from ..backend import Backend, BackendOptions, InstanceContext, Key, Signature, TensorSpec, option
from ..errors import ConfigError, InvalidInputError, ModelUnavailableError
from .shapes import check_pad, pad_rules
from .stacking import InputChecker, Padding, Prepared, as_result, bounds, check_rows, describe, drop_batch, group, split, stack

_NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
}
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def _threads(value: int) -> str | None:
    return None if value >= 0 else "must be >= 0 (0 lets onnxruntime use one thread per core)"


def _provider_list(value: list) -> str | None:
    if value and all(isinstance(p, str) and p for p in value):
        return None
    return 'must be a non-empty list of provider names, e.g. ["CPUExecutionProvider"]'


@dataclass(frozen=True)
class Port:
    """One model input or output: name, numpy dtype and shape (int, or str/None if dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def pattern(self, skip: int = 0) -> str:
        """The shape as a user reads it, e.g. (N, 16) with N the dynamic batch dim's name.

        ``skip=1`` gives the shape of one sample (without the batch dimension).
        """
        dims = [str(d) if isinstance(d, int) else (d or "?") for d in self.shape[skip:]]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def spec(self) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) else -1 for d in self.shape)
        return TensorSpec(self.name, self.dtype.name, dims, batched=bool(dims))


@dataclass(frozen=True)
class OnnxRuntimeOptions(BackendOptions):
    model: str = ""  # the node's model file (required_keys: the loader refuses a config without it)
    intra_op_threads: int = option(Key(int, 1, "threads inside one operator, per instance", check=_threads))
    inter_op_threads: int = option(Key(int, 1, "threads across operators; > 1 enables parallel execution", check=_threads))
    providers: tuple[str, ...] | None = option(
        Key(list, None, 'onnxruntime execution providers, default ["CPUExecutionProvider"]', check=_provider_list)
    )
    pad: Mapping[str, Mapping[str, float]] | None = option(
        Key(dict, None, "per input: pad its dynamic dims to the batch's largest, e.g. { x = { value = 0.0, limit = 1280 } }",
            check=check_pad)
    )


class OnnxRuntime(Backend):
    Options = OnnxRuntimeOptions
    required_keys = ("model",)

    # -- lifecycle ---------------------------------------------------------------------
    def init(self, context: InstanceContext) -> None:
        super().init(context)
        options = context.options(OnnxRuntimeOptions)
        self.path = path = options.model
        self.session = self._open(path, options)
        self.inputs = [self._port(a, "input") for a in self.session.get_inputs()]
        self.outputs = [self._port(a, "output") for a in self.session.get_outputs()]
        self._by_name = {p.name: p for p in self.inputs}
        self._output_names = [p.name for p in self.outputs]
        self._checker = InputChecker([p.name for p in self.inputs], f"OnnxRuntime model {path}", path)
        # The common request, one batched array for a one-input model, is checked at the top
        # of prepare() without the general path's dicts (4.7 -> 0.85 us, paid at submit and
        # again per item in forward).
        sole = self.inputs[0] if len(self.inputs) == 1 and self.inputs[0].rank >= 1 else None
        self._sole = sole
        self._sole_rank = sole.rank if sole else -1
        self._sole_static = [(axis, want) for axis, want in enumerate(sole.shape) if isinstance(want, int)] if sole else []
        # Every dim after the batch dim fixed: every checked item stacks with every other.
        self._one_group = all(isinstance(d, int) for port in self.inputs for d in port.shape[1:])
        self._sole_fast = sole is not None and self._one_group and len(self.outputs) == 1
        if not self.inputs:
            raise ModelUnavailableError(
                f"{path} has no inputs; the OnnxRuntime backend serves models with at least one input",
                model_file=path,
            )
        self._check_batchable()
        self._pad = pad_rules(options.pad, self.inputs, path)
        self._record_call = context.record_call

    def _open(self, path: str, config: OnnxRuntimeOptions) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.intra_op_threads
        options.inter_op_num_threads = config.inter_op_threads
        if options.inter_op_num_threads > 1:  # inter-op threads are only used in parallel mode
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        providers = list(config.providers or DEFAULT_PROVIDERS)
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise ConfigError(
                f"providers = {providers}: {missing} not available in this onnxruntime build; "
                f"available are {ort.get_available_providers()}",
                key="providers",
                value=repr(missing),
            )
        try:
            return ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelUnavailableError(
                f"onnxruntime cannot load {path}: {type(exc).__name__}: {exc}; check the file with "
                "onnx.checker.check_model and that its opset is supported by onnxruntime "
                f"{ort.__version__}",
                model_file=path,
            ) from exc

    def _port(self, arg: Any, kind: str) -> Port:
        dtype = _NUMPY_DTYPES.get(arg.type)
        if dtype is None:
            raise ModelUnavailableError(
                f"{self.path}: {kind} {arg.name!r} has type {arg.type}, which the OnnxRuntime backend "
                f"does not serve; use one of {sorted(_NUMPY_DTYPES)}",
                model_file=self.path,
                tensor=arg.name,
                type=arg.type,
            )
        return Port(arg.name, np.dtype(dtype), tuple(arg.shape or ()))

    def _check_batchable(self) -> None:
        """With max > 1 every input needs a dynamic first dim, or items cannot be stacked."""
        if self.max() <= 1:
            return
        for port in self.inputs:
            if port.rank == 0 or isinstance(port.shape[0], int):
                raise ConfigError(
                    f"max = {self.max()} but {self.path} input {port.name!r} has shape {port.pattern()} "
                    "with no dynamic batch dimension; set max = 1 or re-export the model with a dynamic "
                    "first dimension",
                    key="max",
                    value=self.max(),
                    input=port.name,
                )

    def close(self) -> None:
        self.session = None

    # -- checking and sizing (caller's thread: read-only) ------------------------------
    def validate(self, item: dict[str, Any]) -> None:
        self.prepare(item)

    def request_size(self, item: dict[str, Any]) -> int:
        return self.prepare(item).rows

    def admit(self, item: dict[str, Any], sized: bool) -> int:
        # One parse for both: validate() + request_size() would parse the item twice on the
        # submitting thread (the server's event loop), where prepare() is a large share of
        # the GIL's time under load.
        rows = self.prepare(item).rows
        return rows if sized else 1

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [p.spec() for p in self.inputs], [p.spec() for p in self.outputs]

    def signature(self) -> Signature:
        inputs, outputs = self.io_spec()
        return Signature(self.path, tuple(inputs), tuple(outputs))

    def prepare(self, item: dict[str, Any]) -> Prepared:
        """The item's inputs with a batch dimension, or InvalidInputError naming the problem."""
        data = item.get("data")
        sole = self._sole
        if sole is not None and type(data) is np.ndarray and data.ndim == self._sole_rank and data.dtype == sole.dtype:
            shape = data.shape
            for axis, want in self._sole_static:
                if shape[axis] != want:
                    break
            else:
                if shape[0] > 0:
                    return Prepared({sole.name: data}, shape[0], False)
        return self._checker.prepare(data, self._check_array)

    def _check_array(self, name: str, array: Any) -> tuple[np.ndarray, bool]:
        """One input with its batch dimension, and True when it was one sample without it."""
        port = self._by_name[name]
        if not isinstance(array, np.ndarray):
            raise self._invalid(
                f"input {port.name!r} must be a numpy array, got {describe(array)}; wrap it with "
                f"np.asarray(value, dtype=np.{port.dtype.name})",
                input=port.name,
                received=describe(array),
            )
        if array.dtype != port.dtype:
            raise self._invalid(
                f"input {port.name!r} has dtype {array.dtype}, expected {port.dtype.name}; convert it "
                f"with .astype(np.{port.dtype.name})",
                input=port.name,
                received=str(array.dtype),
                expected=port.dtype.name,
            )
        unbatched = port.rank >= 1 and array.ndim == port.rank - 1
        if array.ndim != port.rank and not unbatched:
            raise self._shape_error(port, array, f"has {array.ndim} dimensions, expected {port.rank}")
        dims = (1,) + array.shape if unbatched else array.shape
        for axis, (got, want) in enumerate(zip(dims, port.shape)):
            if isinstance(want, int) and got != want:
                where = axis - 1 if unbatched else axis
                raise self._shape_error(port, array, f"dimension {where} is {got}, expected {want}")
        return (array[np.newaxis] if unbatched else array), unbatched

    def _shape_error(self, port: Port, array: np.ndarray, problem: str) -> InvalidInputError:
        return self._invalid(
            f"input {port.name!r} has shape {tuple(array.shape)}: {problem}; the model takes "
            f"{port.pattern()} (names and ? are any size): send a batch shaped like that, or one "
            f"sample shaped {port.pattern(skip=1)}",
            input=port.name,
            received=list(array.shape),
            expected=[d if isinstance(d, int) else -1 for d in port.shape],
        )

    def _invalid(self, problem: str, **details: Any) -> InvalidInputError:
        return self._checker.invalid(problem, **details)

    # -- execution (instance thread) ---------------------------------------------------
    def forward(self, items: list[dict[str, Any]]) -> None:
        if self._sole_fast and len(items) > 1 and self._forward_sole(items):
            return
        # Checked again: inside S[...] only the first stage's validate runs before queueing.
        prepared = [self.prepare(item) for item in items]
        if self._one_group:
            self._run_group(items, prepared)
            return
        for indices, padded in group(prepared, self._pad):
            self._run_group([items[i] for i in indices], [prepared[i] for i in indices], padded)

    def _forward_sole(self, items: list[dict[str, Any]]) -> bool:
        """The common batch (one-input, one-output model; every item one batched array that
        passes prepare's fast check) without a Prepared per item: this Python sits between
        two session.run calls of a busy instance.  False (nothing done) for any other batch."""
        sole, rank, static = self._sole, self._sole_rank, self._sole_static
        assert sole is not None  # _sole_fast is only set with a sole input
        arrays = []
        for item in items:
            data = item.get("data")
            if type(data) is not np.ndarray or data.ndim != rank or data.dtype != sole.dtype or data.shape[0] == 0:
                return False
            shape = data.shape
            for axis, want in static:
                if shape[axis] != want:
                    return False
            arrays.append(data)
        (out,) = self.session.run(None, {sole.name: stack(arrays)})
        counts = [a.shape[0] for a in arrays]
        total = sum(counts)
        self._record_call(total)
        check_rows({self._output_names[0]: out}, total, self._checker.label, self.path)
        for item, (start, stop) in zip(items, bounds(counts)):
            item["result"] = out[start:stop]
        return True

    def _run_group(self, items: list[dict[str, Any]], prepared: list[Prepared], padded: Padding | None = None) -> None:
        """One model call for items that stack (``padded``: what to pad each input to)."""
        if len(prepared) == 1:
            feeds = prepared[0].arrays
        else:
            pads = padded or {}
            feeds = {port.name: stack([p.arrays[port.name] for p in prepared], pads.get(port.name)) for port in self.inputs}
        run = self.session.run(None, {name: np.ascontiguousarray(a) for name, a in feeds.items()})
        outputs = dict(zip(self._output_names, run))
        total = 0
        for prep in prepared:
            total += prep.rows
        self._record_call(total)
        if len(prepared) == 1:  # a lone item's outputs are its own, whatever their first dimension
            items[0]["result"] = as_result(drop_batch(outputs) if prepared[0].unbatched else outputs)
            return
        check_rows(outputs, total, self._checker.label, self.path)
        for item, parts in zip(items, split(outputs, prepared)):
            item["result"] = as_result(parts)
