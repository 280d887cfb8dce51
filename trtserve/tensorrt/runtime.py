"""Serialized engine -> ICudaEngine, with errors that say why TensorRT refused it.

TensorRT's deserializer returns None and logs its reason; the reason is captured from the
logger and put in the exception.  TensorRT-RTX can also answer, from the plan's header
alone, whether the engine fits this machine (compute capability, driver, version), which
turns "deserialize failed" into "this GPU's compute capability is not supported".
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from ..errors import ModelUnavailableError
from .cache import EngineArtifact
from .module import logger, module_identity, quote_errors


class EngineRejected(ModelUnavailableError):
    """TensorRT would not deserialize an engine; ``damaged`` when the bytes themselves are bad."""

    def __init__(self, message: str, damaged: bool = False, **details: Any) -> None:
        super().__init__(message, damaged=damaged, **details)
        self.damaged = damaged


def deserialize_engine(trt: ModuleType, artifact: EngineArtifact) -> tuple[Any, Any]:
    """(runtime, engine); the runtime is returned because it must outlive its engines."""
    trt_logger = logger(trt)
    where = f"{artifact.path} ({artifact.source} engine)"
    with trt_logger.capture() as errors:
        runtime = trt.Runtime(trt_logger)
    if runtime is None:
        raise EngineRejected(f"{where}: {trt.__name__}.Runtime could not be created: {quote_errors(errors)}")
    _check_validity(trt, runtime, artifact, where)
    with trt_logger.capture() as errors:
        engine = runtime.deserialize_cuda_engine(artifact.plan)
    if engine is None:
        raise EngineRejected(
            f"{where}: {module_identity(trt)} could not deserialize the engine ({len(artifact.plan)} bytes): "
            f"{quote_errors(errors)}; an engine only loads with the TensorRT package and version that "
            "built it (and, for full TensorRT, a GPU of the same model): rebuild it, or use the ONNX "
            "model so trtserve builds and caches the engine itself",
            model_file=str(artifact.path),
        )
    return runtime, engine


def _check_validity(trt: ModuleType, runtime: Any, artifact: EngineArtifact, where: str) -> None:
    """TensorRT-RTX's header check; full TensorRT 10 has no such API and skips it."""
    if not hasattr(runtime, "get_engine_validity"):
        return
    header = artifact.plan[: runtime.engine_header_size]
    with logger(trt).capture() as errors:
        validity, diagnostics = runtime.get_engine_validity(header)
    if validity != trt.EngineValidity.INVALID:
        return
    reasons = [
        name for name, flag in trt.EngineInvalidityDiagnostics.__members__.items() if int(diagnostics) & int(flag)
    ]
    raise EngineRejected(
        f"{where}: {module_identity(trt)} reports the engine cannot run on this machine "
        f"({', '.join(reasons) or 'no diagnostic given'}; {quote_errors(errors)}); "
        + _validity_hint(reasons),
        damaged="MALFORMED_ENGINE" in reasons,
        model_file=str(artifact.path),
        diagnostics=reasons,
    )


def _validity_hint(reasons: list[str]) -> str:
    if "UNSUPPORTED_CC" in reasons:
        return ("TensorRT-RTX runs on RTX-class GPUs (compute capability 7.5, 8.0, 8.6, 8.9, 12.x); "
                "for data-centre GPUs such as H100 install full TensorRT and set trt_module = 'tensorrt'")
    if "OLD_CUDA_DRIVER" in reasons or "OLD_CUDA_RUNTIME" in reasons:
        return "update the NVIDIA driver / CUDA runtime"
    if "VERSION_MISMATCH" in reasons or "MALFORMED_ENGINE" in reasons:
        return "rebuild the engine with the installed TensorRT-RTX version"
    return "check that a supported NVIDIA GPU and driver are present"

