"""The ONNX -> engine path on the real TensorRT-RTX builder, which runs without a GPU.

Models are made here with onnx.helper.  Rebuilds are counted from the builder's log line
("built ... engine for ..."), never with timings.  Execution needs a GPU that TensorRT-RTX
supports, which CI does not have: deserializing is tested up to its typed refusal.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
onnx = pytest.importorskip("onnx", reason="the test models are made with the onnx package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trtserve.backend import TensorSpec  # noqa: E402
from trtserve.errors import ConfigError, ModelUnavailableError  # noqa: E402
from trtserve.tensorrt import (  # noqa: E402
    BuildSpec, deserialize_engine, ensure_engine, import_tensorrt, load_plan, parse_onnx,
)
from trtserve.tensorrt.build import build_engine  # noqa: E402
from trtserve.tensorrt.cache import cache_path, read_cache  # noqa: E402
from trtserve.tensorrt.io import network_io  # noqa: E402

pytestmark = pytest.mark.timeout(120)
info = helper.make_tensor_value_info


def _save(folder: Path, name: str, nodes, inputs, outputs, inits=(), check: bool = True) -> Path:
    model = helper.make_model(
        helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits)),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def conv_net(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "B")
    return _save(
        folder, "conv",
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        [info("x", TensorProto.FLOAT, ["N", 3, 16, 16])], [info("y", TensorProto.FLOAT, ["N", 8, 16, 16])], [w, b],
    )


def two_in_two_out(folder: Path) -> Path:
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    one = numpy_helper.from_array(np.array(1, np.int32), "one")
    return _save(
        folder, "multi",
        [helper.make_node("Mul", ["a", "two"], ["scaled"]), helper.make_node("Add", ["b", "one"], ["b_plus"])],
        [info("a", TensorProto.FLOAT, ["N", 3]), info("b", TensorProto.INT32, ["N", 2])],
        [info("scaled", TensorProto.FLOAT, ["N", 3]), info("b_plus", TensorProto.INT32, ["N", 2])],
        [two, one],
    )


def fp16_net(folder: Path) -> Path:
    w = numpy_helper.from_array(np.ones((4, 3), np.float16), "W")
    return _save(
        folder, "half",
        [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16), helper.make_node("MatMul", ["xh", "W"], ["yh"]),
         helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)],
        [info("x", TensorProto.FLOAT, ["N", 4])], [info("y", TensorProto.FLOAT, ["N", 3])], [w],
    )


def image_net(folder: Path) -> Path:
    return _save(folder, "image", [helper.make_node("Relu", ["images"], ["y"])],
                 [info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])], [info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])


@pytest.fixture(scope="module")
def rtx():
    module = import_tensorrt("tensorrt_rtx")
    assert module is trt
    return module


def test_auto_picks_an_installed_module():
    assert import_tensorrt("auto").__name__ in ("tensorrt", "tensorrt_rtx")


def test_parse_conv_net_and_read_its_io(rtx, tmp_path):
    path = conv_net(tmp_path)
    _builder, network, _parser = parse_onnx(rtx, path)
    io = network_io(rtx, network, str(path))
    assert io.specs() == ([TensorSpec("x", "float32", (-1, 3, 16, 16))], [TensorSpec("y", "float32", (-1, 8, 16, 16))])


def test_build_conv_net_with_batch_profile(rtx, tmp_path):
    built = build_engine(rtx, conv_net(tmp_path), BuildSpec(2, 8, workspace_mb=64))
    assert built.plan and built.profile == {"x": [[2, 3, 16, 16], [8, 3, 16, 16], [8, 3, 16, 16]]}


def test_two_inputs_two_outputs(rtx, tmp_path):
    artifact = ensure_engine(rtx, two_in_two_out(tmp_path), BuildSpec(1, 4))
    inputs, outputs = artifact.io.specs()
    assert inputs == [TensorSpec("a", "float32", (-1, 3)), TensorSpec("b", "int32", (-1, 2))]
    assert outputs == [TensorSpec("scaled", "float32", (-1, 3)), TensorSpec("b_plus", "int32", (-1, 2))]


def test_dynamic_image_size_needs_input_shapes(rtx, tmp_path):
    path = image_net(tmp_path)
    with pytest.raises(ConfigError, match="input_shapes = { images = "):
        ensure_engine(rtx, path, BuildSpec(1, 2))
    artifact = ensure_engine(rtx, path, BuildSpec(1, 2, input_shapes={"images": (3, 24, 32)}))
    assert artifact.io.inputs[0].shape == (-1, 3, 24, 32)


def test_fp16_model_builds_with_fp16_precision(rtx, tmp_path):
    built = build_engine(rtx, fp16_net(tmp_path), BuildSpec(1, 4, precision="fp16"))
    assert built.plan


def test_fp16_on_a_float32_model_explains_strong_typing(rtx, tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_engine(rtx, conv_net(tmp_path), BuildSpec(1, 4, precision="fp16"))
    message = str(caught.value)
    assert "strongly typed" in message and "convert_float_to_float16" in message and "model.onnx" in message


class BuildCounter(logging.Handler):
    """Engines built, counted from the builder's INFO line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += str(record.msg).startswith("built ")


@pytest.fixture
def builds():
    counter, logger = BuildCounter(), logging.getLogger("trtserve.tensorrt")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(counter)
    yield counter
    logger.removeHandler(counter)
    logger.setLevel(level)


def test_cache_hit_skips_the_build(rtx, tmp_path, builds):
    path = conv_net(tmp_path)
    first = ensure_engine(rtx, path, BuildSpec(1, 4))
    before = builds.count
    second = ensure_engine(rtx, path, BuildSpec(1, 4))
    assert (first.source, second.source) == ("built", "cache")
    assert builds.count == before and second.plan == first.plan and second.io == first.io
    header, plan = read_cache(cache_path(path), first.key)
    assert plan == first.plan and header["components"]["tensorrt"] == f"tensorrt_rtx {trt.__version__}"


def test_cache_invalidated_by_model_and_config_changes(rtx, tmp_path, builds):
    path = conv_net(tmp_path)
    ensure_engine(rtx, path, BuildSpec(1, 4))
    before = builds.count
    assert ensure_engine(rtx, path, BuildSpec(1, 8)).source == "built"  # max changed
    assert ensure_engine(rtx, path, BuildSpec(1, 8, workspace_mb=128)).source == "built"  # workspace changed
    half = fp16_net(tmp_path / "half")
    ensure_engine(rtx, half, BuildSpec(1, 4, precision="fp32"))
    assert ensure_engine(rtx, half, BuildSpec(1, 4, precision="fp16")).source == "built"  # precision changed
    conv_net(tmp_path, seed=1)  # same graph, new weights
    assert ensure_engine(rtx, path, BuildSpec(1, 8, workspace_mb=128)).source == "built"
    assert builds.count == before + 5  # max, workspace, half fp32, half fp16, new weights
    assert ensure_engine(rtx, path, BuildSpec(1, 8, workspace_mb=128)).source == "cache"


def test_corrupt_cache_warns_and_rebuilds(rtx, tmp_path, caplog, builds):
    path = conv_net(tmp_path)
    ensure_engine(rtx, path, BuildSpec(1, 2))
    blob = cache_path(path).read_bytes()
    cache_path(path).write_bytes(blob[: len(blob) // 2])
    before = builds.count
    with caplog.at_level(logging.INFO, logger="trtserve.tensorrt"):
        artifact = ensure_engine(rtx, path, BuildSpec(1, 2))
    assert artifact.source == "built" and builds.count == before + 1
    assert any(r.levelno == logging.WARNING and "damaged" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not an onnx model at all", "Failed to parse the ONNX model"),
        # these bytes happen to decode as an empty protobuf, which the parser accepts
        (b"this is not a protobuf", "0 inputs and 0 outputs"),
    ],
)
def test_garbage_onnx_is_a_config_error_naming_the_file(rtx, tmp_path, content, match):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as caught:
        ensure_engine(rtx, path, BuildSpec())
    assert str(path) in str(caught.value)


def test_unsupported_operator_is_listed(rtx, tmp_path):
    path = _save(tmp_path, "bad", [helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery")],
                 [info("x", TensorProto.FLOAT, ["N", 3])], [info("y", TensorProto.FLOAT, ["N", 3])], check=False)
    with pytest.raises(ConfigError, match=r"at node 0 \(mystery: NoSuchOp\)"):
        parse_onnx(rtx, path)


def _gpu_can_run_rtx() -> bool:
    from trtserve import cuda

    return cuda.is_available()


def test_plan_file_loads_up_to_the_runtime(rtx, tmp_path):
    built = build_engine(rtx, conv_net(tmp_path), BuildSpec(1, 2))
    plan = tmp_path / "model.plan"
    plan.write_bytes(built.plan)
    artifact = load_plan(plan)
    assert artifact.plan == built.plan and artifact.io is None
    if _gpu_can_run_rtx():
        pytest.skip("a CUDA device is present: the deserialize refusal below is the CPU-only behaviour")
    with pytest.raises(ModelUnavailableError) as caught:
        deserialize_engine(rtx, artifact)
    message = str(caught.value)
    assert str(plan) in message and "cannot run on this machine" in message and "TensorRT said" in message
