"""TensorRT support: pick the TensorRT module, build ONNX into engines, cache them, load plans.

Nothing here imports ``tensorrt`` at import time: the CPU-only paths of trtserve never pay
for it.  Two Python packages expose the same builder/runtime API and either one is accepted:

* ``tensorrt`` (``pip install tensorrt``): full TensorRT 10, data-centre GPUs;
* ``tensorrt_rtx`` (``pip install tensorrt-rtx-cu13``): TensorRT for RTX, whose builder also
  works on a machine without a GPU (ahead-of-time build, just-in-time specialisation at load).

See docs/tensorrt.md for the engine cache and what was tested where.
"""
from __future__ import annotations

from .build import BuildSpec, build_engine, parse_onnx
from .cache import EngineArtifact, build_target, ensure_engine, load_plan
from .io import EngineIO, TensorInfo  # pure Python; no tensorrt import
from .module import import_tensorrt, is_strongly_typed_only, logger, module_identity
from .runtime import deserialize_engine

__all__ = [
    "BuildSpec",
    "EngineArtifact",
    "EngineIO",
    "TensorInfo",
    "build_engine",
    "build_target",
    "deserialize_engine",
    "ensure_engine",
    "import_tensorrt",
    "is_strongly_typed_only",
    "load_plan",
    "logger",
    "module_identity",
    "parse_onnx",
]
