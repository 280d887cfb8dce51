"""A served model's inputs and outputs: wire values to an item's ``data``, ``result`` to
wire outputs, with the declared-input checks kept cheap for the hot path.  Values in
shared-memory regions are resolved by shm_io.py; a DeviceArray (a CUDA region's input)
passes the declared checks like a numpy array."""
from __future__ import annotations

from typing import Any

import numpy as np
from trtserve_client.wire import decode_value, encode_value, fast_value

from ..backend import NO_RESULT, TensorSpec
from ..errors import BackendError, InvalidArgumentError, InvalidInputError, NoResultError
from ..repository import LoadedModel
from .shm_io import input_value, is_reference

DEFAULT_OUTPUT = "output"  # the output's name when a model declares none


class ModelIO:
    """A served model's known inputs and outputs, and the mapping between wire and item."""

    def __init__(self, model: LoadedModel) -> None:
        inputs, outputs = model.pipeline.io_spec()
        self.name = model.name
        self.inputs: dict[str, _Declared] | None = {t.name: _Declared(model.name, t) for t in inputs} if inputs else None
        self._lone = next(iter(self.inputs.values())) if self.inputs is not None and len(self.inputs) == 1 else None
        self.outputs: list[str] | None = [t.name for t in outputs] if outputs else None
        self.single_output = self.outputs[0] if self.outputs else DEFAULT_OUTPUT
        self.meter: Any = None  # the model version's metrics (server/metrics.ModelMeter), when on

    def item_data(self, raw: Any, shm: Any = None) -> Any:
        """The item's ``data``: the value of a lone input, or a dict name -> value.  ``shm``
        (a shm_io.ShmRequest) resolves inputs given as shared-memory references."""
        if type(raw) is dict and len(raw) == 1 and (self.inputs is None or self._lone is not None):
            value = self._lone_value(raw, shm)
            if value is not None:
                return value
        return self._item_data(raw, shm)

    def _lone_value(self, raw: dict[str, Any], shm: Any) -> Any:
        """The hot path: the one input of a one-input model, well formed; None otherwise
        (then _item_data decodes it, or names what is wrong)."""
        for name, obj in raw.items():  # exactly one
            lone = self._lone
            if type(name) is not str or (lone is not None and name != lone.spec.name):
                return None
            value = fast_value(obj) if shm is None or not is_reference(obj) else input_value(shm, obj, f"inputs[{name!r}]")
            if value is not None and lone is not None and not lone.fits(value):
                return None
            return value
        return None

    def _item_data(self, raw: Any, shm: Any) -> Any:
        if not isinstance(raw, dict) or not raw:
            raise InvalidArgumentError(
                f"field 'inputs' must be a non-empty map of input name to tensor or bytes, got {raw!r:.80}",
                field="inputs",
            )
        values = {}
        for name, obj in raw.items():
            if type(name) is not str:
                raise InvalidArgumentError(f"field 'inputs': input names must be strings, got {name!r}", field="inputs")
            where = f"inputs[{name!r}]"
            values[name] = input_value(shm, obj, where) if is_reference(obj) else decode_value(obj, where)
        if self.inputs is not None:
            _check_inputs(self.name, self.inputs, values)
        if len(values) == 1 and (self.inputs is None or len(self.inputs) == 1):
            return next(iter(values.values()))
        return values

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

    def encode(self, item: dict[str, Any], wanted: list[str] | None, placed: dict[str, Any] | None = None) -> dict[str, Any]:
        """The answer's ``outputs``; ``placed``: outputs already written into regions (their maps)."""
        result = item.get("result")
        if wanted is None and type(result) is np.ndarray and not placed:  # the hot path: one tensor out
            return {self.single_output: self._encode_output(self.single_output, result)}
        values = self.output_values(item, wanted)
        if placed:
            return {str(name): placed[name] if name in placed else self._encode_output(name, value)
                    for name, value in values.items()}
        return {str(name): self._encode_output(name, value) for name, value in values.items()}

    def output_values(self, item: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
        """Output name -> value, as the answer carries them (``wanted`` only, in its order)."""
        if "result" not in item:
            why = item.get(NO_RESULT)
            raise NoResultError(
                f"model {self.name!r} finished the request without a result: "
                + (why if type(why) is str else "a backend could not handle this input (an undecodable image, say)"),
                model=self.name,
            )
        result = item["result"]
        values = result if isinstance(result, dict) else {self.single_output: result}
        if wanted is not None:
            for name in wanted:
                if name not in values:
                    raise self._unknown_output(name, list(values))
            values = {name: values[name] for name in wanted}
        return values

    def _encode_output(self, name: Any, value: Any) -> Any:
        try:
            return encode_value(value)
        except InvalidInputError as exc:  # the model's output, not the client's input
            raise BackendError(f"model {self.name!r} output {name!r}: {exc.message}", model=self.name, output=str(name)) from None

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

    def fits(self, value: Any) -> bool:
        if self.dtype is None:
            return isinstance(value, (bytes, bytearray))
        return ((isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__"))
                and value.dtype == self.dtype and _shape_fits(value.shape, self.shape))

    def check(self, value: Any) -> None:
        if not self.fits(value):
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
    if isinstance(value, (bytes, bytearray)):
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


def _check_inputs(model: str, inputs: dict[str, _Declared], values: dict[str, Any]) -> None:
    """Every declared input is given, and no other; each has its declared dtype and shape."""
    expected = list(inputs)
    for name in values:
        if name not in inputs:
            raise InvalidInputError(
                f"model {model!r} has no input {name!r}; its inputs are {expected}",
                model=model, input=name, expected=expected,
            )
    missing = [name for name in expected if name not in values]
    if missing:
        raise InvalidInputError(
            f"model {model!r} needs input(s) {missing}; send every one of {expected}",
            model=model, missing=missing, expected=expected,
        )
    for name, value in values.items():
        inputs[name].check(value)
