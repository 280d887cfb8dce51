"""Mixed shapes in one batch on a real onnxruntime model with a dynamic width (an OCR
recognizer's shape): grouped by default, padded into one call with ``pad``, and counted
in the statistics as the model calls really ran."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnx_models as om  # noqa: E402  (tests/unit is on sys.path under pytest)
import trtserve
from trtserve.backends.shapes import PadRule
from trtserve.backends.stacking import group, stack
from trtserve.errors import ConfigError

pytestmark = pytest.mark.timeout(60)
HEIGHT = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return om.recognizer(tmp_path_factory.mktemp("rec") / "rec.onnx", HEIGHT)


@pytest.fixture(scope="module")
def direct(model):
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x[np.newaxis]})[0][0]


def lines(*widths: int) -> list[np.ndarray]:
    """Text-line crops of the given widths, (3, HEIGHT, width) float32, as samples."""
    rng = np.random.default_rng(sum(widths))
    return [rng.random((3, HEIGHT, w), dtype=np.float32) + 0.5 for w in widths]


def one_batch(model: str, samples: list[np.ndarray], **extra):
    """Run the samples as ONE scheduler batch (an inline node batches a list it is given)
    and return the items and the node's statistics."""
    config = {"backend": "OnnxRuntime", "model": model, "max": 16, "inline": True, **extra}
    with trtserve.pipe(config) as models:
        items = [{"data": s} for s in samples]
        models(items)
        stats = models.pipeline.nodes[0].stats.snapshot()
    assert stats["batch_sizes"] == {str(len(samples)): 1}, stats
    return items, stats


def test_mixed_widths_run_as_one_call_per_width_and_are_counted_so(model, direct):
    samples = lines(10, 20, 20, 30, 10)
    items, stats = one_batch(model, samples)
    for item, sample in zip(items, samples):
        np.testing.assert_allclose(item["result"], direct(sample), rtol=1e-6)
    assert stats["model_calls"] == 3 and stats["call_rows"] == {"1": 1, "2": 2}


def test_padding_runs_the_batch_as_one_call_and_keeps_the_padded_length(model, direct):
    samples = lines(10, 20, 30)
    items, stats = one_batch(model, samples, pad={"x": {"value": 0.0, "limit": 64}})
    assert stats["model_calls"] == 1 and stats["call_rows"] == {"3": 1}
    for item, sample in zip(items, samples):
        width = sample.shape[2]
        assert item["result"].shape == (30,)  # the batch's largest width
        np.testing.assert_allclose(item["result"][:width], direct(sample), rtol=1e-6)
        np.testing.assert_array_equal(item["result"][width:], 0.0)  # zero columns sum to zero


def test_the_pad_value_is_what_fills_the_padding(model):
    items, _ = one_batch(model, lines(4, 6), pad={"x": {"value": 1.0}})
    np.testing.assert_allclose(items[0]["result"][4:], 3 * HEIGHT)  # a column of ones


def test_items_over_the_limit_keep_their_shape_in_a_call_of_their_own(model, direct):
    samples = lines(10, 200, 20)
    items, stats = one_batch(model, samples, pad={"x": {"limit": 64}})
    assert stats["model_calls"] == 2 and stats["call_rows"] == {"1": 1, "2": 1}
    np.testing.assert_allclose(items[1]["result"], direct(samples[1]), rtol=1e-6)
    assert items[0]["result"].shape == items[2]["result"].shape == (20,)


def test_one_shape_is_one_call_per_batch(model):
    _, stats = one_batch(model, lines(16, 16, 16, 16), pad={"x": {"limit": 64}})
    assert stats["model_calls"] == 1 and stats["call_rows"] == {"4": 1}


@pytest.mark.parametrize(
    "pad, fragment",
    [
        ({"y": {}}, "pad names 'y', which is not an input"),
        ({"x": {"vlaue": 1}}, "must map input names to tables with ['value', 'limit']"),
        ({"x": {"limit": 0}}, "positive integer as x.limit"),
        ({"x": {"value": float("nan")}}, "finite number as x.value"),
    ],
)
def test_bad_pad_keys_fail_the_load(model, pad, fragment):
    with pytest.raises(ConfigError, match="pad") as caught:
        trtserve.pipe({"backend": "OnnxRuntime", "model": model, "max": 4, "pad": pad}).close()
    assert fragment in caught.value.message


def test_pad_on_an_input_without_dynamic_dims_and_a_fractional_value_for_integers(tmp_path):
    fixed = om.nchw_means(tmp_path / "fixed.onnx")
    with pytest.raises(ConfigError, match="no dynamic dimension beyond the batch"):
        trtserve.pipe({"backend": "OnnxRuntime", "model": fixed, "max": 4, "pad": {"x": {}}}).close()
    tokens = om.save(tmp_path / "tokens.onnx", [om.node("Identity", ["ids"], ["out"])],
                     [om.info("ids", om.INT64, ["N", "T"])], [om.info("out", om.INT64, ["N", "T"])])
    with pytest.raises(ConfigError, match=r"pad.ids.value = 0.5 does not fit .* int64"):
        trtserve.pipe({"backend": "OnnxRuntime", "model": tokens, "max": 4, "pad": {"ids": {"value": 0.5}}}).close()


class Prep:
    def __init__(self, *arrays: np.ndarray) -> None:
        self.arrays = {f"in{i}": a for i, a in enumerate(arrays)}
        self.rows = arrays[0].shape[0]


def test_group_keeps_the_order_of_first_appearance_and_pads_only_named_inputs():
    a, b = np.zeros((1, 2, 3)), np.zeros((1, 2, 5))
    prepared = [Prep(b), Prep(a), Prep(b), Prep(a)]
    assert group(prepared) == [([0, 2], None), ([1, 3], None)]
    rule = {"in0": PadRule(axes=(2,), value=0.0, limit=None)}
    assert group(prepared, rule) == [([0, 1, 2, 3], {"in0": ((2, 5), 0.0)})]
    other_axis = [Prep(np.zeros((1, 4, 3))), Prep(np.zeros((1, 2, 3)))]
    assert group(other_axis, rule) == [([0], None), ([1], None)]  # axis 1 is not padded


def test_stack_pads_each_item_at_the_end_of_its_dimensions_in_one_array():
    batch = stack([np.ones((2, 1, 2), np.int32), np.full((1, 2, 1), 7, np.int32)], ((2, 3), -1))
    assert batch.dtype == np.int32 and batch.shape == (3, 2, 3)
    np.testing.assert_array_equal(batch[0], [[1, 1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(batch[2], [[7, -1, -1], [7, -1, -1]])


def test_warm_up_calls_are_not_counted_and_later_calls_are(model):
    warmup = [{"count": 2, "inputs": {"x": {"dtype": "float32", "shape": [3, HEIGHT, 12]}}}]
    with trtserve.pipe({"backend": "OnnxRuntime", "model": model, "max": 4, "warmup": warmup}) as models:
        stats = models.pipeline.nodes[0].stats.snapshot()
        assert stats["model_calls"] == 0 and stats["batches"] == 0  # warm-up ran, uncounted
        models({"data": lines(12)[0]})
        stats = models.pipeline.nodes[0].stats.snapshot()
    assert stats["model_calls"] == 1 and stats["call_rows"] == {"1": 1}
