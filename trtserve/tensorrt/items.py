"""Items in, rows out: checking a request against an engine's inputs, grouping, splitting.

Pure Python and numpy, so every rule here is tested on a CPU machine.  The conventions are
the OnnxRuntime backend's, so a model moves between the two without its clients noticing:

* a single-input engine takes ``data`` as an array (or a one-entry dict); a multi-input one
  takes a dict name -> array.  A single-output engine's ``result`` is an array, a
  multi-output one's a dict name -> array;
* an input with the engine's rank is batched (its first dimension counts rows); an input one
  rank short is one sample: it travels with a batch dimension of 1, and its results lose it;
* an input may also live on the GPU already (any object with ``__cuda_array_interface__``,
  e.g. the output of a GPU preprocessing stage on the same stream): it is copied device to
  device instead of through the pinned staging buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import did_you_mean
from ..backends.shapes import group as group_shapes
from ..errors import BackendError, InvalidInputError
from .io import TensorInfo


@dataclass(frozen=True)
class Bounds:
    """Per-input limits: the profile's smallest and largest shape (batch included)."""

    tensor: TensorInfo
    lo: tuple[int, ...]
    hi: tuple[int, ...]


@dataclass(frozen=True)
class DeviceInput:
    """A contiguous tensor already in GPU memory (read from ``__cuda_array_interface__``)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    stream: int | None  # the producer's stream, when the interface names one

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass
class Prepared:
    arrays: dict[str, np.ndarray | DeviceInput]  # every input, with its batch dimension
    rows: int
    unbatched: bool


class ItemChecker:
    """Validates items for one engine; ``where`` names the model in every message."""

    def __init__(self, bounds: list[Bounds], max_rows: int, where: str) -> None:
        self.bounds = {b.tensor.name: b for b in bounds}
        self.names = [b.tensor.name for b in bounds]
        self.max_rows = max_rows
        self.where = where

    def prepare(self, item: dict[str, Any]) -> Prepared:
        named = self._named(item.get("data"))
        arrays, modes = {}, set()
        for name, value in named.items():
            array, unbatched = self._check(self.bounds[name], value)
            arrays[name] = array
            modes.add(unbatched)
        if len(modes) > 1:
            raise self.invalid(
                "mixes batched and unbatched inputs ("
                + ", ".join(f"{n} {tuple(_shape(v))}" for n, v in named.items())
                + "); give every input a leading batch dimension, or none of them"
            )
        rows = {n: a.shape[0] for n, a in arrays.items()}
        if len(set(rows.values())) > 1:
            raise self.invalid(f"inputs have different batch sizes {rows}; every input of one request needs the same first dimension")
        count = next(iter(rows.values()))
        if count < 1:
            raise self.invalid("has 0 rows; send at least one row per request")
        if count > self.max_rows:
            raise self.invalid(f"has {count} rows but the engine runs at most {self.max_rows} per batch; split the request", rows=count)
        return Prepared(arrays, count, modes.pop())

    def _named(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            if len(self.names) != 1:
                raise self.invalid(f"has inputs {self.names} but the request sent a single {_describe(data)}; send a dict name -> array")
            return {self.names[0]: data}
        unknown = [n for n in data if n not in self.bounds]
        if unknown:
            name = str(unknown[0])
            raise self.invalid(f"has no input {name!r}{did_you_mean(name, self.names)}; its inputs are {self.names}", input=name)
        missing = [n for n in self.names if n not in data]
        if missing:
            raise self.invalid(f"input(s) {missing} missing from the request, which sent {list(data)}; send every one of {self.names}")
        return {n: data[n] for n in self.names}  # engine order

    def _check(self, bound: Bounds, value: Any) -> tuple[np.ndarray | DeviceInput, bool]:
        tensor = bound.tensor
        array = _as_input(value)
        if array is None:
            raise self.invalid(
                f"input {tensor.name!r} must be a numpy array (or a CUDA array), got {_describe(value)}; "
                f"wrap it with np.asarray(value, dtype=np.{tensor.dtype})",
                input=tensor.name,
            )
        if array.dtype != np.dtype(tensor.dtype):
            raise self.invalid(
                f"input {tensor.name!r} has dtype {array.dtype}, expected {tensor.dtype}; convert it with .astype(np.{tensor.dtype})",
                input=tensor.name,
                received=str(array.dtype),
                expected=tensor.dtype,
            )
        rank = len(tensor.shape)
        unbatched = len(array.shape) == rank - 1
        if len(array.shape) != rank and not unbatched:
            raise self._shape_error(bound, array, f"has {len(array.shape)} dimensions, expected {rank}")
        if unbatched:
            array = array[np.newaxis] if isinstance(array, np.ndarray) else DeviceInput(array.ptr, (1,) + array.shape, array.dtype, array.stream)
        for axis in range(1, rank):
            got, lo, hi = array.shape[axis], bound.lo[axis], bound.hi[axis]
            if not lo <= got <= hi:
                want = str(lo) if lo == hi else f"{lo}..{hi}"
                raise self._shape_error(bound, array, f"dimension {axis - (1 if unbatched else 0)} is {got}, expected {want}")
        return array, unbatched

    def _shape_error(self, bound: Bounds, array: Any, problem: str) -> InvalidInputError:
        rows = "x".join(str(d) if d != -1 else "?" for d in bound.tensor.item_shape) or "scalar"
        return self.invalid(
            f"input {bound.tensor.name!r} has shape {tuple(array.shape)}: {problem}; the engine takes "
            f"(batch, {', '.join(map(str, bound.hi[1:]))}) at most: a batch of rows shaped {rows}, or one row",
            input=bound.tensor.name,
            received=list(array.shape),
            expected=list(bound.tensor.shape),
        )

    def invalid(self, problem: str, **details: Any) -> InvalidInputError:
        return InvalidInputError(f"TensorrtTensor model {self.where}: {problem}", model_file=self.where, **details)


def group(prepared: list[Prepared]) -> list[list[int]]:
    """Indices of items that can share one execution (same non-batch shapes), in order.
    The engine's profile fixes every other dimension, so nothing is ever padded here."""
    return [indices for indices, _ in group_shapes(prepared)]


def split(outputs: dict[str, np.ndarray], prepared: list[Prepared], where: str) -> list[Any]:
    """Per-item results, copied out of the (reused) staging buffers."""
    total = sum(p.rows for p in prepared)
    for name, out in outputs.items():
        if out.ndim == 0 or out.shape[0] != total:
            raise BackendError(
                f"TensorrtTensor model {where}: output {name!r} has shape {tuple(out.shape)} for a batch of "
                f"{total} rows; batched outputs must keep the batch as their first dimension (set max = 1 "
                "to run this model one request at a time)",
                model_file=where,
                output=name,
            )
    results, start = [], 0
    for prep in prepared:
        stop = start + prep.rows
        parts = {name: out[start:stop].copy() for name, out in outputs.items()}
        if prep.unbatched:
            parts = {name: part[0] for name, part in parts.items()}
        results.append(next(iter(parts.values())) if len(parts) == 1 else parts)
        start = stop
    return results


def _as_input(value: Any) -> np.ndarray | DeviceInput | None:
    if isinstance(value, np.ndarray):
        return value
    iface = getattr(value, "__cuda_array_interface__", None)
    if not isinstance(iface, dict):
        return None
    shape = tuple(int(d) for d in iface["shape"])
    dtype = np.dtype(iface["typestr"])
    strides = iface.get("strides")
    if strides is not None and tuple(strides) != _c_strides(shape, dtype.itemsize):
        return None  # only C-contiguous device memory can be copied as one block
    return DeviceInput(int(iface["data"][0]), shape, dtype, iface.get("stream"))


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray(dtype={value.dtype}, shape={tuple(value.shape)})"
    if hasattr(value, "__cuda_array_interface__"):
        return f"non-contiguous CUDA array {type(value).__name__}"
    return type(value).__name__
