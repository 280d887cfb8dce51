"""Inputs and outputs of a network or engine, as plain data (names, numpy dtypes, shapes).

Read once (from the parsed network at build time, from the engine when a plan is loaded),
then stored in the engine cache's header so a cache hit knows its I/O without TensorRT
having to deserialize anything.  -1 marks a dynamic dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import TensorSpec
from ..errors import ConfigError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]

    @property
    def item_shape(self) -> tuple[int, ...]:
        """The shape of one row: everything after the batch dimension."""
        return self.shape[1:]

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape, batched=bool(self.shape))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TensorInfo:
        return cls(str(raw["name"]), str(raw["dtype"]), tuple(int(d) for d in raw["shape"]))


@dataclass(frozen=True)
class EngineIO:
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [t.spec() for t in self.inputs], [t.spec() for t in self.outputs]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineIO:
        return cls(
            tuple(TensorInfo.from_dict(t) for t in raw["inputs"]),
            tuple(TensorInfo.from_dict(t) for t in raw["outputs"]),
        )


def numpy_dtype(trt: ModuleType, trt_dtype: Any, tensor: str, where: str) -> str:
    """The numpy name of a TensorRT DataType; types numpy cannot hold (bf16, fp8, int4) fail."""
    try:
        return np.dtype(trt.nptype(trt_dtype)).name
    except TypeError:
        raise ConfigError(
            f"{where}: tensor {tensor!r} has TensorRT type {trt_dtype}, which has no numpy "
            "equivalent, so trtserve cannot pass it in or out; cast it to float16/float32 in the "
            "model (e.g. a Cast node at the model's edge)",
            file=where,
            tensor=tensor,
            dtype=str(trt_dtype),
        ) from None


def network_io(trt: ModuleType, network: Any, where: str) -> EngineIO:
    """I/O of a parsed INetworkDefinition."""
    def info(tensor: Any, kind: str) -> TensorInfo:
        if tensor.is_shape_tensor:
            raise ConfigError(
                f"{where}: {kind} {tensor.name!r} is a shape tensor (its values set shapes); "
                "TensorrtTensor feeds only execution tensors; remove it from the model's interface",
                file=where,
                tensor=tensor.name,
            )
        return TensorInfo(tensor.name, numpy_dtype(trt, tensor.dtype, tensor.name, where), tuple(tensor.shape))

    return EngineIO(
        tuple(info(network.get_input(i), "input") for i in range(network.num_inputs)),
        tuple(info(network.get_output(i), "output") for i in range(network.num_outputs)),
    )


def engine_io(trt: ModuleType, engine: Any, where: str) -> EngineIO:
    """I/O of an ICudaEngine, in its tensor order (TensorRT 10 name-based API)."""
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_location(name) != trt.TensorLocation.DEVICE:
            raise ConfigError(
                f"{where}: tensor {name!r} lives in host memory (a shape tensor); TensorrtTensor "
                "binds device tensors only; rebuild the engine without host I/O tensors",
                file=where,
                tensor=name,
            )
        info = TensorInfo(name, numpy_dtype(trt, engine.get_tensor_dtype(name), name, where), tuple(engine.get_tensor_shape(name)))
        mode = engine.get_tensor_mode(name)
        if mode == trt.TensorIOMode.INPUT:
            inputs.append(info)
        elif mode == trt.TensorIOMode.OUTPUT:
            outputs.append(info)
    if not inputs or not outputs:
        raise ConfigError(
            f"{where}: the engine has {len(inputs)} inputs and {len(outputs)} outputs; it needs "
            "at least one of each",
            file=where,
        )
    return EngineIO(tuple(inputs), tuple(outputs))
