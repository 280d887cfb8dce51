"""TensorRT's side of the item convention: checking a request against an engine's inputs.

Pure Python and numpy, so every rule here is tested on a CPU machine.  The convention is
the model backends' own (trtserve.backends.stacking: prepared items, grouping, splitting),
so a model moves between OnnxRuntime and TensorRT without its clients noticing.  What is
TensorRT's alone:

* each input is checked against the engine's optimisation profile (``Bounds``): every
  dimension after the batch between the profile's smallest and largest, and at most
  ``max`` rows per request;
* an input may also live on the GPU already (any object with ``__cuda_array_interface__``,
  e.g. the output of a GPU preprocessing stage on the same stream): it is copied device to
  device instead of through the pinned staging buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.stacking import InputChecker, Prepared, contiguous_strides, describe
from ..errors import InvalidInputError
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


class ItemChecker:
    """Validates items for one engine; ``where`` names the model in every message."""

    def __init__(self, bounds: list[Bounds], max_rows: int, where: str) -> None:
        self.inputs = InputChecker([b.tensor.name for b in bounds], f"TensorrtTensor model {where}", where)
        self.bounds = {b.tensor.name: b for b in bounds}
        self.max_rows = max_rows
        self.where = where
        self.invalid = self.inputs.invalid

    def prepare(self, item: dict[str, Any]) -> Prepared:
        prepared = self.inputs.prepare(item.get("data"), self._check_one)
        if prepared.rows > self.max_rows:
            raise self.invalid(
                f"has {prepared.rows} rows but the engine runs at most {self.max_rows} per batch; split the request",
                rows=prepared.rows,
            )
        return prepared

    def _check_one(self, name: str, value: Any) -> tuple[np.ndarray | DeviceInput, bool]:
        return self._check(self.bounds[name], value)

    def _check(self, bound: Bounds, value: Any) -> tuple[np.ndarray | DeviceInput, bool]:
        tensor = bound.tensor
        array = _as_input(value)
        if array is None:
            kind = f"non-contiguous CUDA array {type(value).__name__}" if hasattr(value, "__cuda_array_interface__") else describe(value)
            raise self.invalid(
                f"input {tensor.name!r} must be a numpy array (or a CUDA array), got {kind}; "
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


def _as_input(value: Any) -> np.ndarray | DeviceInput | None:
    if isinstance(value, np.ndarray):
        return value
    iface = getattr(value, "__cuda_array_interface__", None)
    if not isinstance(iface, dict):
        return None
    shape = tuple(int(d) for d in iface["shape"])
    dtype = np.dtype(iface["typestr"])
    strides = iface.get("strides")
    if strides is not None and tuple(strides) != contiguous_strides(shape, dtype.itemsize):
        return None  # only C-contiguous device memory can be copied as one block
    return DeviceInput(int(iface["data"][0]), shape, dtype, iface.get("stream"))
