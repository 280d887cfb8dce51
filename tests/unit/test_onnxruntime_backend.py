"""The OnnxRuntime backend on real onnxruntime sessions, with models built here by onnx.helper."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import trtserve
from trtserve.backend import InstanceContext
from trtserve.backends.onnxruntime import OnnxRuntime
from trtserve.config import load_config
from trtserve.errors import BackendError, ConfigError, InvalidInputError, ModelUnavailableError

pytestmark = pytest.mark.timeout(60)
MLP = Path(__file__).resolve().parents[2] / "model_repository" / "tensor_mlp" / "1" / "model.onnx"


def _save(tmp_path: Path, name: str, nodes, inputs, outputs, inits=()) -> str:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("onnx")
    info = helper.make_tensor_value_info
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    one = numpy_helper.from_array(np.array(1, np.int64), "one")
    return {
        # a float32 [N,3] and b int64 [N,2] -> scaled = 2a, b_plus = b + 1
        "multi": _save(
            tmp, "multi",
            [helper.make_node("Mul", ["a", "two"], ["scaled"]), helper.make_node("Add", ["b", "one"], ["b_plus"])],
            [info("a", TensorProto.FLOAT, ["N", 3]), info("b", TensorProto.INT64, ["N", 2])],
            [info("scaled", TensorProto.FLOAT, ["N", 3]), info("b_plus", TensorProto.INT64, ["N", 2])],
            [two, one],
        ),
        # x float32 [N, T] with a dynamic T -> y = 2x
        "ragged": _save(
            tmp, "ragged",
            [helper.make_node("Mul", ["x", "two"], ["y"])],
            [info("x", TensorProto.FLOAT, ["N", "T"])],
            [info("y", TensorProto.FLOAT, ["N", "T"])],
            [two],
        ),
        # a static batch of 1: x float32 [1, 4] -> y = 2x
        "static": _save(
            tmp, "static",
            [helper.make_node("Mul", ["x", "two"], ["y"])],
            [info("x", TensorProto.FLOAT, [1, 4])],
            [info("y", TensorProto.FLOAT, [1, 4])],
            [two],
        ),
        # sums over the batch: its output does not keep the batch dimension
        "reduce": _save(
            tmp, "reduce",
            [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
            [info("x", TensorProto.FLOAT, ["N", 4])],
            [info("y", TensorProto.FLOAT, [])],
        ),
    }


def _backend(model: str, **config) -> OnnxRuntime:
    backend = OnnxRuntime()
    options = {"max": 8, "min": 1, "intra_op_threads": 1, "inter_op_threads": 1, "providers": None, "model": model}
    options.update(config)
    backend.init(InstanceContext(options))
    return backend


def _rows(n: int, width: int = 16, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(dtype)


# --------------------------------------------------------------------------- batching


def test_batched_forward_equals_one_session_run_per_item():
    backend = _backend(str(MLP))
    session = ort.InferenceSession(str(MLP), providers=["CPUExecutionProvider"])
    items = [{"data": _rows(n, seed=s)} for s, n in enumerate([1, 3, 2, 1, 1])]
    backend.forward(items)
    for item in items:
        (expected,) = session.run(None, {"x": item["data"]})
        np.testing.assert_allclose(item["result"], expected, rtol=1e-6, atol=1e-6)
        assert item["result"].shape == (item["data"].shape[0], 4)


def test_unbatched_sample_counts_one_and_comes_back_without_batch_dim():
    backend = _backend(str(MLP))
    sample, batch = _rows(1, seed=3)[0], _rows(3)
    assert backend.request_size({"data": sample}) == 1
    assert backend.request_size({"data": batch}) == 3
    items = [{"data": sample}, {"data": batch}]
    backend.forward(items)
    session = ort.InferenceSession(str(MLP), providers=["CPUExecutionProvider"])
    assert items[0]["result"].shape == (4,)
    np.testing.assert_allclose(items[0]["result"], session.run(None, {"x": sample[None]})[0][0], rtol=1e-6)


def test_multi_input_multi_output_batches_and_splits(models):
    backend = _backend(models["multi"])
    rng = np.random.default_rng(0)
    items = [
        {"data": {"a": rng.standard_normal((n, 3)).astype(np.float32), "b": rng.integers(0, 9, (n, 2))}}
        for n in (2, 1, 3)
    ]
    items.append({"data": {"b": np.array([5, 6]), "a": np.ones(3, np.float32)}})  # unbatched, any key order
    backend.forward(items)
    for item in items:
        assert set(item["result"]) == {"scaled", "b_plus"}
        np.testing.assert_array_equal(item["result"]["scaled"], 2 * item["data"]["a"])
        np.testing.assert_array_equal(item["result"]["b_plus"], item["data"]["b"] + 1)
        assert item["result"]["b_plus"].dtype == np.int64


def test_items_with_different_dynamic_dims_run_as_separate_groups(models):
    backend = _backend(models["ragged"])
    items = [{"data": _rows(2, width=w, seed=w)} for w in (3, 5, 3, 7)]
    backend.forward(items)
    for item in items:
        np.testing.assert_array_equal(item["result"], 2 * item["data"])


def test_static_batch_dim_needs_max_1(models):
    with pytest.raises(ConfigError) as info:
        _backend(models["static"], max=8)
    assert info.value.details["key"] == "max" and "(1, 4)" in info.value.message and "max = 1" in info.value.message
    backend = _backend(models["static"], max=1)
    item = {"data": np.arange(4, dtype=np.float32)}
    backend.forward([item])
    np.testing.assert_array_equal(item["result"], 2 * item["data"])


def test_output_without_batch_dim_fails_the_batch_clearly(models):
    backend = _backend(models["reduce"])
    items = [{"data": _rows(1, width=4)}, {"data": _rows(2, width=4)}]
    with pytest.raises(BackendError) as info:
        backend.forward(items)
    assert info.value.details["output"] == "y" and "max = 1" in info.value.message


def test_io_spec_reports_dynamic_dims_as_minus_one(models):
    inputs, outputs = _backend(models["multi"]).io_spec()
    assert [(t.name, t.dtype, t.shape) for t in inputs] == [("a", "float32", (-1, 3)), ("b", "int64", (-1, 2))]
    assert [(t.name, t.dtype, t.shape) for t in outputs] == [
        ("scaled", "float32", (-1, 3)),
        ("b_plus", "int64", (-1, 2)),
    ]


# --------------------------------------------------------------------------- input validation


def _invalid(backend: OnnxRuntime, data) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        backend.validate({"data": data})
    return info.value


def test_wrong_dtype_names_it_and_the_fix():
    err = _invalid(_backend(str(MLP)), _rows(2, dtype=np.float64))
    assert err.details == {"model_file": str(MLP), "input": "x", "received": "float64", "expected": "float32"}
    assert "float64" in err.message and ".astype(np.float32)" in err.message


@pytest.mark.parametrize(
    "shape, problem",
    [((2, 15), "dimension 1 is 15, expected 16"), ((2, 3, 16), "has 3 dimensions, expected 2"), ((), "0 dimensions")],
)
def test_wrong_shape_names_the_shape_and_what_the_model_takes(shape, problem):
    err = _invalid(_backend(str(MLP)), np.zeros(shape, np.float32))
    assert problem in err.message and str(shape) in err.message
    assert "(N, 16)" in err.message and "(16,)" in err.message
    assert err.details["received"] == list(shape) and err.details["expected"] == [-1, 16]


def test_unbatched_sample_with_a_wrong_dim_reports_the_sample_axis():
    err = _invalid(_backend(str(MLP)), np.zeros(15, np.float32))
    assert "dimension 0 is 15, expected 16" in err.message


def test_unknown_input_name_suggests_the_nearest(models):
    err = _invalid(_backend(models["multi"]), {"a": np.zeros((1, 3), np.float32), "bb": np.zeros((1, 2), np.int64)})
    assert err.details["input"] == "bb" and "did you mean 'b'" in err.message and "['a', 'b']" in err.message


def test_missing_input_is_named(models):
    err = _invalid(_backend(models["multi"]), {"a": np.zeros((1, 3), np.float32)})
    assert err.details["missing"] == ["b"] and "['b']" in err.message


def test_single_array_for_a_multi_input_model(models):
    err = _invalid(_backend(models["multi"]), np.zeros((1, 3), np.float32))
    assert "send a dict name -> array" in err.message and "float32" in err.details["received"]


def test_single_input_model_accepts_a_one_entry_dict_and_refuses_non_arrays():
    backend = _backend(str(MLP))
    backend.validate({"data": {"x": _rows(1)}})
    err = _invalid(backend, [[0.0] * 16])
    assert err.details["received"] == "list" and "np.asarray" in err.message


def test_inputs_of_one_request_must_agree_on_rows_and_batching(models):
    backend = _backend(models["multi"])
    rows = _invalid(backend, {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 2), np.int64)})
    assert rows.details["received"] == {"a": 2, "b": 3}
    mixed = _invalid(backend, {"a": np.zeros(3, np.float32), "b": np.zeros((1, 2), np.int64)})
    assert "mixes batched and unbatched" in mixed.message


def test_zero_rows_are_refused():
    assert "0 rows" in _invalid(_backend(str(MLP)), np.zeros((0, 16), np.float32)).message


def test_forward_checks_too_because_inside_s_only_the_first_stage_validates():
    with pytest.raises(InvalidInputError):
        _backend(str(MLP)).forward([{"data": _rows(1, width=3)}])


@pytest.mark.parametrize("bad", [_rows(1, width=3), _rows(1, dtype=np.float64), np.zeros((0, 16), np.float32)],
                         ids=["width", "dtype", "no-rows"])
def test_a_bad_row_after_good_ones_fails_the_batch_naming_it(bad):
    items = [{"data": _rows(2)}, {"data": _rows(1, seed=1)}, {"data": bad}]
    with pytest.raises(InvalidInputError):
        _backend(str(MLP)).forward(items)
    assert not any("result" in item for item in items)


# --------------------------------------------------------------------------- config


def test_missing_model_key_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        trtserve.pipe({"backend": "OnnxRuntime"})
    assert info.value.details["key"] == "model" and 'model = "model.onnx"' in info.value.message


def test_unloadable_model_file_names_the_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(ModelUnavailableError) as info:
        trtserve.pipe({"backend": "OnnxRuntime", "model": str(bad)})
    assert str(bad) in info.value.message and "check_model" in info.value.message


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"intra_op_threads": -1}, "intra_op_threads"),
        ({"providers": []}, "providers"),
        ({"inter_op_threads": 1.5}, "inter_op_threads"),
    ],
)
def test_bad_session_keys_fail_at_load(extra, key):
    with pytest.raises(ConfigError) as info:
        load_config({"backend": "OnnxRuntime", "model": str(MLP), **extra})
    assert info.value.details["key"] == key


def test_unavailable_provider_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        trtserve.pipe({"backend": "OnnxRuntime", "model": str(MLP), "providers": ["NoSuchExecutionProvider"]})
    assert "NoSuchExecutionProvider" in info.value.message and "CPUExecutionProvider" in info.value.message


def test_thread_and_provider_keys_reach_a_working_session():
    config = {"backend": "OnnxRuntime", "model": str(MLP), "intra_op_threads": 2, "inter_op_threads": 2,
              "providers": ["CPUExecutionProvider"], "max": 4}
    with trtserve.pipe(config) as pipe:
        item = {"data": _rows(4)}
        pipe(item)
        assert item["result"].shape == (4, 4)
        with pytest.raises(InvalidInputError) as info:  # 5 rows exceed max = 4 (the scheduler's check)
            pipe({"data": _rows(5)})
        assert info.value.details["request_size"] == 5
