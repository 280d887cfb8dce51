"""TorchScriptTensor on the CPU (no CUDA): batching, splitting, output forms, errors.

Skipped where PyTorch is not installed (it is an optional extra: pip install 'trtserve[torch]').
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import trtserve
from trtserve.errors import ConfigError, InvalidInputError, ModelUnavailableError

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install 'trtserve[torch]' to test TorchScriptTensor")
pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


class TwoOutputs(torch.nn.Module):
    def forward(self, a, b):
        return a + b, (a * b).sum(dim=1)


@pytest.fixture(scope="module")
def net_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "net.pt"
    torch.jit.save(torch.jit.trace(Net().eval(), torch.rand(2, 3, 8, 8)), str(path))
    return path


def _reference(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return Net().eval()(torch.from_numpy(x)).numpy()


def test_batched_calls_split_per_item_and_match_eager(net_path):
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((n, 3, 8, 8)).astype(np.float32) for n in (1, 2, 1, 3)]
    with trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "max": 8, "batching_timeout": 5, "device": "cpu"}) as models:
        items = [{"data": x} for x in inputs]
        models(items)
        for x, item in zip(inputs, items):
            assert item["result"].shape == (x.shape[0], 5)
            np.testing.assert_allclose(item["result"], _reference(x), rtol=1e-5, atol=1e-5)


def test_concurrent_single_calls_are_batched_and_correct(net_path):
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(32)]
    expected = [_reference(x) for x in inputs]
    errors = []
    with trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "max": 4, "batching_timeout": 5, "instance_num": 2, "device": "cpu"}) as models:

        def call(i: int) -> None:
            item = {"data": inputs[i]}
            models(item)
            if not np.allclose(item["result"], expected[i], rtol=1e-5, atol=1e-5):
                errors.append(i)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sizes = models.pipeline.nodes[0].stats.snapshot()["batch_sizes"]
    assert not errors
    assert sum(int(k) * v for k, v in sizes.items()) == 32


def test_add_batch_dim_counts_one_and_strips_the_dimension(net_path):
    x = np.random.default_rng(3).standard_normal((3, 8, 8)).astype(np.float32)
    with trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "max": 2, "add_batch_dim": True, "device": "cpu"}) as models:
        item = {"data": x}
        models(item)
    assert item["result"].shape == (5,)
    np.testing.assert_allclose(item["result"], _reference(x[None])[0], rtol=1e-5, atol=1e-5)


def test_dict_inputs_and_tuple_outputs(tmp_path):
    path = tmp_path / "two.pt"
    torch.jit.save(torch.jit.script(TwoOutputs()), str(path))
    a, b = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    with trtserve.pipe({"backend": "TorchScriptTensor", "model": str(path), "max": 4, "device": "cpu"}) as models:
        item = {"data": {"a": a, "b": b}}
        models(item)
    assert set(item["result"]) == {"output0", "output1"}
    np.testing.assert_array_equal(item["result"]["output0"], a + b)
    np.testing.assert_array_equal(item["result"]["output1"], np.full(2, 6.0, np.float32))


def test_errors_are_typed(net_path, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ModelUnavailableError, match="cannot load"):
        trtserve.pipe({"backend": "TorchScriptTensor", "model": str(bad)})
    if not torch.cuda.is_available():
        with pytest.raises(ModelUnavailableError, match="no CUDA device"):
            trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "device": "cuda"})
    else:  # on CUDA it must be wrapped, and says so
        with pytest.raises(ConfigError, match=r"SyncTensor\[TorchScriptTensor\]"):
            trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "device": "cuda"})
    with pytest.raises(ConfigError, match="result_device"):
        trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "result_device": "device", "device": "cpu"})
    with trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "max": 4, "device": "cpu"}) as models:
        with pytest.raises(InvalidInputError):
            models({"data": "a string"})


def test_cuda_graph_with_device_cpu_is_a_config_error_naming_the_key(net_path):
    with pytest.raises(ConfigError, match="cuda_graph") as caught:
        trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "cuda_graph": True, "device": "cpu"})
    assert 'device = "auto"' in str(caught.value)


def test_cuda_graph_must_be_a_bool(net_path):
    with pytest.raises(ConfigError, match="cuda_graph"):
        trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "cuda_graph": "yes", "device": "cpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: auto picks it (tests/gpu covers graphs)")
def test_cuda_graph_with_device_auto_on_a_cpu_machine_is_ignored_and_the_model_serves(net_path):
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "cuda_graph": True, "max": 4}) as models:
        item = {"data": x}
        models(item)
    with torch.no_grad():
        expected = torch.jit.load(str(net_path))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(item["result"], expected, rtol=1e-5, atol=1e-6)


def _outputs(*names: str) -> list[dict]:
    return [{"name": name, "dtype": "float32", "shape": [-1]} for name in names]


def test_declared_counts_and_output_names_are_checked_against_the_saved_file(net_path, tmp_path):
    """A saved TorchScript file keeps how many tensors forward takes and returns (not their
    dtypes or shapes): those are checked at load."""
    two = tmp_path / "two.pt"
    torch.jit.save(torch.jit.trace(TwoOutputs(), (torch.rand(2, 3), torch.rand(2, 3))), str(two))
    base = {"backend": "TorchScriptTensor", "model": str(two), "device": "cpu", "max": 4}
    with pytest.raises(ConfigError) as caught:
        trtserve.pipe({**base, "output": _outputs("output0")}).close()
    assert caught.value.details["key"] == "output" and "declares 1 output(s)" in caught.value.message
    assert "has 2" in caught.value.message and str(two) in caught.value.message
    with pytest.raises(ConfigError) as caught:
        trtserve.pipe({**base, "input": [{"name": "a", "dtype": "float32", "shape": [-1, 3]}]}).close()
    assert caught.value.details["key"] == "input" and "declares 1 input(s)" in caught.value.message
    with pytest.raises(ConfigError, match="add source = 'output1' to rename it"):
        trtserve.pipe({**base, "output": _outputs("output0", "product")}).close()
    renamed = _outputs("output0", "product")
    renamed[1]["source"] = "output1"
    with trtserve.pipe({**base, "output": renamed}) as models:
        item = {"data": {"a": np.ones((1, 3), np.float32), "b": np.full((1, 3), 2, np.float32)}}
        models(item)
        assert set(item["result"]) == {"output0", "product"}
        np.testing.assert_allclose(item["result"]["product"], [6.0])
    # One input and one output: any names, any dtypes (the file does not say).
    trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "device": "cpu",
                   "input": [{"name": "image", "dtype": "float32", "shape": [-1, 3, 8, 8]}],
                   "output": _outputs("logits")}).close()


def test_model_calls_are_counted(net_path):
    with trtserve.pipe({"backend": "TorchScriptTensor", "model": str(net_path), "device": "cpu", "max": 8, "inline": False}) as models:
        models({"data": np.zeros((3, 3, 8, 8), np.float32)})
        stats = models.pipeline.nodes[0].stats.snapshot()
    assert stats["model_calls"] == 1 and stats["call_rows"] == {"3": 1}


def test_mixed_sample_shapes_run_as_one_call_per_shape(net_path):
    """The conv net takes any image size: a batch of two sizes is two calls, each exact."""
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((1, 3, size, size)).astype(np.float32) for size in (8, 12, 8, 12, 16)]
    config = {"backend": "TorchScriptTensor", "model": str(net_path), "device": "cpu", "max": 8}
    with trtserve.pipe(config) as models:
        items = [{"data": x} for x in inputs]
        models.pipeline.nodes[0].backend.forward(items)  # these five as one batch, as the scheduler would
        stats = models.pipeline.nodes[0].stats.snapshot()
    assert stats["model_calls"] == 3 and stats["call_rows"] == {"1": 1, "2": 2}
    for x, item in zip(inputs, items):
        np.testing.assert_allclose(item["result"], _reference(x), rtol=1e-5, atol=1e-5)


def test_a_batch_mixing_a_lone_tensor_and_a_dict_of_inputs_is_refused(net_path):
    config = {"backend": "TorchScriptTensor", "model": str(net_path), "device": "cpu", "max": 8}
    x = np.zeros((1, 3, 8, 8), np.float32)
    with trtserve.pipe(config) as models:
        backend = models.pipeline.nodes[0].backend
        for items in ([{"data": x}, {"data": {"input": x}}], [{"data": {"input": x}}, {"data": x}]):
            with pytest.raises(InvalidInputError, match="items batched together must have the same inputs"):
                backend.forward(items)  # as one batch, as the scheduler would
