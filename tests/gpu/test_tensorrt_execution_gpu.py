"""TensorrtTensor's execution path on a real GPU, with cupy standing in for the engine.

No GPU here runs TensorRT (TensorRT-RTX refuses compute capability 9.0; full TensorRT is
not installable), so the engine's kernels are emulated by cupy on the stream TensorrtTensor
passes to execute_async_v3.  Everything else is real: trtserve.cuda streams, events, pinned
and device buffers, the H2D/D2D/D2H copies at their offsets, SyncTensor's stream, and the
scheduler.  It runs only where CUDA and cupy are present.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from trtserve import cuda

if not cuda.is_available():
    pytest.skip(f"needs a CUDA device: {cuda.unavailable_reason()}", allow_module_level=True)
cupy = pytest.importorskip("cupy", reason="the emulated engine computes with cupy")

import trtserve  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import fake_tensorrt as fake  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(120),
    # cupy 14 deprecates ExternalStream(int); its replacement wants a __cuda_stream__ object
    pytest.mark.filterwarnings("ignore:ExternalStream is deprecated:DeprecationWarning"),
]


def _device_view(ptr: int, dtype, shape):
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    memory = cupy.cuda.UnownedMemory(ptr, nbytes, owner=None)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))


class CupyContext(fake.FakeContext):
    """Reads inputs from and writes outputs to the device addresses TensorrtTensor bound,
    on the stream it enqueued with: a wrong offset, size or ordering shows up as wrong data."""

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.streams.append(stream_handle)
        with cupy.cuda.ExternalStream(stream_handle):
            feeds = {n: _device_view(self.addresses[n], fake.nptype(t.dtype), self.shapes[n]) for n, t in self.engine.inputs.items()}
            self.executions.append(next(iter(feeds.values())).shape[0])
            for name, value in self.engine.compute(feeds).items():
                _device_view(self.addresses[name], value.dtype, value.shape)[...] = value
        return True


def engine() -> fake.FakeEngine:
    return fake.FakeEngine(
        inputs={
            "a": fake.Tensor(fake.DataType.FLOAT, (-1, 3, 64, 64), ((1, 3, 64, 64), (16, 3, 64, 64), (16, 3, 64, 64))),
            "b": fake.Tensor(fake.DataType.INT32, (-1, 2), ((1, 2), (16, 2), (16, 2))),
        },
        outputs={"mean": fake.Tensor(fake.DataType.FLOAT, (-1, 3)), "b_plus": fake.Tensor(fake.DataType.INT32, (-1, 2))},
        compute=lambda f: {"mean": f["a"].mean(axis=(2, 3)), "b_plus": f["b"] + 1},
        context_class=CupyContext,
    )


@pytest.fixture
def model(monkeypatch, tmp_path):
    trt = fake.module()
    monkeypatch.setattr("trtserve.tensorrt.import_tensorrt", lambda preference="auto": trt)
    monkeypatch.setattr("trtserve.tensorrt.deserialize_engine", lambda t, artifact: (object(), engine()))
    path = tmp_path / "model.plan"
    path.write_bytes(b"emulated")
    return path


@pytest.mark.parametrize("expression", ["TensorrtTensor", "SyncTensor[TensorrtTensor]"])
def test_batches_round_trip_through_device_memory(model, expression):
    rng = np.random.default_rng(0)
    with trtserve.pipe({"backend": expression, "model": str(model), "max": 16, "instance_num": 2, "batching_timeout": 5}) as models:
        import concurrent.futures

        def call(n):
            a = rng.standard_normal((n, 3, 64, 64)).astype(np.float32)
            b = np.arange(2 * n, dtype=np.int32).reshape(n, 2)
            item = {"data": {"a": a, "b": b}}
            models(item)
            np.testing.assert_allclose(item["result"]["mean"], a.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(item["result"]["b_plus"], b + 1)
            return n

        sizes = [1 + i % 4 for i in range(64)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(call, sizes)) == sizes


def test_device_input_from_another_stream(model):
    with trtserve.pipe({"backend": "SyncTensor[TensorrtTensor]", "model": str(model), "max": 16}) as models:
        producer = cupy.cuda.Stream(non_blocking=True)
        with producer:
            a = cupy.random.standard_normal((4, 3, 64, 64), dtype=cupy.float32) * 3 + 1
        item = {"data": {"a": a, "b": np.zeros((4, 2), np.int32)}}
        models(item)
        np.testing.assert_allclose(item["result"]["mean"], cupy.asnumpy(a.mean(axis=(2, 3))), rtol=1e-5, atol=1e-6)
