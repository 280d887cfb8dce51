"""Batching tensors: items in, one model call's inputs out, each item's rows back.

The convention the model backends share (OnnxRuntime, TensorrtTensor, TorchScriptTensor),
so a model moves between them without its clients noticing:

* **Checking declared inputs** (``InputChecker``).  A one-input model takes ``data`` as an
  array (or a one-entry dict); a model with several inputs takes a dict name -> array.
  Each backend checks one value against its own declaration (dtype, rank, fixed or bounded
  dimensions); the rules across inputs live here: every input present and known, all
  batched or all one sample, one row count, at least one row.
* **Prepared items** (``Prepared``).  Every input carries its batch dimension: an input
  one rank short is one sample and travels with a leading dimension of 1 (``unbatched``),
  which its results lose again.
* **Grouping** (``group``).  Items whose inputs agree on dtype and on every dimension but
  the first (their signature) run as one call; the others run one call per signature, in
  the order each first appears, or padded into one call where the ``pad`` policy says so
  (backends/shapes.py).
* **Stacking** (``stack``) concatenates each input's rows on axis 0, and **splitting**
  (``split``) hands each item its rows of every output, after ``check_rows`` made sure
  the outputs kept the batch as their first dimension.

Pure numpy: every rule here is tested on a CPU machine.  Device memory appears only as
values that have ``shape`` and ``dtype`` (TensorRT's DeviceInput, the GPU stages'
DeviceArray); nothing here imports cuda.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..backend import did_you_mean
from ..errors import BackendError, InvalidInputError

Padding = dict[str, tuple[tuple[int, ...], float]]  # input -> (shape without the batch dim, value)


class PadPolicy(Protocol):
    """One input's ``pad`` rule, as backends/shapes.PadRule gives it (read-only: PadRule is frozen)."""

    @property
    def axes(self) -> tuple[int, ...]: ...

    @property
    def value(self) -> float: ...

    @property
    def limit(self) -> int | None: ...


@dataclass(slots=True)
class Prepared:
    """One item's inputs, each with its batch dimension, ready to stack."""

    arrays: dict[str, Any]  # numpy arrays, or device values with ``shape`` and ``dtype``
    rows: int
    unbatched: bool  # the caller sent one sample without a batch dimension: results lose it


# --------------------------------------------------------------------------- checking declared inputs

CheckOne = Callable[[str, Any], tuple[Any, bool]]  # (input name, value) -> (value with batch dim, was one sample)


class InputChecker:
    """The rules across a model's declared inputs; ``label`` (``"OnnxRuntime model m.onnx"``)
    starts every message and ``model_file`` goes in every error's details."""

    def __init__(self, names: list[str], label: str, model_file: str) -> None:
        self.names = names
        self.known = frozenset(names)
        self.label = label
        self.model_file = model_file

    def prepare(self, data: Any, check_one: CheckOne) -> Prepared:
        """The item's inputs with their batch dimension, or InvalidInputError naming the problem."""
        named = self.named(data)
        checked = {name: check_one(name, value) for name, value in named.items()}
        if len({unbatched for _, unbatched in checked.values()}) > 1:
            raise self.invalid(
                "mixes batched and unbatched inputs: "
                + ", ".join(f"{n} {shape_of(v)}" for n, v in named.items())
                + "; give every input a leading batch dimension, or none of them",
                received={n: list(shape_of(v)) for n, v in named.items()},
            )
        arrays = {name: value for name, (value, _) in checked.items()}
        rows = {name: int(value.shape[0]) for name, value in arrays.items()}
        if len(set(rows.values())) > 1:
            raise self.invalid(
                f"inputs have different batch sizes {rows}; every input of one request needs the same first dimension",
                received=rows,
            )
        count = next(iter(rows.values()))
        if count == 0:
            raise self.invalid("has 0 rows; send at least one row per request", received=rows)
        return Prepared(arrays, count, next(iter(checked.values()))[1])

    def named(self, data: Any) -> dict[str, Any]:
        """``data`` as a dict name -> value in the model's order (so stacking lines up)."""
        names = self.names
        if not isinstance(data, dict):
            if len(names) != 1:
                raise self.invalid(
                    f"has inputs {names} but the request sent a single {describe(data)}; send a dict name -> array",
                    received=describe(data),
                    expected=names,
                )
            return {names[0]: data}
        for name in data:
            if name not in self.known:
                raise self.invalid(
                    f"has no input {name!r}{did_you_mean(str(name), names)}; its inputs are {names}",
                    input=str(name),
                    expected=names,
                )
        missing = [n for n in names if n not in data]
        if missing:
            raise self.invalid(
                f"input(s) {missing} missing from the request, which sent {list(data)}; send every one of {names}",
                missing=missing,
                expected=names,
            )
        return {n: data[n] for n in names}

    def invalid(self, problem: str, **details: Any) -> InvalidInputError:
        return InvalidInputError(f"{self.label}: {problem}", model_file=self.model_file, **details)


# --------------------------------------------------------------------------- grouping and stacking


def group(prepared: list[Prepared], rules: Mapping[str, PadPolicy] | None = None) -> list[tuple[list[int], Padding | None]]:
    """Item indices that run as one call, in order of first appearance, each with what to
    pad each input to (``Padding``), or None when nothing is padded."""
    groups: dict[tuple, list[int]] = {}
    for index, prep in enumerate(prepared):
        groups.setdefault(signature(prep, rules), []).append(index)
    if not rules:
        return [(indices, None) for indices in groups.values()]
    return [(indices, _target([prepared[i] for i in indices], rules)) for indices in groups.values()]


def signature(prep: Prepared, rules: Mapping[str, PadPolicy] | None = None) -> tuple:
    """What must agree for items to stack: per input its dtype and its dimensions after the
    batch, where padded dimensions that fit their limit do not count."""
    key = []
    for name, array in prep.arrays.items():
        shape = tuple(array.shape[1:])
        rule = rules.get(name) if rules else None
        if rule is not None:
            shape = tuple(
                None if axis + 1 in rule.axes and (rule.limit is None or dim <= rule.limit) else dim
                for axis, dim in enumerate(shape)
            )
        key.append((dtype_str(array.dtype), shape))
    return tuple(key)


# str(dtype) by the dtype's type and value.  numpy builds a dtype's name in Python (about
# 5 us), and signature runs for every item of every batch, under the GIL the instance
# threads and the event loop share: on a host-bound GPU model it cost a tenth of the rate.
_DTYPE_NAMES: dict[tuple[type, Any], str] = {}
_DTYPE_NAMES_MAX = 256  # dtypes a process meets are few; past this, names are not kept


def dtype_str(dtype: Any) -> str:
    """``str(dtype)``, remembered for the dtypes seen (any hashable dtype: numpy's, torch's,
    a string)."""
    key = (type(dtype), dtype)
    try:
        return _DTYPE_NAMES[key]
    except KeyError:
        name = str(dtype)
        if len(_DTYPE_NAMES) < _DTYPE_NAMES_MAX:
            _DTYPE_NAMES[key] = name
        return name
    except TypeError:  # an unhashable dtype
        return str(dtype)


def _target(members: list[Prepared], rules: Mapping[str, PadPolicy]) -> Padding | None:
    target = {}
    for name, rule in rules.items():
        shapes = [m.arrays[name].shape[1:] for m in members]
        largest = tuple(max(dims) for dims in zip(*shapes))
        if any(shape != largest for shape in shapes):
            target[name] = (largest, rule.value)
    return target or None


def stack(arrays: list[np.ndarray], pad: tuple[tuple[int, ...], float] | None = None) -> np.ndarray:
    """The batch of one input: ``arrays`` concatenated on axis 0, each padded at the end of
    its dimensions to ``pad``'s shape with its value (None: they already agree)."""
    if pad is None:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    shape, value = pad
    rows = sum(a.shape[0] for a in arrays)
    batch = np.full((rows,) + tuple(shape), value, dtype=arrays[0].dtype)  # one allocation
    start = 0
    for array in arrays:
        stop = start + array.shape[0]
        batch[(slice(start, stop),) + tuple(slice(0, d) for d in array.shape[1:])] = array
        start = stop
    return batch


# --------------------------------------------------------------------------- splitting


def check_rows(outputs: dict[str, Any], total: int, label: str, model_file: str) -> None:
    """BackendError naming the output when one did not keep the batch (``total`` rows) as
    its first dimension: its rows could not be handed back to their items."""
    for name, out in outputs.items():
        shape = tuple(out.shape)
        if not shape or shape[0] != total:
            raise BackendError(
                f"{label}: output {name!r} has shape {shape} for a batch of {total} rows; batched outputs must "
                "keep the batch as their first dimension (set max = 1 to run this model one request at a time)",
                model_file=model_file,
                output=name,
                received=list(shape),
                rows=total,
            )


def split(outputs: dict[str, Any], prepared: list[Prepared], copy: bool = False) -> list[dict[str, Any]]:
    """Each item's rows of every output (checked by ``check_rows`` first), in item order:
    views, or copies when ``copy`` (outputs in a buffer the next batch reuses).  An item
    that was one sample gets its rows without the batch dimension."""
    parts, start = [], 0
    for prep in prepared:
        stop = start + prep.rows
        mine = {name: rows(out, start, stop) for name, out in outputs.items()}
        if copy:
            mine = {name: part.copy() for name, part in mine.items()}
        parts.append(drop_batch(mine) if prep.unbatched else mine)
        start = stop
    return parts


def bounds(counts: Iterable[int]) -> Iterable[tuple[int, int]]:
    """``(start, stop)`` of each item's rows in a batch stacked from row counts ``counts``."""
    start = 0
    for count in counts:
        yield start, start + count
        start += count


def rows(out: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of a numpy array or a DeviceArray, as a view."""
    return out[start:stop] if isinstance(out, np.ndarray) else out.rows(start, stop)


def drop_batch(parts: dict[str, Any]) -> dict[str, Any]:
    """One sample's results without the batch dimension of 1 it travelled with (an output
    that has no such dimension, from a model run on this item alone, stays as it is)."""
    return {name: _first(part) for name, part in parts.items()}


def _first(part: Any) -> Any:
    if part.ndim == 0 or part.shape[0] != 1:
        return part
    return part[0] if isinstance(part, np.ndarray) else part.reshape(tuple(part.shape[1:]))


def as_result(parts: dict[str, Any]) -> Any:
    """What an item's ``result`` holds: the lone output's value, or a dict name -> value."""
    return next(iter(parts.values())) if len(parts) == 1 else parts


# --------------------------------------------------------------------------- small helpers


def contiguous_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """The byte strides of a C-contiguous array: what ``__cuda_array_interface__`` must
    report (or leave None) for memory that can be copied as one block."""
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def describe(value: Any) -> str:
    """A value as an error message names it."""
    if isinstance(value, np.ndarray):
        return f"ndarray(dtype={value.dtype}, shape={tuple(value.shape)})"
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}(shape={tuple(shape)})" if shape is not None else type(value).__name__
