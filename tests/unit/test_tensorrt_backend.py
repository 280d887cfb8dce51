"""TensorrtTensor as a backend in a model.

* On this CPU-only machine, for real: the model fails to load with ModelUnavailableError
  saying a CUDA GPU is needed; config keys are validated at load.
* With an emulated GPU and TensorRT runtime (tests/unit/fake_tensorrt.py; not TensorRT):
  the real scheduler, batching, item checks, staging and splitting code of TensorrtTensor
  runs end to end, and every failing return value turns into a typed error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import trtserve
from trtserve import cuda
from trtserve.config import load_config
from trtserve.errors import BackendError, ConfigError, InvalidInputError, ModelUnavailableError

import fake_tensorrt as fake  # noqa: E402  (tests/unit is on sys.path under pytest)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- real, CPU only

@pytest.mark.skipif(cuda.is_available(), reason="a CUDA device is present: this checks the CPU-only refusal")
def test_tensorrt_model_on_a_cpu_machine_is_unavailable_with_the_reason(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"never read: the GPU check comes first")
    with pytest.raises(ModelUnavailableError) as caught:
        trtserve.pipe({"backend": "TensorrtTensor", "model": str(model), "max": 4})
    message = str(caught.value)
    assert "TensorrtTensor needs a CUDA GPU" in message and str(model) in message
    assert cuda.unavailable_reason() in message


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"precision": "int8"}, "precision = 'int8' is not one of"),
        ({"trt_module": "tensorrt9"}, "trt_module = 'tensorrt9'"),
        ({"workspace_mb": -5}, "workspace_mb = -5 must be >= 0"),
        ({"input_shapes": {"images": [3, 0, 224]}}, "per-row shapes of positive integers"),
        ({"engine_cache": "yes"}, "engine_cache must be true or false"),
        ({"workspace": 10}, "did you mean 'workspace_mb'"),
    ],
)
def test_config_keys_are_validated_at_load(tmp_path, extra, match):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ConfigError, match=match):
        load_config({"backend": "TensorrtTensor", "model": "model.onnx", **extra}, model_dir=tmp_path)


def test_model_file_type_is_checked_before_anything_else(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="unknown file type '.pt'"):
        trtserve.pipe({"backend": "TensorrtTensor", "model": str(tmp_path / "model.pt")})


# --------------------------------------------------------------------------- emulated GPU

def multi_engine(**fail) -> fake.FakeEngine:
    """a float32 [N,3], b int32 [N,2] -> scaled = 2a (float32 [N,3]), b_plus = b+1 (int32 [N,2])."""
    return fake.FakeEngine(
        inputs={
            "a": fake.Tensor(fake.DataType.FLOAT, (-1, 3), ((1, 3), (8, 3), (8, 3))),
            "b": fake.Tensor(fake.DataType.INT32, (-1, 2), ((1, 2), (8, 2), (8, 2))),
        },
        outputs={"scaled": fake.Tensor(fake.DataType.FLOAT, (-1, 3)), "b_plus": fake.Tensor(fake.DataType.INT32, (-1, 2))},
        compute=lambda f: {"scaled": f["a"] * 2, "b_plus": f["b"] + 1},
        fail=dict(fail),
    )


@pytest.fixture
def gpu(monkeypatch):
    """Emulated CUDA + TensorRT runtime; ``gpu.engine`` is what the next load deserializes."""
    state = fake.FakeCuda()
    state.install(monkeypatch, cuda)
    trt = fake.module()
    state.engine = multi_engine()
    monkeypatch.setattr("trtserve.tensorrt.import_tensorrt", lambda preference="auto": trt)
    monkeypatch.setattr("trtserve.tensorrt.deserialize_engine", lambda t, artifact: (object(), state.engine))
    return state


@pytest.fixture
def plan(tmp_path) -> Path:
    path = tmp_path / "model.plan"
    path.write_bytes(b"emulated engine bytes")
    return path


def _pipe(plan: Path, **options):
    return trtserve.pipe({"backend": "TensorrtTensor", "model": str(plan), "max": 8, **options})


def test_multi_input_multi_output_round_trip(gpu, plan):
    models = _pipe(plan)
    try:
        item = {"data": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([[1, 2], [3, 4]], np.int32)}}
        models(item)
        assert set(item["result"]) == {"scaled", "b_plus"}
        np.testing.assert_array_equal(item["result"]["scaled"], np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
        np.testing.assert_array_equal(item["result"]["b_plus"], [[2, 3], [4, 5]])
        inputs, outputs = models.pipeline.nodes[0].backend.io_spec()
        assert [(s.name, s.dtype, s.shape) for s in inputs] == [("a", "float32", (-1, 3)), ("b", "int32", (-1, 2))]
        assert [s.name for s in outputs] == ["scaled", "b_plus"]
    finally:
        models.close()


def test_batched_items_are_staged_at_their_offsets_and_split_back(gpu, plan):
    models = _pipe(plan)
    try:
        backend = models.pipeline.nodes[0].backend
        items = [
            {"data": {"a": np.full((n, 3), n, np.float32), "b": np.full((n, 2), n, np.int32)}} for n in (1, 3, 2)
        ]
        items.append({"data": {"a": np.full(3, 9, np.float32), "b": np.full(2, 9, np.int32)}})  # one unbatched row
        gpu.copies.clear()
        backend.forward(items)
        assert gpu.engine.contexts[0].executions[-1] == 7  # one execution for all 7 rows
        for n, item in zip((1, 3, 2), items):
            np.testing.assert_array_equal(item["result"]["scaled"], np.full((n, 3), 2 * n, np.float32))
            np.testing.assert_array_equal(item["result"]["b_plus"], np.full((n, 2), n + 1, np.int32))
        assert items[3]["result"]["scaled"].shape == (3,)  # the sample comes back without a batch dim
        assert sorted(gpu.copies) == sorted([("htod", 7 * 12), ("htod", 7 * 8), ("dtoh", 7 * 12), ("dtoh", 7 * 8)])
    finally:
        models.close()


def test_device_inputs_are_copied_device_to_device(gpu, plan):
    models = _pipe(plan)
    try:
        backend = models.pipeline.nodes[0].backend
        on_device = gpu.DeviceBuffer(2 * 3 * 4)
        on_device.as_numpy(np.float32, (2, 3))[:] = 5

        class CudaArray:  # what a GPU preprocessing stage hands over
            __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4", "data": (on_device.ptr, False),
                                        "strides": None, "version": 3, "stream": 0x9999}

        gpu.copies.clear()
        item = {"data": {"a": CudaArray(), "b": np.zeros((2, 2), np.int32)}}
        backend.forward([item, {"data": {"a": np.ones((1, 3), np.float32), "b": np.zeros((1, 2), np.int32)}}])
        np.testing.assert_array_equal(item["result"]["scaled"], np.full((2, 3), 10, np.float32))
        assert ("dtod", 24) in gpu.copies and ("htod", 12) in gpu.copies  # device rows, then the host run
        assert gpu.recorded_on == [0x9999]  # ordered after the producer's stream
        assert backend.runner.stream.waited == [backend.runner.producer_ready]
    finally:
        models.close()


def test_concurrent_requests_are_batched_through_the_scheduler(gpu, plan):
    models = _pipe(plan, batching_timeout=50, instance_num=1)
    try:
        import concurrent.futures

        def call(n):
            item = {"data": {"a": np.full((1, 3), n, np.float32), "b": np.full((1, 2), n, np.int32)}}
            models(item)
            return item["result"]["b_plus"][0, 0]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(call, range(16))) == [n + 1 for n in range(16)]
        assert max(gpu.engine.contexts[0].executions) > 1  # some batches held more than one request
    finally:
        models.close()


def test_invalid_items_are_refused_before_queueing(gpu, plan):
    models = _pipe(plan)
    try:
        with pytest.raises(InvalidInputError, match="dtype float64, expected float32"):
            models({"data": {"a": np.zeros((1, 3)), "b": np.zeros((1, 2), np.int32)}})
        with pytest.raises(InvalidInputError, match="send a dict name -> array"):
            models({"data": np.zeros((1, 3), np.float32)})
    finally:
        models.close()


@pytest.mark.parametrize(
    "fail, error, match",
    [
        ({"context": True}, ModelUnavailableError, "could not create an execution context"),
        ({"set_tensor_address": True}, ModelUnavailableError, "set_tensor_address"),
        ({"set_input_shape": True}, ModelUnavailableError, "set_input_shape"),
        ({"infer_shapes": ["a"]}, ModelUnavailableError, r"unspecified tensors: \['a'\]"),
    ],
)
def test_refusals_at_init_are_typed_and_release_buffers(gpu, plan, fail, error, match):
    gpu.engine = multi_engine(**fail)
    with pytest.raises(error, match=match):
        _pipe(plan)
    assert not gpu.live  # every stream, buffer and event created before the refusal was closed


def test_execute_failure_fails_the_batch(gpu, plan):
    models = _pipe(plan)
    try:
        gpu.engine.fail["execute"] = True
        with pytest.raises(BackendError, match="execute_async_v3 failed for a batch of 1 rows"):
            models({"data": {"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 2), np.int32)}})
    finally:
        models.close()
    assert not gpu.live


def test_node_batch_range_must_fit_the_engine_profile(gpu, plan):
    with pytest.raises(ConfigError, match="outside the engine's range 1..8"):
        _pipe(plan, max=16)


def test_enqueues_on_the_current_stream_when_wrapped(gpu, plan):
    gpu.stream = gpu.Stream()  # as SyncTensor would have made current on the instance thread
    models = _pipe(plan)
    try:
        models({"data": {"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 2), np.int32)}})
        assert gpu.engine.contexts[0].streams == [gpu.stream.handle]
    finally:
        models.close()


def test_bf16_tensors_are_refused_with_a_fix(gpu, plan):
    gpu.engine.outputs["scaled"] = fake.Tensor(fake.DataType.BF16, (-1, 3))
    with pytest.raises(ConfigError, match="no numpy equivalent.*Cast node"):
        _pipe(plan)


def test_build_keys_on_a_prebuilt_plan_are_refused(gpu, plan):
    with pytest.raises(ConfigError, match="precision = 'fp16' applies to ONNX models only"):
        _pipe(plan, precision="fp16")
    with pytest.raises(ConfigError, match="input_shapes = .* applies to ONNX models only"):
        _pipe(plan, input_shapes={"a": [3]})


def test_onnx_model_goes_through_the_cache_and_must_match_the_engine(gpu, tmp_path, monkeypatch):
    from trtserve.tensorrt.cache import EngineArtifact
    from trtserve.tensorrt.io import EngineIO, TensorInfo

    calls = []

    def ensure(trt, path, spec, use_cache=True, force_rebuild=False):
        calls.append((spec, use_cache, force_rebuild))
        io = EngineIO((TensorInfo("a", "float32", (-1, 3)), TensorInfo("b", "int32", (-1, 2))),
                      (TensorInfo("scaled", "float32", (-1, 3)), TensorInfo("b_plus", "int32", (-1, 2))))
        return EngineArtifact(b"engine", io, "built", path)

    monkeypatch.setattr("trtserve.tensorrt.ensure_engine", ensure)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    models = trtserve.pipe({"backend": "TensorrtTensor", "model": str(model), "max": 8, "min": 2, "precision": "fp16",
                            "workspace_mb": 64, "engine_cache": False})
    models.close()
    spec, use_cache, _ = calls[0]
    assert (spec.min_batch, spec.max_batch, spec.precision, spec.workspace_mb, use_cache) == (2, 8, "fp16", 64, False)
    gpu.engine.outputs = {"renamed": gpu.engine.outputs.pop("scaled"), **gpu.engine.outputs}
    with pytest.raises(ModelUnavailableError, match="differ from those recorded at build"):
        trtserve.pipe({"backend": "TensorrtTensor", "model": str(model), "max": 8})


def test_refused_cached_engine_is_rebuilt_once(gpu, tmp_path, monkeypatch):
    from trtserve.tensorrt.cache import EngineArtifact
    from trtserve.tensorrt.runtime import EngineRejected

    sources = iter(["cache", "built"])
    monkeypatch.setattr("trtserve.tensorrt.ensure_engine",
                        lambda trt, path, spec, use_cache=True, force_rebuild=False: EngineArtifact(b"e", None, next(sources), path))
    attempts = []

    def deserialize(trt, artifact):
        attempts.append(artifact.source)
        if artifact.source == "cache":
            raise EngineRejected("stale for this driver")
        return object(), gpu.engine

    monkeypatch.setattr("trtserve.tensorrt.deserialize_engine", deserialize)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    trtserve.pipe({"backend": "TensorrtTensor", "model": str(model), "max": 8}).close()
    assert attempts == ["cache", "built"]


# --------------------------------------------------------------------------- declared tensors


def test_declared_tensors_are_checked_against_the_engine(gpu, plan):
    base = {"backend": "TensorrtTensor", "model": str(plan), "max": 8}
    inputs = [{"name": "a", "dtype": "float32", "shape": [-1, 3]}, {"name": "b", "dtype": "int32", "shape": [-1, 2]}]
    outputs = [{"name": "scaled", "dtype": "float32", "shape": [-1, 3]}, {"name": "b_plus", "dtype": "int64", "shape": [-1, 2]}]
    with pytest.raises(ConfigError) as caught:
        trtserve.pipe({**base, "input": inputs, "output": outputs})
    assert caught.value.details["key"] == "output[1].dtype" and str(plan) in caught.value.message
    assert "dtype int64, expected int32" in caught.value.message
    with pytest.raises(ConfigError, match=r"declares 1 input\(s\) \['a'\] but .*model.plan has 2"):
        trtserve.pipe({**base, "input": inputs[:1]})
    outputs[1].update(dtype="int32", name="plus_one", source="b_plus")
    models = trtserve.pipe({**base, "input": inputs, "output": outputs})
    try:
        item = {"data": {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 2), np.int32)}}
        models(item)
        assert set(item["result"]) == {"scaled", "plus_one"}
        stats = models.pipeline.nodes[0].stats.snapshot()
        assert stats["model_calls"] == 1 and stats["call_rows"] == {"2": 1}
    finally:
        models.close()


def test_declared_tensors_against_an_engine_built_for_real_by_tensorrt_rtx(gpu, tmp_path, monkeypatch):
    """The real ONNX -> engine build (tensorrt_rtx runs it on a CPU) gives the I/O the check
    uses; only running the engine is emulated."""
    rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    import onnx_models as om
    from trtserve.tensorrt import ensure_engine as real_ensure

    model = om.save(tmp_path / "model.onnx", [om.node("Relu", ["x"], ["y"])],
                    [om.info("x", om.FLOAT, ["N", 3, 16, 16])], [om.info("y", om.FLOAT, ["N", 3, 16, 16])])
    profile = ((1, 3, 16, 16), (4, 3, 16, 16), (4, 3, 16, 16))
    gpu.engine = fake.FakeEngine(inputs={"x": fake.Tensor(fake.DataType.FLOAT, (-1, 3, 16, 16), profile)},
                                 outputs={"y": fake.Tensor(fake.DataType.FLOAT, (-1, 3, 16, 16))},
                                 compute=lambda f: {"y": np.maximum(f["x"], 0)})
    monkeypatch.setattr("trtserve.tensorrt.ensure_engine", lambda trt, path, spec, **kw: real_ensure(rtx, path, spec, **kw))
    base = {"backend": "TensorrtTensor", "model": model, "max": 4, "engine_cache": False}
    with pytest.raises(ConfigError) as caught:
        trtserve.pipe({**base, "output": [{"name": "y", "dtype": "float32", "shape": [-1, 3, 16, 8]}]})
    assert "dimension 3 is 8, expected 16" in caught.value.message and model in caught.value.message
    models = trtserve.pipe({**base, "output": [{"name": "y", "dtype": "float32", "shape": [3, 16, 16]}]})
    try:
        item = {"data": np.full((3, 16, 16), -1, np.float32)}
        models(item)
        assert item["result"].shape == (3, 16, 16) and not item["result"].any()
    finally:
        models.close()
