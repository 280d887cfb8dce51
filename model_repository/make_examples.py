"""Generate the example ONNX models of this repository, byte for byte reproducibly.

    python model_repository/make_examples.py            # rewrite the committed models
    python model_repository/make_examples.py --out DIR  # write them elsewhere (tests compare)

Only the ``onnx`` helper API and numpy are used (no torch).  Weights come from numpy's
legacy ``RandomState``, whose stream numpy guarantees never to change, and the model
metadata carries no tool versions, so the same script writes the same bytes on any machine.
The weights are random: outputs are deterministic but mean nothing.

Models:

* ``classifier/1/model.onnx``: a small CNN that takes what the image preprocessing node
  produces, NHWC uint8 RGB ``image [N, 64, 64, 3]``, and does the cast, normalisation
  (ImageNet mean/std) and NHWC -> NCHW transpose inside the graph, then
  conv-relu-pool x2, global average pool, gemm, softmax -> ``probs [N, 10]``.
  Keeping the preprocessing in the graph means the model node is a plain ``OnnxRuntime``.
* ``classifier_nchw/1/model.onnx``: the same CNN with the same weights, without the in-graph
  preprocessing: it takes what the CPU stage Mat2Tensor produces, float32 NCHW normalised
  RGB ``x [N, 3, 64, 64]``, as most exported vision models do -> ``probs [N, 10]``.
* ``tensor_mlp/1/model.onnx``: an MLP ``x float32 [N, 16]`` -> relu(gemm 32) -> gemm ->
  ``y float32 [N, 4]``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
IMAGE_SIZE = 64
CLASSES = 10
MEAN = (0.485, 0.456, 0.406)  # ImageNet RGB statistics, in [0, 1] units
STD = (0.229, 0.224, 0.225)
# Fixed, conservative versions so the files load on every onnxruntime >= 1.14.
OPSET = 17
IR_VERSION = 8


def _weights(rng: np.random.RandomState, shape: tuple[int, ...], fan_in: int, gain: float = 1.0) -> np.ndarray:
    """He-scaled normal weights, so activations neither vanish nor explode."""
    return (rng.standard_normal(shape) * gain * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def _model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="trtserve model_repository/make_examples.py",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def classifier_model(seed: int = 0) -> onnx.ModelProto:
    return _cnn(seed, preprocess=True)


def classifier_nchw_model(seed: int = 0) -> onnx.ModelProto:
    return _cnn(seed, preprocess=False)


def _cnn(seed: int, preprocess: bool) -> onnx.ModelProto:
    """The example CNN; with ``preprocess`` it takes NHWC uint8 and normalises in the graph,
    without it takes what Mat2Tensor gives, float32 NCHW already normalised.  Same weights."""
    rng = np.random.RandomState(seed)
    # (x / 255 - mean) / std == x * scale - shift, one Mul and one Sub over the channel axis
    scale = np.array([1.0 / (255.0 * s) for s in STD], dtype=np.float32)
    shift = np.array([m / s for m, s in zip(MEAN, STD)], dtype=np.float32)
    inits = [_init("scale", scale), _init("shift", shift)] if preprocess else []
    inits += [
        _init("conv1_w", _weights(rng, (8, 3, 3, 3), 27)),
        _init("conv1_b", np.zeros(8, np.float32)),
        _init("conv2_w", _weights(rng, (16, 8, 3, 3), 72)),
        _init("conv2_b", np.zeros(16, np.float32)),
        _init("fc_w", _weights(rng, (16, CLASSES), 16, gain=2.0)),  # gain: visibly uneven probs
        _init("fc_b", (rng.standard_normal(CLASSES) * 0.1).astype(np.float32)),
    ]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    pool = dict(kernel_shape=[2, 2], strides=[2, 2])
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["image_f", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "shift"], ["normalised"]),
        helper.make_node("Transpose", ["normalised"], ["nchw"], perm=[0, 3, 1, 2]),
    ] if preprocess else []
    nodes += [
        helper.make_node("Conv", ["nchw" if preprocess else "x", "conv1_w", "conv1_b"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], **pool),
        helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], **conv),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], **pool),
        helper.make_node("GlobalAveragePool", ["p2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    if preprocess:
        graph_input = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE, 3])
        doc = "Example CNN: NHWC uint8 RGB 64x64 -> 10 class probabilities (random weights)."
    else:
        graph_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])
        doc = "Example CNN: NCHW float32 normalised RGB 64x64 -> 10 class probabilities (random weights)."
    graph = helper.make_graph(
        nodes,
        "classifier" if preprocess else "classifier_nchw",
        [graph_input],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits,
    )
    return _model(graph, doc)


def mlp_model(seed: int = 1) -> onnx.ModelProto:
    rng = np.random.RandomState(seed)
    inits = [
        _init("w1", _weights(rng, (16, 32), 16)),
        _init("b1", (rng.standard_normal(32) * 0.1).astype(np.float32)),
        _init("w2", _weights(rng, (32, 4), 32)),
        _init("b2", (rng.standard_normal(4) * 0.1).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tensor_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=inits,
    )
    return _model(graph, "Example MLP: float32 [N, 16] -> [N, 4] (random weights).")


MODELS = {"classifier": classifier_model, "classifier_nchw": classifier_nchw_model, "tensor_mlp": mlp_model}


def write_all(out: Path = HERE) -> list[Path]:
    """Write every example model under ``out/<name>/1/model.onnx``; return the paths."""
    written = []
    for name, build in MODELS.items():
        path = out / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build().SerializeToString())
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="repository root to write into (default: this folder)")
    args = parser.parse_args()
    for path in write_all(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
