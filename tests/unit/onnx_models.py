"""Small real ONNX models for the tests, built with onnx.helper (opset 17, checked)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

info = helper.make_tensor_value_info
node = helper.make_node
FLOAT, UINT8, INT64 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT64


def save(path: Path, nodes, inputs, outputs, inits=()) -> str:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def const(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def nchw_means(path: Path, size: int = 64) -> str:
    """x float32 [N, 3, size, size] -> y float32 [N, 3]: each channel's mean."""
    return save(path, [node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
                [info("x", FLOAT, ["N", 3, size, size])], [info("y", FLOAT, ["N", 3])])


def two_outputs(path: Path) -> str:
    """x float32 [N, 2] -> a = x, save_infer_model/scale_0.tmp_1 = -x (a Paddle-style name)."""
    return save(path, [node("Identity", ["x"], ["a"]), node("Neg", ["x"], ["save_infer_model/scale_0.tmp_1"])],
                [info("x", FLOAT, ["N", 2])],
                [info("a", FLOAT, ["N", 2]), info("save_infer_model/scale_0.tmp_1", FLOAT, ["N", 2])])


def recognizer(path: Path, height: int = 8) -> str:
    """An OCR recognizer's shape: x float32 [N, 3, height, W] (dynamic width) -> y float32
    [N, W], each column's sum, so a padded column of zeros shows as a 0 at the end."""
    return save(path, [node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
                [info("x", FLOAT, ["N", 3, height, "W"])], [info("y", FLOAT, ["N", "W"])],
                [const("axes", np.array([1, 2], np.int64))])


def hwc_means(path: Path, size: int = 64) -> str:
    """image uint8 [N, size, size, 3] -> y float32 [N, 3] (an NHWC model that casts itself)."""
    return save(path, [node("Cast", ["image"], ["f"], to=FLOAT), node("ReduceMean", ["f"], ["y"], axes=[1, 2], keepdims=0)],
                [info("image", UINT8, ["N", size, size, 3])], [info("y", FLOAT, ["N", 3])])
