"""TorchScriptTensor with ``cuda_graph = true`` on a real GPU: one graph per batch size,
replayed, against the same model on the CPU; results outliving later replays; concurrent
captures; a model that cannot be captured; the per-instance graph limit."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

import trtserve
from trtserve.backends.gpu import torchgraph

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
torch = pytest.importorskip("torch")


def make_net():
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
              torch.nn.Linear(4, 5)]
    return torch.nn.Sequential(*layers).eval()


class HostSync(torch.nn.Module):
    """``float(x.sum())`` copies to the host and waits: illegal while a stream is captured."""

    def forward(self, x):
        if float(x.sum()) > 1e30:
            return x * 0.0
        return x * 2.0


@pytest.fixture(scope="module")
def net_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "net.pt"
    torch.jit.save(torch.jit.trace(make_net(), torch.rand(2, 3, 16, 16)), str(path))
    return path


def reference(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return make_net()(torch.from_numpy(x)).numpy()


def config(path, **extra):
    return {"backend": "SyncTensor[TorchScriptTensor]", "model": str(path), "instance_num": 1, "max": 8,
            "batching_timeout": 2, "cuda_graph": True, **extra}


def runners(models) -> list[torchgraph.GraphRunner]:
    """Each instance's GraphRunner (SyncTensor -> TorchScriptTensor), read while idle."""
    return [instance.backend.children[0].graphs for instance in models.pipeline.nodes[0]._instances]


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_each_batch_size_is_captured_once_then_replayed_and_matches_the_cpu(net_path):
    with trtserve.pipe(config(net_path)) as models:
        for round_ in range(2):  # the first round captures, the second replays
            for n in range(1, 9):
                x = rows(n, seed=10 * round_ + n)
                item = {"data": x}
                models(item)
                np.testing.assert_allclose(item["result"], reference(x), rtol=2e-3, atol=2e-3)
        (runner,) = runners(models)
        assert runner.captured == 8 and len(runner.graphs) == 8


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("result_device", ["host", "device"])
def test_results_kept_from_a_batch_survive_later_replays_of_its_graph(net_path, result_device, overlap):
    """The graph's outputs are static tensors; results must be copies, or the next replay of
    the same batch size would overwrite what an earlier caller still holds (with overlap the
    next replay is enqueued before this batch's callers are woken)."""
    inputs = [rows(2, seed=s) for s in range(5)]
    with trtserve.pipe(config(net_path, result_device=result_device, overlap=overlap)) as models:
        items = [{"data": x} for x in inputs]
        for item in items:  # five separate batches of the same size: one graph, four replays
            models(item)
        results = [item["result"] if result_device == "host" else item["result"].to_host() for item in items]
    for x, result in zip(inputs, results):
        np.testing.assert_allclose(result, reference(x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("overlap", [False, True])
def test_two_instances_capture_while_sixteen_threads_call(net_path, overlap):
    inputs = [rows(1 + i % 3, seed=100 + i) for i in range(16)]
    expected = [reference(x) for x in inputs]
    failures: list[tuple[int, int]] = []
    with trtserve.pipe(config(net_path, instance_num=2, overlap=overlap)) as models:

        def worker(t: int) -> None:
            for step in range(30):
                i = (t + step) % 16
                item = {"data": inputs[i]}
                models(item)
                if not np.allclose(item.get("result"), expected[i], rtol=2e-3, atol=2e-3):
                    failures.append((t, step))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        captured = [runner.captured for runner in runners(models)]
        sizes = models.pipeline.nodes[0].stats.snapshot()["batch_sizes"]
    assert not failures, failures[:5]
    assert sum(captured) >= 2, (captured, sizes)


def test_a_model_that_syncs_the_host_runs_eagerly_with_one_warning(tmp_path, caplog):
    path = tmp_path / "sync.pt"
    torch.jit.save(torch.jit.script(HostSync()), str(path))
    x = rows(3, seed=7)
    with caplog.at_level(logging.WARNING, logger="trtserve.backends"), trtserve.pipe(config(path)) as models:
        for _ in range(3):
            item = {"data": x}
            models(item)
            np.testing.assert_allclose(item["result"], x * 2.0, rtol=1e-6)
        (runner,) = runners(models)
        assert runner.captured == 0 and len(runner.graphs) == 1
    warnings = [r.getMessage() for r in caplog.records if "cannot be captured" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "float32[3, 3, 16, 16]" in warnings[0] and "cuda_graph = false" in warnings[0]


def test_a_failed_capture_leaves_the_device_usable_for_graphs(tmp_path, net_path):
    """After the failed capture above, a capturable model in the same process still captures."""
    path = tmp_path / "sync.pt"
    torch.jit.save(torch.jit.script(HostSync()), str(path))
    with trtserve.pipe(config(path)) as models:
        models({"data": rows(2, seed=1)})
    x = rows(2, seed=2)
    with trtserve.pipe(config(net_path)) as models:
        item = {"data": x}
        models(item)
        assert runners(models)[0].captured == 1
    np.testing.assert_allclose(item["result"], reference(x), rtol=2e-3, atol=2e-3)


def test_past_the_graph_limit_further_signatures_run_eagerly(net_path, monkeypatch, caplog):
    monkeypatch.setattr(torchgraph, "MAX_GRAPHS", 2)
    with caplog.at_level(logging.WARNING, logger="trtserve.backends"), trtserve.pipe(config(net_path)) as models:
        for n in (1, 2, 3, 4, 3):
            x = rows(n, seed=n)
            item = {"data": x}
            models(item)
            np.testing.assert_allclose(item["result"], reference(x), rtol=2e-3, atol=2e-3)
        (runner,) = runners(models)
        assert runner.captured == 2
    assert sum("already have CUDA graphs" in r.getMessage() for r in caplog.records) == 1
