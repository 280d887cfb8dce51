"""Load-time checks on real onnxruntime models: declared tensors against the model file,
stage against stage, and what a request that still does not fit is told."""
from __future__ import annotations


import cv2
import numpy as np
import pytest

import onnx_models as om  # noqa: E402  (tests/unit is on sys.path under pytest)
import trtserve
from trtserve.backend import TensorSpec
from trtserve.errors import BackendError, ConfigError, ErrorCode
from trtserve.repository import ModelRepository
from trtserve.signature import misfit

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("models")
    return {
        "nchw": om.nchw_means(tmp / "nchw.onnx"),
        "two": om.two_outputs(tmp / "two.onnx"),
        "hwc": om.hwc_means(tmp / "hwc.onnx"),
    }


def load_error(config: dict) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        trtserve.pipe(config).close()
    return caught.value


def jpeg(height: int, width: int) -> bytes:
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()  # lossless: exact pixels


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    "given, wanted, strict, problem",
    [
        (TensorSpec("a", "uint8", (64, 64, 3)), TensorSpec("x", "float32", (-1, 64, 64, 3), batched=True), False, "dtype uint8, expected float32"),
        (TensorSpec("a", "float32", (3, 64, 64)), TensorSpec("x", "float32", (-1, 3, 64, 64), batched=True), False, None),
        (TensorSpec("a", "float32", (5, 3, 64, 64)), TensorSpec("x", "float32", (-1, 3, 64, 64), batched=True), False, None),
        (TensorSpec("a", "float32", (3, 32, 64)), TensorSpec("x", "float32", (-1, 3, 64, 64), batched=True), False, "dimension 2 is 32, expected 64"),
        (TensorSpec("a", "float32", (64, 3)), TensorSpec("x", "float32", (-1, 3, 64, 64), batched=True), False, "2 dimensions, expected 4 (or 3"),
        (TensorSpec("a", "float32", (3, -1, -1)), TensorSpec("x", "float32", (-1, 3, 64, 64), batched=True), False, None),
        (TensorSpec("a", "float32", (3, -1, -1)), TensorSpec("x", "float32", (-1, 3, 64, 64), batched=True), True, "dimension 2 is -1 (any size)"),
        (TensorSpec("a", "float32", (3, 8, 8), layout="CHW"), TensorSpec("x", "float32", (8, 8, 3), layout="HWC"), False, "layout CHW, expected HWC"),
        (TensorSpec("y", "float32", (-1, 10), batched=True), TensorSpec("probs", "float32", (10,)), True, None),
    ],
)
def test_misfit_rule(given, wanted, strict, problem):
    found = misfit(given, wanted, strict)
    assert (found is None) if problem is None else (found is not None and problem in found), found


# --------------------------------------------------------------------------- declared against the model


@pytest.mark.parametrize(
    "declared, key, fragments",
    [
        ({"input": [{"name": "x", "dtype": "float16", "shape": [-1, 3, 64, 64]}]}, "input[0].dtype",
         ["dtype float16, expected float32", "declare dtype = 'float32', shape = [-1, 3, 64, 64]"]),
        ({"output": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}]}, "output[0].shape",
         ["dimension 1 is 2, expected 3", "shape = [-1, 3] (or [3] for single samples)"]),
        ({"output": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}, {"name": "z", "dtype": "float32", "shape": [-1, 3]}]},
         "output", ["declares 2 output(s) ['y', 'z'] but", "has 1: ['y float32 (N, 3)']"]),
        ({"input": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}]}, "input[0].shape", ["2 dimensions, expected 4 (or 3 for one sample)"]),
        ({"input": [{"name": "x", "dtype": "float32", "shape": [-1, 3, -1, 64]}]}, "input[0].shape",
         ["dimension 2 is -1 (any size), but the model fixes it at 64"]),
    ],
    ids=["dtype", "output-dim", "count", "rank", "open-where-fixed"],
)
def test_declared_mismatch_fails_the_load_naming_model_file_key_and_fix(files, declared, key, fragments):
    error = load_error({"backend": "OnnxRuntime", "model": files["nchw"], **declared})
    assert error.details["key"] == key and error.details["model"] == "model"
    assert files["nchw"] in error.message and "remove the [[" in error.message
    for fragment in fragments:
        assert fragment in error.message, error.message


@pytest.mark.parametrize("shape", [[-1, 3, 64, 64], [3, 64, 64], [4, 3, 64, 64]], ids=["batch", "sample", "fixed-batch"])
def test_declarations_that_fit_load(files, shape):
    with trtserve.pipe({"backend": "OnnxRuntime", "model": files["nchw"],
                        "input": [{"name": "x", "dtype": "float32", "shape": shape}]}) as models:
        assert models.pipeline.io_spec()[0][0].shape == tuple(shape)


def test_errors_in_a_config_file_name_the_file(tmp_path, files):
    folder = tmp_path / "means"
    (folder / "1").mkdir(parents=True)
    om.nchw_means(folder / "1" / "model.onnx")
    (folder / "config.toml").write_text(
        'backend = "OnnxRuntime"\nmodel = "model.onnx"\n[[output]]\nname = "y"\ndtype = "float64"\nshape = [3]\n'
    )
    repository = ModelRepository(tmp_path)
    try:
        repository.load_all()
        (row,) = repository.index()
        assert row["state"] == "UNAVAILABLE"
        assert row["reason"].startswith(str(folder / "config.toml")) and "output[0]" in row["reason"]
        assert "model 'means'" in row["reason"] and "dtype float64, expected float32" in row["reason"]
    finally:
        repository.close()


def test_a_lone_output_may_take_any_declared_name(files):
    with trtserve.pipe({"backend": "OnnxRuntime", "model": files["nchw"],
                        "output": [{"name": "means", "dtype": "float32", "shape": [-1, 3]}]}) as models:
        assert [s.name for s in models.pipeline.io_spec()[1]] == ["means"]


def test_several_outputs_must_use_the_models_names_or_rename_with_source(files):
    outputs = [{"name": "a", "dtype": "float32", "shape": [-1, 2]}, {"name": "neg", "dtype": "float32", "shape": [-1, 2]}]
    error = load_error({"backend": "OnnxRuntime", "model": files["two"], "output": outputs})
    assert error.details["key"] == "output[1].name"
    assert "add source = 'save_infer_model/scale_0.tmp_1' to rename it" in error.message
    outputs[1]["source"] = "save_infer_model/scale_0.tmp_1"
    with trtserve.pipe({"backend": "OnnxRuntime", "model": files["two"], "output": outputs}) as models:
        item = {"data": np.array([[1.0, 2.0]], np.float32)}
        models(item)
        assert set(item["result"]) == {"a", "neg"}
        np.testing.assert_array_equal(item["result"]["neg"], [[-1.0, -2.0]])
        assert [s.name for s in models.pipeline.io_spec()[1]] == ["a", "neg"]
    outputs[1]["source"] = "scale_0"
    error = load_error({"backend": "OnnxRuntime", "model": files["two"], "output": outputs})
    assert error.details["key"] == "output[1].source" and "'scale_0', which is not an output" in error.message


def test_without_declarations_metadata_shows_the_model_files_signature(tmp_path, files):
    folder = tmp_path / "means"
    (folder / "1").mkdir(parents=True)
    om.nchw_means(folder / "1" / "model.onnx")
    (folder / "config.toml").write_text('backend = "OnnxRuntime"\nmodel = "model.onnx"\nmax = 4\n')
    repository = ModelRepository(tmp_path)
    try:
        meta = repository.load("means").metadata()
        assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 3, 64, 64]}]
        assert meta["outputs"] == [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]
        (node,) = meta["nodes"]
        assert node["model_file"] == "1/model.onnx" and node["model_outputs"] == meta["outputs"]
    finally:
        repository.close()


# --------------------------------------------------------------------------- stage against stage


def test_uint8_image_into_a_float_nchw_model_fails_the_load_naming_both_nodes(files):
    """Without the check this configuration would load READY and fail every request."""
    error = load_error({
        "pre": {"backend": "S[DecodeMat,ResizeMat]", "resize_h": 64, "resize_w": 64, "next": "model"},
        "model": {"backend": "OnnxRuntime", "model": files["nchw"], "max": 4},
    })
    assert "node 'pre' (S[DecodeMat,ResizeMat]) produces uint8 HWC (64, 64, 3)" in error.message
    assert "node 'model' (OnnxRuntime) takes float32 (N, 3, 64, 64)" in error.message
    assert "dtype uint8, expected float32" in error.message and "Mat2Tensor" in error.message


def test_stages_of_one_node_are_checked_too(files):
    error = load_error({"backend": "S[DecodeMat,ResizeMat,OnnxRuntime]", "resize_h": 64, "resize_w": 64, "model": files["nchw"]})
    assert "stage 2 (ResizeMat) of node 'model' produces" in error.message
    assert "stage 3 (OnnxRuntime) of node 'model' takes" in error.message


def test_a_resize_that_does_not_match_the_model_names_the_sizes(files):
    error = load_error({
        "pre": {"backend": "S[DecodeMat,ResizeMat,Mat2Tensor]", "resize_h": 32, "resize_w": 64, "next": "model"},
        "model": {"backend": "OnnxRuntime", "model": files["nchw"], "max": 4},
    })
    assert "produces float32 CHW (3, 32, 64)" in error.message and "dimension 2 is 32, expected 64" in error.message
    assert "resize_h and resize_w" in error.message


def test_a_declared_input_the_entry_stage_cannot_take_fails(files):
    error = load_error({"backend": "S[DecodeMat,ResizeMat]", "resize_h": 8, "resize_w": 8,
                        "input": [{"name": "image", "dtype": "uint8", "shape": [-1, -1, 3]}]})
    assert error.details["key"] == "input[0].dtype" and "dtype uint8, expected bytes" in error.message


def test_a_fitting_chain_reports_what_its_items_really_carry(files):
    config = {
        "pre": {"backend": "S[DecodeMat,ResizeMat,CvtColorMat,Mat2Tensor]", "resize_h": 64, "resize_w": 64,
                "color": "rgb", "next": "model"},
        "model": {"backend": "OnnxRuntime", "model": files["nchw"], "max": 4},
    }
    with trtserve.pipe(config) as models:
        inputs, outputs = models.pipeline.io_spec()
        assert (inputs[0].dtype, outputs[0].shape) == ("bytes", (3,))  # one sample in, one out
        item = {"data": jpeg(64, 64)}
        models(item)
        assert item["result"].shape == (3,)


# --------------------------------------------------------------------------- what only a request shows


def test_a_misfit_only_a_request_shows_is_a_backend_error_naming_both_nodes(files):
    """DecodeMat gives images of any size: the load cannot know the 64 x 64 model will refuse one."""
    config = {"pre": {"backend": "DecodeMat", "next": "model"}, "model": {"backend": "OnnxRuntime", "model": files["hwc"], "max": 4}}
    with trtserve.pipe(config) as models:
        good = {"data": jpeg(64, 64)}
        models(good)
        assert good["result"].shape == (3,)
        with pytest.raises(BackendError) as caught:
            models({"data": jpeg(40, 50)})
    error = caught.value
    assert error.code == ErrorCode.BACKEND_ERROR
    assert "node 'model' (OnnxRuntime) refused what node 'pre' (DecodeMat) produced" in error.message
    assert "dimension 0 is 40, expected 64" in error.message and "not the request's" in error.message
    assert error.details == {"node": "model", "producer": "pre"}


def test_inside_one_node_the_refusing_stage_and_its_producer_are_named(files):
    with trtserve.pipe({"backend": "S[DecodeMat,OnnxRuntime]", "model": files["hwc"]}) as models:
        with pytest.raises(BackendError) as caught:
            models({"data": jpeg(40, 50)})
    assert "stage 2 (OnnxRuntime) of node 'model' refused what stage 1 (DecodeMat) of node 'model' produced" in caught.value.message
