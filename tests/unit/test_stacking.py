"""The batching-tensors module on its own: checking declared inputs, grouping, stacking,
splitting (pure numpy; the backends' own tests run it under real models)."""
from __future__ import annotations

import numpy as np
import pytest

from trtserve.backends.shapes import PadRule
from trtserve.backends.stacking import (
    InputChecker,
    Prepared,
    as_result,
    bounds,
    check_rows,
    contiguous_strides,
    dtype_str,
    group,
    split,
    stack,
)
from trtserve.errors import BackendError, InvalidInputError


def check_one(name: str, value):
    """A declaration of rank-2 float32 inputs: one rank short is one sample."""
    if value.dtype != np.float32:
        raise InvalidInputError(f"{name} is {value.dtype}")
    return (value[np.newaxis], True) if value.ndim == 1 else (value, False)


def rows(n: int, width: int = 3, start: float = 0.0) -> np.ndarray:
    return (np.arange(n * width, dtype=np.float32) + start).reshape(n, width)


# --------------------------------------------------------------------------- declared inputs


def test_one_input_takes_a_bare_array_or_a_one_entry_dict():
    checker = InputChecker(["x"], "M model m.onnx", "m.onnx")
    bare = checker.prepare(rows(2), check_one)
    named = checker.prepare({"x": rows(2)}, check_one)
    assert (bare.rows, bare.unbatched, list(bare.arrays)) == (2, False, ["x"])
    assert named.rows == 2 and named.arrays["x"] is not None
    sample = checker.prepare(np.zeros(3, np.float32), check_one)
    assert (sample.rows, sample.unbatched, sample.arrays["x"].shape) == (1, True, (1, 3))


def test_inputs_come_back_in_the_models_order():
    checker = InputChecker(["a", "b"], "M model m.onnx", "m.onnx")
    prepared = checker.prepare({"b": rows(1), "a": rows(1)}, check_one)
    assert list(prepared.arrays) == ["a", "b"]


@pytest.mark.parametrize(
    "data, problem, details",
    [
        (rows(2), "has inputs ['a', 'b'] but the request sent a single ndarray", {"expected": ["a", "b"]}),
        ({"a": rows(2), "c": rows(2)}, "has no input 'c'", {"input": "c"}),
        ({"a": rows(2)}, r"input(s) ['b'] missing from the request", {"missing": ["b"]}),
        ({"a": rows(2), "b": rows(3)}, "different batch sizes {'a': 2, 'b': 3}", {}),
        ({"a": rows(0), "b": rows(0)}, "has 0 rows", {}),
        ({"a": np.zeros(3, np.float32), "b": rows(1)}, "mixes batched and unbatched inputs: a (3,), b (1, 3)", {}),
    ],
)
def test_every_rule_across_inputs_names_the_model_and_the_problem(data, problem, details):
    checker = InputChecker(["a", "b"], "M model m.onnx", "m.onnx")
    with pytest.raises(InvalidInputError) as caught:
        checker.prepare(data, check_one)
    assert caught.value.message.startswith("M model m.onnx: ")
    assert problem in caught.value.message
    assert caught.value.details["model_file"] == "m.onnx"
    assert details.items() <= caught.value.details.items()


def test_a_backends_own_check_runs_per_input():
    checker = InputChecker(["a"], "M model m.onnx", "m.onnx")
    with pytest.raises(InvalidInputError, match="a is float64"):
        checker.prepare(np.zeros((1, 3)), check_one)


# --------------------------------------------------------------------------- grouping and stacking


def prepared(*arrays: np.ndarray) -> list[Prepared]:
    return [Prepared({"x": a}, a.shape[0], False) for a in arrays]


def test_items_group_by_dtype_and_the_dims_after_the_batch_in_order_of_first_appearance():
    items = prepared(rows(1, 3), rows(2, 4), rows(3, 3), rows(1, 3).astype(np.float16), rows(1, 4))
    assert group(items) == [([0, 2], None), ([1, 4], None), ([3], None)]


def test_dtype_strs_are_str_of_the_dtype_whatever_its_kind_and_only_equal_names_group():
    kinds = [np.dtype(np.float32), np.dtype("<f4"), np.dtype(np.float16), "float32", np.dtype([("a", "<i4")])]
    for dtype in kinds * 2:  # the second time from what was remembered
        assert dtype_str(dtype) == str(dtype)
    assert dtype_str(["an", "unhashable", "dtype"]) == str(["an", "unhashable", "dtype"])

    class Named:  # a device value whose dtype is a string, as a foreign array may have
        def __init__(self, dtype: str) -> None:
            self.shape, self.dtype = (1, 3), dtype

    items = [Prepared({"input": rows(1, 3)}, 1, False), Prepared({"input": Named("float32")}, 1, False),
             Prepared({"input": Named("float64")}, 1, False)]
    assert group(items) == [([0, 1], None), ([2], None)]  # as str(dtype) grouped them


def test_padding_joins_the_groups_its_rule_covers_up_to_the_limit():
    items = prepared(np.ones((1, 2, 3), np.float32), np.ones((1, 2, 5), np.float32), np.ones((1, 2, 9), np.float32))
    rule = {"x": PadRule(axes=(2,), value=-1.0, limit=6)}
    assert group(items, rule) == [([0, 1], {"x": ((2, 5), -1.0)}), ([2], None)]
    batch = stack([items[0].arrays["x"], items[1].arrays["x"]], ((2, 5), -1.0))
    assert batch.shape == (2, 2, 5) and batch[0, :, 3:].tolist() == [[-1, -1], [-1, -1]] and batch[1].sum() == 10


def test_stack_concatenates_rows_and_leaves_a_lone_array_as_it_is():
    a, b = rows(1), rows(2, start=10)
    assert stack([a]) is a
    assert np.array_equal(stack([a, b]), np.concatenate([a, b]))


# --------------------------------------------------------------------------- splitting


def test_split_hands_each_item_its_rows_and_a_sample_loses_its_batch_dimension():
    items = [Prepared({}, 2, False), Prepared({}, 1, True), Prepared({}, 1, False)]
    y = rows(4)
    parts = split({"y": y, "z": y * 2}, items)
    assert [p["y"].tolist() for p in parts] == [y[:2].tolist(), y[2].tolist(), y[3:].tolist()]
    assert parts[1]["z"].shape == (3,)
    assert np.shares_memory(parts[0]["y"], y)  # views by default
    copies = split({"y": y}, items, copy=True)
    y[:] = -1
    assert copies[0]["y"].tolist() == [[0, 1, 2], [3, 4, 5]]  # the buffer may be reused


def test_as_result_unwraps_a_lone_output():
    assert as_result({"y": 1}) == 1 and as_result({"y": 1, "z": 2}) == {"y": 1, "z": 2}


def test_an_output_that_lost_the_batch_is_refused_with_its_name_and_shape():
    check_rows({"y": np.zeros((3, 2))}, 3, "M model m.onnx", "m.onnx")
    for bad in (np.zeros((2, 2)), np.float32(1.0)):
        with pytest.raises(BackendError) as caught:
            check_rows({"y": np.asarray(bad)}, 3, "M model m.onnx", "m.onnx")
        assert "M model m.onnx: output 'y' has shape" in caught.value.message
        assert "set max = 1" in caught.value.message and caught.value.details["rows"] == 3


def test_bounds_and_strides():
    assert list(bounds([2, 1, 3])) == [(0, 2), (2, 3), (3, 6)]
    array = np.zeros((2, 3, 4), np.float16)
    assert contiguous_strides(array.shape, array.itemsize) == array.strides
    assert contiguous_strides((), 4) == ()
