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

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from ..backend import Backend, Key, Signature, TensorSpec, call_recorder, did_you_mean
from ..errors import BackendError, ConfigError, InvalidInputError, ModelUnavailableError
from .shapes import Padding, check_pad, group, pad_rules, stack

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


@dataclass
class Prepared:
    """An item's inputs with their batch dimension, ready to stack."""

    arrays: dict[str, np.ndarray]
    rows: int
    unbatched: bool  # the caller sent one sample without a batch dim: strip it from results


class OnnxRuntime(Backend):
    config_keys = {
        "intra_op_threads": Key(int, 1, "threads inside one operator, per instance", check=_threads),
        "inter_op_threads": Key(int, 1, "threads across operators; > 1 enables parallel execution", check=_threads),
        "providers": Key(
            list, None, 'onnxruntime execution providers, default ["CPUExecutionProvider"]', check=_provider_list
        ),
        "pad": Key(dict, None, "per input: pad its dynamic dims to the batch's largest, e.g. { x = { value = 0.0, limit = 1280 } }",
                   check=check_pad),
    }
    required_keys = ("model",)

    # -- lifecycle ---------------------------------------------------------------------
    def init(self, config: dict[str, Any], kwargs: dict[str, Any]) -> None:
        super().init(config, kwargs)
        self.path = path = config["model"]  # required_keys: load_config refuses a config without it
        self.session = self._open(path, config)
        self.inputs = [self._port(a, "input") for a in self.session.get_inputs()]
        self.outputs = [self._port(a, "output") for a in self.session.get_outputs()]
        self._by_name = {p.name: p for p in self.inputs}
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
        self._pad = pad_rules(config.get("pad"), self.inputs, path)
        self._record_call = call_recorder(kwargs)

    def _open(self, path: str, config: dict[str, Any]) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(config.get("intra_op_threads", 1))
        options.inter_op_num_threads = int(config.get("inter_op_threads", 1))
        if options.inter_op_num_threads > 1:  # inter-op threads are only used in parallel mode
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        providers = list(config.get("providers") or DEFAULT_PROVIDERS)
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
        if type(data) is np.ndarray and data.ndim == self._sole_rank and data.dtype == sole.dtype:
            shape = data.shape
            for axis, want in self._sole_static:
                if shape[axis] != want:
                    break
            else:
                if shape[0] > 0:
                    return Prepared({sole.name: data}, shape[0], False)
        named = self._named_arrays(data)
        modes = {name: self._check_array(self._by_name[name], array) for name, array in named.items()}
        if len(set(modes.values())) > 1:
            raise self._invalid(
                "mixes batched and unbatched inputs: "
                + ", ".join(f"{n} {tuple(named[n].shape)}" for n in named)
                + "; give every input a leading batch dimension, or none of them",
                received={n: list(a.shape) for n, a in named.items()},
            )
        unbatched = next(iter(modes.values()))
        arrays = {n: a[np.newaxis] if unbatched else a for n, a in named.items()}
        rows = {n: a.shape[0] for n, a in arrays.items()}
        if len(set(rows.values())) > 1:
            raise self._invalid(
                f"inputs have different batch sizes {rows}; every input of one request needs the "
                "same first dimension",
                received=rows,
            )
        count = next(iter(rows.values()))
        if count == 0:
            raise self._invalid("has 0 rows; send at least one row per request", received=rows)
        return Prepared(arrays, count, unbatched)

    def _named_arrays(self, data: Any) -> dict[str, np.ndarray]:
        names = [p.name for p in self.inputs]
        if not isinstance(data, dict):
            if len(self.inputs) != 1:
                raise self._invalid(
                    f"has inputs {names} but the request sent a single {_describe(data)}; "
                    "send a dict name -> array",
                    received=_describe(data),
                    expected=names,
                )
            data = {names[0]: data}
        for name in data:
            if name not in self._by_name:
                raise self._invalid(
                    f"has no input {name!r}{did_you_mean(str(name), names)}; its inputs are {names}",
                    input=str(name),
                    expected=names,
                )
        missing = [n for n in names if n not in data]
        if missing:
            raise self._invalid(
                f"input(s) {missing} missing from the request, which sent {list(data)}; send every "
                f"one of {names}",
                missing=missing,
                expected=names,
            )
        return {n: data[n] for n in names}  # model order, so stacking lines up

    def _check_array(self, port: Port, array: Any) -> bool:
        """Check one input; True when it is one sample without its batch dimension."""
        if not isinstance(array, np.ndarray):
            raise self._invalid(
                f"input {port.name!r} must be a numpy array, got {_describe(array)}; wrap it with "
                f"np.asarray(value, dtype=np.{port.dtype.name})",
                input=port.name,
                received=_describe(array),
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
        return unbatched

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
        return InvalidInputError(f"OnnxRuntime model {self.path}: {problem}", model_file=self.path, **details)

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
        (out,) = self.session.run(None, {sole.name: np.concatenate(arrays)})
        total = sum(a.shape[0] for a in arrays)
        self._record_call(total)
        self._check_outputs([out], total)
        start = 0
        for item, array in zip(items, arrays):
            stop = start + array.shape[0]
            item["result"] = out[start:stop]
            start = stop
        return True

    def _run_group(self, items: list[dict[str, Any]], prepared: list[Prepared], padded: Padding | None = None) -> None:
        """One model call for items that stack (``padded``: what to pad each input to)."""
        if len(prepared) == 1:
            feeds = prepared[0].arrays
        else:
            pads = padded or {}
            feeds = {port.name: stack([p.arrays[port.name] for p in prepared], pads.get(port.name)) for port in self.inputs}
        outputs = self.session.run(None, {name: np.ascontiguousarray(a) for name, a in feeds.items()})
        total = 0
        for prep in prepared:
            total += prep.rows
        self._record_call(total)
        if len(prepared) == 1:
            self._hand_back(items[0], prepared[0], outputs)
            return
        self._check_outputs(outputs, total)
        start = 0
        for item, prep in zip(items, prepared):
            stop = start + prep.rows
            self._hand_back(item, prep, [out[start:stop] for out in outputs])
            start = stop

    def _hand_back(self, item: dict[str, Any], prep: Prepared, parts: list[np.ndarray]) -> None:
        """One item's rows of the outputs; a sample sent without its batch dim gets it back so."""
        if prep.unbatched:
            parts = [p[0] if p.ndim >= 1 and p.shape[0] == 1 else p for p in parts]
        item["result"] = parts[0] if len(parts) == 1 else {o.name: p for o, p in zip(self.outputs, parts)}

    def _check_outputs(self, outputs: list[np.ndarray], total: int) -> None:
        for port, out in zip(self.outputs, outputs):
            if out.ndim == 0 or out.shape[0] != total:
                raise BackendError(
                    f"{self.path}: output {port.name!r} has shape {tuple(out.shape)} for a batch of "
                    f"{total} rows; batched outputs must keep the batch as their first dimension. "
                    "Set max = 1 to run this model one request at a time",
                    model_file=self.path,
                    output=port.name,
                    received=list(out.shape),
                    rows=total,
                )


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray(dtype={value.dtype}, shape={tuple(value.shape)})"
    return type(value).__name__
