"""TensorrtTensor: a TensorRT engine as a batched backend (TorchPipe's TensorrtTensor).

``model`` is an ONNX file (built into an engine with one profile ``min..max`` on the batch
dimension and cached next to it, see trtserve.tensorrt.cache) or a prebuilt ``.plan`` /
``.engine`` file (loaded as is).  Each instance, on its own thread, deserializes the engine,
creates one execution context and allocates its buffers once for ``max`` rows.  Inside
``SyncTensor[TensorrtTensor]`` it enqueues on SyncTensor's stream; alone, on its own.

Items follow the OnnxRuntime backend's conventions (see trtserve.tensorrt.items), so a
model can move between the two without its clients noticing.  Without a CUDA GPU the
model fails to load with ModelUnavailableError saying so; nothing crashes.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...backend import Backend, BackendOptions, InstanceContext, Key, Signature, TensorSpec, option
from ...errors import ConfigError, ModelUnavailableError
from ..stacking import as_result, check_rows, group, split

if TYPE_CHECKING:
    from ...tensorrt.execution import EngineRunner

log = logging.getLogger("trtserve.tensorrt")
ONNX_SUFFIXES = (".onnx",)
PLAN_SUFFIXES = (".plan", ".engine", ".trt")
BUILD_KEYS = ("precision", "workspace_mb", "engine_cache", "input_shapes")  # meaningless for a prebuilt plan


def _workspace(value: int) -> str | None:
    return None if value >= 0 else "must be >= 0 (MB of builder workspace; 0 = the builder's default)"


def _input_shapes(value: dict) -> str | None:
    for name, shape in value.items():
        if not isinstance(shape, list) or not all(type(d) is int and d >= 1 for d in shape):
            return f"must map input names to per-row shapes of positive integers, e.g. {{ images = [3, 224, 224] }}; {name} = {shape!r}"
    return None


@dataclass(frozen=True)
class TensorrtOptions(BackendOptions):
    model: str = ""  # the node's model file (required_keys)
    min: int = 1  # the node's batch range: the engine's profile on the batch dimension
    max: int = 1
    precision: str = option(
        Key(str, "fp32", "fp32 or fp16 (see docs/tensorrt.md for strongly typed builders)", choices=("fp32", "fp16"))
    )
    workspace_mb: int = option(Key(int, 1024, "builder workspace limit in MB; 0 = the builder's default", check=_workspace))
    trt_module: str = option(
        Key(str, "auto", "TensorRT package: auto, tensorrt or tensorrt_rtx", choices=("auto", "tensorrt", "tensorrt_rtx"))
    )
    engine_cache: bool = option(Key(bool, True, "cache the built engine next to the ONNX model"))
    input_shapes: Mapping[str, tuple[int, ...]] | None = option(
        Key(dict, None, "per-row shapes of inputs with dynamic non-batch dims", check=_input_shapes)
    )

    def build_keys_set(self) -> list[str]:
        """The build keys this config sets away from their defaults (meaningless for a prebuilt plan)."""
        defaults = {f.name: f.default for f in fields(self)}
        return [key for key in BUILD_KEYS if getattr(self, key) != defaults[key]]

    def check(self) -> None:
        """A prebuilt engine is loaded as built: keys that only steer a build contradict it."""
        if Path(self.model).suffix.lower() not in PLAN_SUFFIXES:
            return
        for key in self.build_keys_set():
            value = getattr(self, key)
            if key == "input_shapes":  # as the config file wrote it
                value = {name: list(shape) for name, shape in value.items()}
            raise ConfigError(
                f"{key} = {value!r} applies to ONNX models only; {self.model} is a prebuilt engine, "
                f"loaded as built: remove {key}, or point model at the ONNX file",
                key=key,
                value=repr(value),
            )


class TensorrtTensor(Backend):
    thread_bound = True  # enqueues on the instance's current stream
    Options = TensorrtOptions
    required_keys = ("model",)

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        self.runner: EngineRunner | None = None
        self._keep: tuple[Any, ...] = ()
        self._record_call = context.record_call
        config = context.options(TensorrtOptions)
        path = self._model_path(config)
        self.path = str(path)
        from ... import cuda

        if not cuda.is_available():
            raise ModelUnavailableError(
                f"TensorrtTensor needs a CUDA GPU: {cuda.unavailable_reason()}; model {path} cannot load on "
                "this machine (run it where an NVIDIA GPU, its driver and cuda-python are installed, or serve "
                "the ONNX model with the OnnxRuntime backend on CPU)",
                backend="TensorrtTensor",
                model_file=str(path),
            )
        cuda.raise_if_poisoned()
        cuda.ensure_device()
        from ...tensorrt import import_tensorrt
        from ...tensorrt.io import engine_io

        trt = import_tensorrt(config.trt_module)
        runtime, engine, artifact = self._engine(trt, path, config)
        io = engine_io(trt, engine, str(path))
        if artifact.io is not None:
            # The build recorded shapes with input_shapes applied; the engine must agree on the rest.
            if [(t.name, t.dtype) for t in artifact.io.inputs + artifact.io.outputs] != [(t.name, t.dtype) for t in io.inputs + io.outputs]:
                raise ModelUnavailableError(
                    f"{path}: the engine's tensors {[(t.name, t.dtype) for t in io.inputs + io.outputs]} differ from "
                    f"those recorded at build {[(t.name, t.dtype) for t in artifact.io.inputs + artifact.io.outputs]}; "
                    f"delete {artifact.path} to rebuild",
                    model_file=str(path),
                )
            io = artifact.io
        from ...tensorrt.execution import EngineRunner
        from ...tensorrt.items import ItemChecker

        self.runner = EngineRunner(trt, engine, io, config.min, config.max, str(path))
        self._keep = (runtime, engine)  # the runtime must outlive the engine, the engine its context
        self.io = io
        self.checker = ItemChecker(self.runner.bounds, config.max, str(path))
        log.info("TensorrtTensor %s ready (%s engine, %s, batch %d..%d)", path, artifact.source,
                 trt.__name__, config.min, config.max)

    def _model_path(self, config: TensorrtOptions) -> Path:
        model = config.model
        if not model:
            raise ConfigError(
                "TensorrtTensor needs the config key 'model'; add model = \"model.onnx\" (or a .plan "
                "file) relative to the version folder",
                key="model",
                backend="TensorrtTensor",
            )
        path = Path(model)
        if path.suffix.lower() not in ONNX_SUFFIXES + PLAN_SUFFIXES:
            raise ConfigError(
                f"TensorrtTensor model = {model!r}: unknown file type {path.suffix!r}; use an ONNX model "
                f"({', '.join(ONNX_SUFFIXES)}) or a serialized engine ({', '.join(PLAN_SUFFIXES)})",
                key="model",
                value=model,
            )
        return path

    def _engine(self, trt: Any, path: Path, config: TensorrtOptions):
        """(runtime, engine, artifact); a cached engine TensorRT refuses is rebuilt once."""
        from ...tensorrt import BuildSpec, deserialize_engine, ensure_engine, load_plan
        from ...tensorrt.runtime import EngineRejected

        if path.suffix.lower() in PLAN_SUFFIXES:
            config.check()  # the loader checked already; a backend built by hand is checked here
            artifact = load_plan(path)
            return (*deserialize_engine(trt, artifact), artifact)
        spec = BuildSpec(
            min_batch=config.min,
            max_batch=config.max,
            precision=config.precision,
            workspace_mb=config.workspace_mb,
            input_shapes={k: tuple(v) for k, v in (config.input_shapes or {}).items()},
        )
        artifact = ensure_engine(trt, path, spec, use_cache=config.engine_cache)
        try:
            return (*deserialize_engine(trt, artifact), artifact)
        except EngineRejected as exc:
            if artifact.source != "cache":
                raise
            # The bytes were verified, so the runtime refuses what the key could not see
            # (a driver update, say): build afresh once, and let a second refusal stand.
            log.warning("cached engine %s was refused (%s); rebuilding it", artifact.path, exc.message)
            artifact = ensure_engine(trt, path, spec, force_rebuild=True)
            return (*deserialize_engine(trt, artifact), artifact)

    # -- read-only questions (caller's thread) -----------------------------------------
    def validate(self, item: dict[str, Any]) -> None:
        self.checker.prepare(item)

    def request_size(self, item: dict[str, Any]) -> int:
        return self.checker.prepare(item).rows

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return self.io.specs()

    def signature(self) -> Signature:
        inputs, outputs = self.io.specs()
        return Signature(self.path, tuple(inputs), tuple(outputs))

    # -- execution (instance thread) ---------------------------------------------------
    def forward(self, items: list[dict[str, Any]]) -> None:
        # Checked again: inside S[...] only the first stage's validate runs before queueing.
        runner = self.runner
        assert runner is not None, "TensorrtTensor.forward before init"
        prepared = [self.checker.prepare(item) for item in items]
        for indices, _ in group(prepared):  # the profile fixes the other dims: nothing is padded
            members = [prepared[i] for i in indices]
            outputs = runner.run(members)
            total = sum(m.rows for m in members)
            self._record_call(total)
            check_rows(outputs, total, self.checker.inputs.label, self.path)
            # Copies: the outputs are views of staging buffers the next batch reuses.
            for index, parts in zip(indices, split(outputs, members, copy=True)):
                items[index]["result"] = as_result(parts)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        self._keep = ()  # engine, then runtime, released after the context
