"""ONNX -> serialized TensorRT engine, with one optimization profile over the batch dimension.

The profile is ``min..max`` on the first dimension of every input, with ``opt = max``: a
server under load runs full batches, so that is the shape worth tuning for.  Every other
dimension comes from the ONNX model's static shape, or from the ``input_shapes`` key when
the model leaves it dynamic (one profile cannot guess an image size).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..backend import did_you_mean
from ..errors import ConfigError, ModelUnavailableError
from .io import EngineIO, TensorInfo, network_io
from .module import is_strongly_typed_only, logger, quote_errors

PRECISIONS = ("fp32", "fp16")
log = logging.getLogger("trtserve.tensorrt")


@dataclass(frozen=True)
class BuildSpec:
    """What an engine is built for; every field is part of the engine cache key."""

    min_batch: int = 1
    max_batch: int = 1
    precision: str = "fp32"
    workspace_mb: int = 1024  # 0 = the builder's default (all device memory)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per-row shapes

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.max_batch:
            raise ConfigError(
                f"engine batch range min={self.min_batch} max={self.max_batch} is invalid; need 1 <= min <= max",
                key="min",
                value=self.min_batch,
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision = {self.precision!r} is not one of {list(PRECISIONS)}",
                key="precision",
                value=repr(self.precision),
            )
        if self.workspace_mb < 0:
            raise ConfigError(f"workspace_mb = {self.workspace_mb} must be >= 0 (0 = builder default)", key="workspace_mb")

    def key_fields(self) -> dict[str, Any]:
        return {
            "min_batch": self.min_batch,
            "opt_batch": self.max_batch,
            "max_batch": self.max_batch,
            "precision": self.precision,
            "workspace_mb": self.workspace_mb,
            "input_shapes": {k: list(v) for k, v in sorted(self.input_shapes.items())},
        }


@dataclass
class BuiltEngine:
    plan: bytes
    io: EngineIO  # inputs with their profile-resolved shapes
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max]
    seconds: float


def parse_onnx(trt: ModuleType, path: Path) -> tuple[Any, Any, Any]:
    """(builder, network, parser) for an ONNX file; parser errors -> ConfigError listing them."""
    trt_logger = logger(trt)
    with trt_logger.capture() as errors:
        builder = trt.Builder(trt_logger)
    if builder is None:
        raise ModelUnavailableError(
            f"{path}: {trt.__name__}.Builder could not be created ({quote_errors(errors)}); "
            "full TensorRT needs a CUDA GPU to build; on a CPU-only machine use tensorrt_rtx",
            file=str(path),
        )
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    with trt_logger.capture() as errors:
        ok = parser.parse_from_file(str(path))  # from the file, so external weights resolve
    if not ok:
        problems = []
        for index in range(parser.num_errors):
            err = parser.get_error(index)
            node = f" at node {err.node()} ({err.node_name() or '?'}: {err.node_operator() or '?'})" if err.node() >= 0 else ""
            problems.append(f"{err.code()}{node}: {err.desc()}")
        raise ConfigError(
            f"{path}: {trt.__name__}'s ONNX parser rejected the model with {len(problems)} error(s): "
            + "; ".join(problems or [quote_errors(errors)])
            + "; check the file is a valid ONNX model (onnx.checker.check_model) that TensorRT supports",
            file=str(path),
            errors=problems,
        )
    if network.num_inputs == 0 or network.num_outputs == 0:
        # Protobuf parsing is lenient: some non-ONNX bytes decode as an empty model, which the
        # parser accepts.  Such a "model" would only fail later, at build, with a vaguer error.
        raise ConfigError(
            f"{path}: parsed into a network with {network.num_inputs} inputs and {network.num_outputs} "
            "outputs, so it is not a usable ONNX model (is it an ONNX file at all?); export the model "
            "again and check it with onnx.checker.check_model",
            file=str(path),
        )
    return builder, network, parser


def resolve_profile(io: EngineIO, spec: BuildSpec, where: str) -> tuple[EngineIO, dict[str, list[list[int]]]]:
    """Input shapes for the profile: batch ``min..max`` (opt = max), other dims fixed."""
    names = [t.name for t in io.inputs]
    for name in spec.input_shapes:
        if name not in names:
            raise ConfigError(
                f"{where}: input_shapes names {name!r}, which is not an input of the model"
                f"{did_you_mean(name, names)}; inputs are {names}",
                file=where,
                key="input_shapes",
                value=name,
            )
    resolved, profile, batch_kinds = [], {}, set()
    for tensor in io.inputs:
        if not tensor.shape:
            raise ConfigError(
                f"{where}: input {tensor.name!r} is a scalar; TensorrtTensor batches along the first "
                "dimension, so every input needs one (export it with shape [batch, ...])",
                file=where,
                tensor=tensor.name,
            )
        rows = _row_shape(tensor, spec, where)
        batch = tensor.shape[0]
        batch_kinds.add("dynamic" if batch == -1 else "static")
        if batch != -1 and not spec.min_batch == spec.max_batch == batch:
            raise ConfigError(
                f"{where}: input {tensor.name!r} has a fixed batch dimension of {batch} (shape "
                f"{list(tensor.shape)}) but the node asks for batches of {spec.min_batch}..{spec.max_batch}; "
                f"set min = max = {batch}, or export the model with a dynamic first dimension",
                file=where,
                tensor=tensor.name,
                shape=list(tensor.shape),
            )
        resolved.append(TensorInfo(tensor.name, tensor.dtype, (batch,) + rows))
        if batch == -1 or -1 in tensor.shape[1:]:
            lo, hi = (spec.min_batch, spec.max_batch) if batch == -1 else (batch, batch)
            profile[tensor.name] = [[lo, *rows], [hi, *rows], [hi, *rows]]
    if len(batch_kinds) > 1:
        raise ConfigError(
            f"{where}: some inputs have a dynamic first dimension and some a fixed one "
            f"({[list(t.shape) for t in io.inputs]}); every input must batch the same way",
            file=where,
        )
    return EngineIO(tuple(resolved), io.outputs), profile


def _row_shape(tensor: TensorInfo, spec: BuildSpec, where: str) -> tuple[int, ...]:
    rows = tensor.item_shape
    given = spec.input_shapes.get(tensor.name)
    if given is None:
        if -1 in rows:
            example = [d if d != -1 else 224 for d in rows]
            raise ConfigError(
                f"{where}: input {tensor.name!r} has dynamic dimensions beyond the batch "
                f"(shape {list(tensor.shape)}); the engine's one profile needs them fixed: set "
                f"input_shapes = {{ {tensor.name} = {example} }} (the shape of one row, without the batch "
                "dimension) or export the model with static dimensions",
                file=where,
                key="input_shapes",
                tensor=tensor.name,
                shape=list(tensor.shape),
            )
        return rows
    given = tuple(given)
    if len(given) != len(rows) or any(m != -1 and m != g for m, g in zip(rows, given)):
        raise ConfigError(
            f"{where}: input_shapes.{tensor.name} = {list(given)} does not fit the model's shape "
            f"{list(tensor.shape)}; give the {len(rows)} dimensions after the batch, keeping the "
            "fixed ones as they are",
            file=where,
            key="input_shapes",
            value=list(given),
        )
    return given


def build_engine(trt: ModuleType, path: Path, spec: BuildSpec) -> BuiltEngine:
    """Parse ``path`` and build a serialized engine for ``spec``."""
    started = time.perf_counter()
    builder, network, _parser = parse_onnx(trt, path)
    io, profile = resolve_profile(network_io(trt, network, str(path)), spec, str(path))
    config = builder.create_builder_config()
    _set_precision(trt, config, network, spec, path)
    if spec.workspace_mb:
        limit = spec.workspace_mb << 20
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, limit)
        if config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) != limit:
            raise ConfigError(f"{path}: {trt.__name__} did not accept workspace_mb = {spec.workspace_mb}", key="workspace_mb")
    trt_logger = logger(trt)
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)  # returns nothing; validity is checked below
        with trt_logger.capture() as errors:
            index = config.add_optimization_profile(opt_profile)
        if index < 0:
            raise ConfigError(
                f"{path}: {trt.__name__} rejected the optimization profile {profile} ({quote_errors(errors)})",
                file=str(path),
                profile=profile,
            )
    with trt_logger.capture() as errors:
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelUnavailableError(
            f"{path}: {trt.__name__} failed to build an engine (batch {spec.min_batch}..{spec.max_batch}, "
            f"{spec.precision}, workspace {spec.workspace_mb} MB): {quote_errors(errors)}",
            file=str(path),
        )
    plan = bytes(serialized)
    seconds = time.perf_counter() - started
    log.info("built %s engine for %s in %.2f s (%d bytes, batch %d..%d, %s)", trt.__name__, path, seconds,
             len(plan), spec.min_batch, spec.max_batch, spec.precision)
    return BuiltEngine(plan, io, profile, seconds)


def _set_precision(trt: ModuleType, config: Any, network: Any, spec: BuildSpec, path: Path) -> None:
    if not is_strongly_typed_only(trt):
        # Weakly typed TensorRT 10: FP16 lets the builder pick half-precision kernels.
        if spec.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            if not config.get_flag(trt.BuilderFlag.FP16):
                raise ConfigError(f"{path}: {trt.__name__} refused BuilderFlag.FP16", key="precision")
        return
    # Strongly typed builders run each tensor in the type the model gives it; "fp16" then
    # means the model must carry fp16 itself, or the setting would silently mean nothing.
    if spec.precision == "fp16" and not _has_half(trt, network):
        raise ConfigError(
            f"{path}: precision = 'fp16', but {trt.__name__} builds strongly typed networks (its precision "
            "is the model's own) and this model has no float16 tensor; convert the model to fp16 first "
            "(onnxconverter_common.float16.convert_float_to_float16(model, keep_io_types=True), or "
            "python -m modelopt.onnx.autocast --onnx_path model.onnx) or set precision = 'fp32'",
            file=str(path),
            key="precision",
            value="'fp16'",
        )


def _has_half(trt: ModuleType, network: Any) -> bool:
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if any(layer.get_output(i).dtype == trt.DataType.HALF for i in range(layer.num_outputs)):
            return True
    return False
