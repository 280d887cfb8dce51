"""A heavier stand-in for tensor_mlp, built on the fly: same inputs, outputs and config.

tensor_mlp runs a batch of 8 in about 10 us, so any per-request cost of a Python scheduler
dwarfs it and a throughput ratio against bare onnxruntime only measures that cost.  The wide
MLP (x[N,16] -> H -> H -> y[N,4], ReLU) takes long enough per batch for the scheduler's
overhead to overlap with compute (onnxruntime releases the GIL), which is the regime the
"pipe() >= 85% of direct onnxruntime" target is about.  Needs the ``onnx`` package.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def wide_mlp_onnx(path: Path, hidden: int = 1024, seed: int = 0) -> Path:
    """Write x float32 [N,16] -> y float32 [N,4] with two ``hidden``-wide ReLU layers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    shapes = {"w1": (16, hidden), "w2": (hidden, hidden), "w3": (hidden, 4)}
    weights = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("MatMul", ["a2", "w3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this project supports
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def wide_mlp_folder(repository: Path, target: Path, hidden: int = 1024) -> Path:
    """A model folder named wide_mlp: tensor_mlp's config.toml with the wide model as version 1."""
    folder = target / "wide_mlp"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(repository / "tensor_mlp" / "config.toml", folder / "config.toml")
    wide_mlp_onnx(folder / "1" / "model.onnx", hidden)
    return folder
