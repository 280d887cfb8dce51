"""TensorRT support logic that needs no TensorRT package: module choice, profiles, the engine
cache file format and its hit/miss/corruption rules (with a stand-in builder), item checks."""
from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from trtserve.errors import BackendError, ConfigError, InvalidInputError, ModelUnavailableError
from trtserve.tensorrt import cache as cache_mod
from trtserve.tensorrt import import_tensorrt
from trtserve.tensorrt.build import BuildSpec, BuiltEngine, resolve_profile
from trtserve.tensorrt.cache import MAGIC, CacheMiss, cache_path, ensure_engine, load_plan, read_cache
from trtserve.tensorrt.io import EngineIO, TensorInfo
from trtserve.backends.stacking import as_result, check_rows, group, split
from trtserve.tensorrt.items import Bounds, DeviceInput, ItemChecker

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- module choice

def test_import_tensorrt_names_both_packages_when_neither_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules makes import fail
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(ModelUnavailableError) as info:
        import_tensorrt("auto")
    message = str(info.value)
    assert "tensorrt" in message and "tensorrt_rtx" in message
    assert "pip install tensorrt-rtx-cu13" in message and "pip install tensorrt " in message


def test_import_tensorrt_explicit_choice_is_honoured(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ModelUnavailableError, match="'tensorrt' does not import"):
        import_tensorrt("tensorrt")


def test_import_tensorrt_rejects_unknown_preference():
    with pytest.raises(ConfigError, match="trt_module = 'tensorrt11'"):
        import_tensorrt("tensorrt11")


def test_auto_prefers_full_tensorrt(monkeypatch):
    fake = type(sys)("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert import_tensorrt("auto") is fake


# --------------------------------------------------------------------------- profiles

def _io(*inputs: TensorInfo) -> EngineIO:
    return EngineIO(inputs, (TensorInfo("y", "float32", (-1, 4)),))


def test_profile_spans_min_to_max_with_opt_at_max():
    io, profile = resolve_profile(_io(TensorInfo("x", "float32", (-1, 3, 8, 8))), BuildSpec(2, 16), "m.onnx")
    assert profile == {"x": [[2, 3, 8, 8], [16, 3, 8, 8], [16, 3, 8, 8]]}
    assert io.inputs[0].shape == (-1, 3, 8, 8)


def test_dynamic_non_batch_dims_need_input_shapes():
    x = TensorInfo("images", "float32", (-1, 3, -1, -1))
    with pytest.raises(ConfigError) as info:
        resolve_profile(_io(x), BuildSpec(1, 4), "m.onnx")
    assert "input_shapes = { images = [3, 224, 224] }" in str(info.value)
    io, profile = resolve_profile(_io(x), BuildSpec(1, 4, input_shapes={"images": (3, 32, 48)}), "m.onnx")
    assert profile["images"] == [[1, 3, 32, 48], [4, 3, 32, 48], [4, 3, 32, 48]]
    assert io.inputs[0].shape == (-1, 3, 32, 48)


def test_input_shapes_must_fit_the_model():
    x = TensorInfo("x", "float32", (-1, 3, -1))
    with pytest.raises(ConfigError, match=r"input_shapes.x = \[4, 5\] does not fit"):
        resolve_profile(_io(x), BuildSpec(input_shapes={"x": (4, 5)}), "m.onnx")
    with pytest.raises(ConfigError, match="did you mean 'x'"):
        resolve_profile(_io(x), BuildSpec(input_shapes={"X": (3, 5)}), "m.onnx")


def test_static_batch_requires_min_equals_max():
    x = TensorInfo("x", "float32", (1, 4))
    assert resolve_profile(_io(x), BuildSpec(1, 1), "m.onnx")[1] == {}  # fully static: no profile
    with pytest.raises(ConfigError, match="fixed batch dimension of 1.*set min = max = 1"):
        resolve_profile(_io(x), BuildSpec(1, 8), "m.onnx")


def test_scalar_input_and_mixed_batching_are_refused():
    with pytest.raises(ConfigError, match="scalar"):
        resolve_profile(_io(TensorInfo("s", "float32", ())), BuildSpec(), "m.onnx")
    mixed = _io(TensorInfo("a", "float32", (-1, 2)), TensorInfo("b", "float32", (1, 2)))
    with pytest.raises(ConfigError):
        resolve_profile(mixed, BuildSpec(1, 1), "m.onnx")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"min_batch": 4, "max_batch": 2}, "min=4 max=2"), ({"precision": "int8"}, "precision = 'int8'"),
     ({"workspace_mb": -1}, "workspace_mb = -1")],
)
def test_build_spec_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BuildSpec(**kwargs)


# --------------------------------------------------------------------------- the cache

class FakeBuilder:
    """Stands in for build_engine: counts builds, returns a plan derived from the spec."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, trt, path, spec):
        self.calls += 1
        plan = f"plan:{Path(path).read_bytes().hex()}:{spec.max_batch}:{spec.precision}".encode()
        io = _io(TensorInfo("x", "float32", (-1, 3)))
        return BuiltEngine(plan, io, {"x": [[1, 3], [spec.max_batch, 3], [spec.max_batch, 3]]}, 0.01)


@pytest.fixture
def fake_build(monkeypatch):
    builder = FakeBuilder()
    monkeypatch.setattr(cache_mod, "build_engine", builder)
    return builder


FAKE_TRT = type(sys)("tensorrt_rtx")
FAKE_TRT.__version__ = "0.0-test"


def _model(tmp_path: Path, content: bytes = b"onnx-bytes") -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    return path


def test_cache_hit_miss_and_invalidation(tmp_path, fake_build):
    model = _model(tmp_path)
    first = ensure_engine(FAKE_TRT, model, BuildSpec(1, 4))
    assert (first.source, fake_build.calls) == ("built", 1)
    hit = ensure_engine(FAKE_TRT, model, BuildSpec(1, 4))
    assert (hit.source, hit.plan, fake_build.calls) == ("cache", first.plan, 1)
    assert hit.io == first.io and hit.key == first.key
    for spec in (BuildSpec(1, 8), BuildSpec(1, 8, precision="fp16"), BuildSpec(1, 8, "fp16", 256)):
        assert ensure_engine(FAKE_TRT, model, spec).source == "built"
    assert fake_build.calls == 4
    model.write_bytes(b"other model")  # new weights: the key changes
    assert ensure_engine(FAKE_TRT, model, BuildSpec(1, 8, "fp16", 256)).source == "built"
    assert ensure_engine(FAKE_TRT, model, BuildSpec(1, 8, "fp16", 256), target="other-gpu").source == "built"
    assert fake_build.calls == 6


def test_cache_key_covers_module_version(tmp_path, fake_build):
    model = _model(tmp_path)
    ensure_engine(FAKE_TRT, model, BuildSpec())
    newer = type(sys)("tensorrt_rtx")
    newer.__version__ = "0.1-test"
    assert ensure_engine(newer, model, BuildSpec()).source == "built"


def _corrupt(path: Path, how: str) -> None:
    blob = path.read_bytes()
    if how == "truncated":
        path.write_bytes(blob[:-3])
    elif how == "bitflip":
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    elif how == "magic":
        path.write_bytes(b"X" + blob[1:])
    elif how == "header":
        path.write_bytes(MAGIC + (10).to_bytes(4, "little") + b"{not json}" + b"rest")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "huge-header":
        path.write_bytes(MAGIC + (1 << 30).to_bytes(4, "little"))


@pytest.mark.parametrize("how", ["truncated", "bitflip", "magic", "header", "empty", "huge-header"])
def test_damaged_cache_warns_and_rebuilds(tmp_path, fake_build, caplog, how):
    model = _model(tmp_path)
    ensure_engine(FAKE_TRT, model, BuildSpec())
    _corrupt(cache_path(model), how)
    with caplog.at_level(logging.WARNING, logger="trtserve.tensorrt"):
        again = ensure_engine(FAKE_TRT, model, BuildSpec())
    assert again.source == "built" and fake_build.calls == 2
    assert any("damaged" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert ensure_engine(FAKE_TRT, model, BuildSpec()).source == "cache"  # rewritten intact


def test_stale_key_is_a_quiet_miss(tmp_path, fake_build):
    model = _model(tmp_path)
    key = ensure_engine(FAKE_TRT, model, BuildSpec()).key
    with pytest.raises(CacheMiss) as info:
        read_cache(cache_path(model), "0" * 64)
    assert not info.value.damaged
    header, plan = read_cache(cache_path(model), key)
    assert header["components"]["spec"]["max_batch"] == 1 and plan.startswith(b"plan:")


def test_force_rebuild_and_no_cache(tmp_path, fake_build):
    model = _model(tmp_path)
    ensure_engine(FAKE_TRT, model, BuildSpec())
    assert ensure_engine(FAKE_TRT, model, BuildSpec(), force_rebuild=True).source == "built"
    cache_path(model).unlink()
    assert ensure_engine(FAKE_TRT, model, BuildSpec(), use_cache=False).source == "built"
    assert not cache_path(model).exists()


def test_unwritable_folder_still_serves_the_engine(tmp_path, fake_build, caplog, monkeypatch):
    model = _model(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(cache_mod.tempfile, "mkstemp", refuse)
    with caplog.at_level(logging.WARNING, logger="trtserve.tensorrt"):
        artifact = ensure_engine(FAKE_TRT, model, BuildSpec())
    assert artifact.source == "built" and artifact.plan
    assert any("cannot write engine cache" in r.message for r in caplog.records)
    assert not list(tmp_path.glob(".*tmp"))


def test_concurrent_instances_build_once(tmp_path, fake_build):
    model = _model(tmp_path)
    results, start = [], threading.Barrier(4)

    def load():
        start.wait()
        results.append(ensure_engine(FAKE_TRT, model, BuildSpec(1, 2)).source)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["built", "cache", "cache", "cache"] and fake_build.calls == 1


def test_cache_file_is_self_describing(tmp_path, fake_build):
    model = _model(tmp_path)
    ensure_engine(FAKE_TRT, model, BuildSpec(2, 8, "fp16", 64))
    assert cache_path(model).stat().st_mode & 0o777 == 0o644  # readable by a server running as another user
    blob = cache_path(model).read_bytes()
    length = int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 4], "little")
    header = json.loads(blob[len(MAGIC) + 4 : len(MAGIC) + 4 + length])
    assert header["components"]["spec"] == {
        "min_batch": 2, "opt_batch": 8, "max_batch": 8, "precision": "fp16", "workspace_mb": 64, "input_shapes": {},
    }
    assert header["components"]["tensorrt"] == "tensorrt_rtx 0.0-test"
    assert header["components"]["target"] == "rtx-aot:default"
    assert header["io"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 3]}]


def test_external_weight_files_enter_the_key(tmp_path, fake_build):
    onnx = pytest.importorskip("onnx", reason="listing external weight files needs the onnx package")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 3), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    ensure_engine(FAKE_TRT, path, BuildSpec())
    assert ensure_engine(FAKE_TRT, path, BuildSpec()).source == "cache"
    weights = tmp_path / "weights.bin"
    weights.write_bytes(np.full((3, 3), 2, np.float32).tobytes())  # same model file, new weights
    assert ensure_engine(FAKE_TRT, path, BuildSpec()).source == "built"


def test_plan_loading_reads_bytes_and_refuses_empty(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x01\x02")
    artifact = load_plan(plan)
    assert (artifact.source, artifact.plan, artifact.io) == ("plan", b"\x01\x02", None)
    plan.write_bytes(b"")
    with pytest.raises(ModelUnavailableError, match="empty"):
        load_plan(plan)
    with pytest.raises(ConfigError, match="cannot read"):
        load_plan(tmp_path / "missing.plan")


# --------------------------------------------------------------------------- items

def _checker(max_rows: int = 8) -> ItemChecker:
    a = TensorInfo("a", "float32", (-1, 3))
    b = TensorInfo("b", "int64", (-1, 2))
    return ItemChecker([Bounds(a, (1, 3), (max_rows, 3)), Bounds(b, (1, 2), (max_rows, 2))], max_rows, "m.onnx")


def test_items_multi_input_checks():
    check = _checker()
    ok = check.prepare({"data": {"b": np.zeros((2, 2), np.int64), "a": np.zeros((2, 3), np.float32)}})
    assert ok.rows == 2 and list(ok.arrays) == ["a", "b"] and not ok.unbatched
    bad = [
        ({"data": np.zeros((2, 3), np.float32)}, "send a dict name -> array"),
        ({"data": {"a": np.zeros((2, 3), np.float32)}}, r"\['b'\] missing"),
        ({"data": {"a": np.zeros((2, 3), np.float32), "bb": 1, "b": 1}}, "did you mean 'b'"),
        ({"data": {"a": np.zeros((2, 3), np.float64), "b": np.zeros((2, 2), np.int64)}}, "dtype float64, expected float32"),
        ({"data": {"a": np.zeros((2, 4), np.float32), "b": np.zeros((2, 2), np.int64)}}, "dimension 1 is 4, expected 3"),
        ({"data": {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 2), np.int64)}}, "different batch sizes"),
        ({"data": {"a": np.zeros((9, 3), np.float32), "b": np.zeros((9, 2), np.int64)}}, "at most 8"),
        ({"data": {"a": np.zeros((0, 3), np.float32), "b": np.zeros((0, 2), np.int64)}}, "0 rows"),
        ({"data": {"a": np.zeros(3, np.float32), "b": np.zeros((1, 2), np.int64)}}, "mixes batched and unbatched"),
        ({"data": {"a": [1.0, 2.0, 3.0], "b": np.zeros((1, 2), np.int64)}}, "must be a numpy array"),
    ]
    for item, match in bad:
        with pytest.raises(InvalidInputError, match=match):
            check.prepare(item)


def trt_split(outputs, prepared):
    """What TensorrtTensor.forward does with one execution's outputs."""
    check_rows(outputs, sum(p.rows for p in prepared), "TensorrtTensor model m.onnx", "m.onnx")
    return [as_result(parts) for parts in split(outputs, prepared, copy=True)]


def test_unbatched_sample_and_split():
    x = TensorInfo("x", "float32", (-1, 2))
    check = ItemChecker([Bounds(x, (1, 2), (4, 2))], 4, "m.onnx")
    one = check.prepare({"data": np.array([1, 2], np.float32)})
    two = check.prepare({"data": np.ones((2, 2), np.float32)})
    assert (one.rows, one.unbatched, two.rows) == (1, True, 2)
    out = np.arange(6, dtype=np.float32).reshape(3, 2)
    results = trt_split({"y": out}, [one, two])
    assert results[0].shape == (2,) and results[1].shape == (2, 2)
    out[:] = -1  # results are copies: the staging buffer is reused by the next batch
    assert results[0].tolist() == [0, 1] and results[1].tolist() == [[2, 3], [4, 5]]
    multi = trt_split({"p": out, "q": out}, [two, one])
    assert set(multi[0]) == {"p", "q"}
    with pytest.raises(BackendError, match="keep the batch"):
        trt_split({"y": np.zeros((5, 2), np.float32)}, [one, two])


def test_groups_by_non_batch_shape():
    x = TensorInfo("x", "float32", (-1, -1))
    check = ItemChecker([Bounds(x, (1, 1), (8, 16))], 8, "m.plan")
    items = [np.zeros((1, 4), np.float32), np.zeros((2, 8), np.float32), np.zeros((1, 4), np.float32)]
    prepared = [check.prepare({"data": a}) for a in items]
    assert [indices for indices, _ in group(prepared)] == [[0, 2], [1]]
    with pytest.raises(InvalidInputError, match="dimension 1 is 17, expected 1..16"):
        check.prepare({"data": np.zeros((1, 17), np.float32)})


class FakeCudaArray:
    def __init__(self, shape, typestr="<f4", strides=None):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0x1000, False),
                                         "strides": strides, "version": 3, "stream": 7}


def test_device_inputs_are_accepted_when_contiguous():
    x = TensorInfo("x", "float32", (-1, 2))
    check = ItemChecker([Bounds(x, (1, 2), (4, 2))], 4, "m.onnx")
    prep = check.prepare({"data": FakeCudaArray((3, 2))})
    arr = prep.arrays["x"]
    assert isinstance(arr, DeviceInput) and (arr.ptr, arr.shape, arr.nbytes, arr.stream) == (0x1000, (3, 2), 24, 7)
    sample = check.prepare({"data": FakeCudaArray((2,))})
    assert sample.unbatched and sample.arrays["x"].shape == (1, 2)
    with pytest.raises(InvalidInputError, match="non-contiguous"):
        check.prepare({"data": FakeCudaArray((3, 2), strides=(4, 12))})
    with pytest.raises(InvalidInputError, match="dtype float16"):
        check.prepare({"data": FakeCudaArray((3, 2), typestr="<f2")})
