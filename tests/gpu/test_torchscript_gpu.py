"""SyncTensor[TorchScriptTensor] on a real GPU with host (numpy) requests: rows packed into
the instance's pinned staging buffer and uploaded in one copy, against the same model on
the CPU; the buffer grows, and batches that cannot be packed take the general path."""
from __future__ import annotations

import subprocess
import sys
import threading
import textwrap
from pathlib import Path

import numpy as np
import pytest

import trtserve
from trtserve import cuda

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


def make_net():
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)]
    return torch.nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def net_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "net.pt"
    torch.jit.save(torch.jit.trace(make_net(), torch.rand(2, 3, 16, 16)), str(path))
    return path


def reference(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return make_net()(torch.from_numpy(x)).numpy()


def config(path, **extra):
    return {"backend": "SyncTensor[TorchScriptTensor]", "model": str(path), "instance_num": 2, "max": 8,
            "batching_timeout": 2, **extra}


def test_list_calls_of_several_rows_match_the_cpu_and_the_staging_buffer_grows(net_path):
    rng = np.random.default_rng(0)
    with trtserve.pipe(config(net_path, instance_num=1)) as models:
        for sizes in ((1,), (1, 2), (3, 2, 3)):  # 1, 3 then 8 rows: the buffer grows twice
            inputs = [rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in sizes]
            items = [{"data": x} for x in inputs]
            models(items)
            for x, item in zip(inputs, items):
                assert isinstance(item["result"], np.ndarray) and item["result"].shape == (x.shape[0], 5)
                np.testing.assert_allclose(item["result"], reference(x), rtol=2e-3, atol=2e-3)


def test_sixteen_threads_of_single_rows_are_batched_and_each_gets_its_own_answer(net_path):
    inputs = [np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32) for i in range(16)]
    expected = [reference(x) for x in inputs]
    failures = []
    with trtserve.pipe(config(net_path)) as models:

        def worker(t: int) -> None:
            for step in range(40):
                i = (t + step) % 16
                item = {"data": inputs[i]}
                models(item)
                if not np.allclose(item.get("result"), expected[i], rtol=2e-3, atol=2e-3):
                    failures.append((t, step))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sizes = models.pipeline.nodes[0].stats.snapshot()["batch_sizes"]
    assert not failures, failures[:5]
    assert any(int(size) > 1 for size in sizes), sizes


def test_samples_without_a_batch_dim_and_a_non_contiguous_row(net_path):
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal((3, 16, 16)).astype(np.float32) for _ in range(3)]
    samples[1] = np.ascontiguousarray(samples[1].transpose(0, 2, 1)).transpose(0, 2, 1)  # same values, strided
    with trtserve.pipe(config(net_path, add_batch_dim=True)) as models:
        items = [{"data": x} for x in samples]
        models(items)
    for x, item in zip(samples, items):
        assert item["result"].shape == (5,)
        np.testing.assert_allclose(item["result"], reference(np.ascontiguousarray(x)[None])[0], rtol=2e-3, atol=2e-3)


def test_a_batch_mixing_host_and_device_rows_takes_the_general_path(net_path):
    """One batch holding a numpy row and a DeviceArray (not packable into the staging
    buffer): forward is called directly, so both are sure to share the batch."""
    rng = np.random.default_rng(2)
    host = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    other = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    with cuda.Stream() as up, trtserve.pipe(config(net_path, instance_num=1)) as models:
        on_device = cuda.to_device(other, up)
        up.synchronize()
        sync_tensor = models.pipeline.nodes[0]._instances[0].backend  # idle: nothing submitted
        items = [{"data": host}, {"data": on_device}]
        sync_tensor.forward(items)
    np.testing.assert_allclose(items[0]["result"], reference(host), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(items[1]["result"], reference(other), rtol=2e-3, atol=2e-3)


def test_a_batch_of_device_rows_is_concatenated_on_the_gpu(net_path):
    """Several DeviceArrays (what a GPU preprocessing node hands on) in one batch."""
    rng = np.random.default_rng(3)
    hosts = [rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (1, 2, 1)]
    with cuda.Stream() as up, trtserve.pipe(config(net_path, instance_num=1)) as models:
        rows = [cuda.to_device(x, up) for x in hosts]
        up.synchronize()
        for row in rows:
            row.stream = None  # complete, as SyncTensor marks the results it hands on
        sync_tensor = models.pipeline.nodes[0]._instances[0].backend  # idle: nothing submitted
        items = [{"data": row} for row in rows]
        sync_tensor.forward(items)
    for x, item in zip(hosts, items):
        np.testing.assert_allclose(item["result"], reference(x), rtol=2e-3, atol=2e-3)


def test_rows_with_a_zero_sized_dimension_skip_the_staging_copy(tmp_path):
    """An all-empty batch has nothing to copy (the staging buffer hands out no bytes)."""
    path = tmp_path / "identity.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Identity(), torch.rand(2, 0)), str(path))
    with trtserve.pipe(config(path, instance_num=1)) as models:
        items = [{"data": np.zeros((2, 0), np.float32)}, {"data": np.zeros((1, 0), np.float32)}]
        models(items)
    assert [item["result"].shape for item in items] == [(2, 0), (1, 0)]


class ToHost(torch.nn.Module):
    def forward(self, x):
        return (x * 2).cpu()


def test_a_cuda_model_that_returns_a_host_tensor_is_split_like_any_other(tmp_path):
    path = tmp_path / "to_host.pt"
    torch.jit.save(torch.jit.script(ToHost()), str(path))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with trtserve.pipe(config(path, instance_num=1)) as models:
        items = [{"data": x[:1]}, {"data": x[1:]}]
        models(items)
    np.testing.assert_array_equal(items[0]["result"], x[:1] * 2)
    np.testing.assert_array_equal(items[1]["result"], x[1:] * 2)


KEEP_AFTER_CLOSE = textwrap.dedent(
    """
    import gc, sys
    sys.path[:0] = [{root!r}, {clients!r}]
    import numpy as np
    import trtserve
    models = trtserve.pipe({{"backend": "SyncTensor[TorchScriptTensor]", "model": {path!r}, "instance_num": 2, "max": 8}})
    kept = []
    for rows in (1, 3, 2):
        item = {{"data": np.ones((rows, 3, 16, 16), np.float32)}}
        models(item)
        kept.append(item["result"])
    models.close()  # the instances' streams are destroyed here
    shapes = [r.shape for r in kept]
    kept.clear()
    gc.collect()  # the results' pinned memory is freed after its stream
    print("ok", shapes)
    """
)


def test_results_kept_after_their_model_closed_are_freed_cleanly(net_path):
    """torch's pinned allocator records an event, when a block is freed, on every stream that
    copied into it, so a result freed after its instance's stream was destroyed would crash
    the process.  In a subprocess, so a crash fails this test and nothing else."""
    script = KEEP_AFTER_CLOSE.format(root=str(ROOT), clients=str(ROOT / "clients"), path=str(net_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip().splitlines()[-1] == "ok [(1, 5), (3, 5), (2, 5)]"
