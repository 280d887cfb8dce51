"""CUDA IPC end to end: ``trtserve serve`` in one process, this test (the client library) in
another, device memory shared through cudaIpcGetMemHandle / cudaIpcOpenMemHandle.

* ``SyncTensor[TorchScriptTensor]`` reads inputs from the client's device memory and writes
  outputs into it, with numpy results (host to device) and with DeviceArray results (device
  to device);
* ``SyncTensor[DeviceEcho]`` refuses numpy inputs, so an answer proves the input reached the
  backend as a DeviceArray (no host round trip); outputs of device results also go into
  system shared memory (device to host);
* memory owned by torch (a tensor from its caching allocator, not at the start of its
  allocation) works, and a 16 MiB output is complete the moment ``infer`` returns, read at
  once on another stream;
* every bad CUDA reference is a typed error: a device the server lacks, memory on another
  device (with two GPUs), a handle the driver refuses, a region past its allocation, raw
  bytes from device memory, a size that disagrees with dtype x shape.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from trtserve import cuda
from trtserve_client import Client
from trtserve_client.cuda_regions import DeviceView
from trtserve_client.errors import DeviceError, InvalidArgumentError, InvalidInputError

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(240)]
torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]

DEVICE_ECHO = '''
import trtserve
from trtserve import cuda
from trtserve.errors import InvalidInputError


class DeviceEcho(trtserve.Backend):
    """result = data, for DeviceArrays only: a numpy input is refused."""

    def forward(self, items):
        for item in items:
            if not isinstance(item["data"], cuda.DeviceArray):
                raise InvalidInputError(f"DeviceEcho takes DeviceArrays, got {type(item['data']).__name__}")
            item["result"] = item["data"]


trtserve.register("DeviceEcho", DeviceEcho)
'''


class Twice(torch.nn.Module):
    def forward(self, x):
        return x * 2 + 1


def _model(root: Path, name: str, config: str, files: dict[str, bytes | str] | None = None) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.toml").write_text(config)
    for path, content in (files or {}).items():
        target = root / name / path
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``trtserve serve`` (a second process) on a repository of three GPU models."""
    from trtserve_bench.serverproc import ServerProcess, trtserve_argv

    root = tmp_path_factory.mktemp("ipc") / "repository"
    scripted = tmp_path_factory.mktemp("ts") / "twice.pt"
    torch.jit.save(torch.jit.script(Twice()), str(scripted))
    node = 'backend = "SyncTensor[TorchScriptTensor]"\nmodel = "model.pt"\ninstance_num = 2\nmax = 8\nbatching_timeout = 1\n'
    _model(root, "twice", node, {"1/model.pt": scripted.read_bytes()})
    _model(root, "twice_dev", node + 'result_device = "device"\n', {"1/model.pt": scripted.read_bytes()})
    _model(root, "echo_dev", 'backend = "SyncTensor[DeviceEcho]"\nmax = 8\n', {"backend.py": DEVICE_ECHO})
    paths = [str(ROOT), str(ROOT / "clients"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    with ServerProcess(trtserve_argv(root, ["--log-level", "WARNING"]), startup_timeout=120, env=env) as proc:
        yield proc
        assert "Traceback" not in proc.log_text(), proc.log_text()[-4000:]


@pytest.fixture
def client(server):
    with Client(server.host, server.port) as c:
        yield c


X = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)


@pytest.mark.parametrize("model", ["twice", "twice_dev"])
def test_torchscript_reads_and_writes_the_clients_device_memory(client, model):
    inp = client.register_cuda_shm("in", 4096)
    out = client.register_cuda_shm("out", 4096)
    for i in range(4):  # batched with each other or not, each answer lands in its own slot
        x = X + i
        result = client.infer(model, {"input": inp.write(x, offset=256 * i)}, shm_outputs={"output": out.slot(256 * i, 256)})
        view = result["output"]
        assert isinstance(view, DeviceView) and view.ptr == out.ptr + 256 * i and view.shape == (3, 4)
        np.testing.assert_allclose(view.to_host(), x * 2 + 1, rtol=1e-6)
    # An inline answer from a device input works too (the result comes back in the frame).
    if model == "twice":
        np.testing.assert_allclose(client.infer(model, {"input": inp.write(X)})["output"], X * 2 + 1, rtol=1e-6)


def test_inputs_reach_the_backend_as_device_arrays(client):
    inp = client.register_cuda_shm("in", 4096)
    out = client.register_cuda_shm("out", 4096)
    host = client.register_system_shm("host", 4096)
    result = client.infer("echo_dev", {"input": inp.write(X)}, shm_outputs={"output": out})
    np.testing.assert_array_equal(result["output"].to_host(), X)
    result = client.infer("echo_dev", {"input": inp.write(X + 1)}, shm_outputs={"output": host})  # device to host
    assert isinstance(result["output"], np.ndarray)
    np.testing.assert_array_equal(result["output"], X + 1)
    with pytest.raises(InvalidInputError):
        client.infer("echo_dev", {"input": X})  # inline: a numpy array, which DeviceEcho refuses


def test_torch_memory_and_outputs_complete_when_infer_returns(client):
    n = 4 << 20  # 16 MiB of float32: a copy the client would catch unfinished
    source = torch.empty((1, n), device="cuda")
    target = torch.zeros((1, n), device="cuda")
    inp = client.register_cuda_shm("src", source.nbytes, memory=source)
    out = client.register_cuda_shm("dst", target.nbytes, memory=target)
    assert (inp.ptr, out.ptr) == (source.data_ptr(), target.data_ptr())
    side = torch.cuda.Stream()
    for i in range(5):
        source.fill_(float(i))
        torch.cuda.current_stream().synchronize()  # the client's part: inputs complete before the request
        view = client.infer("echo_dev", {"input": inp.tensor(source.shape, np.float32)}, shm_outputs={"output": out})["output"]
        assert torch.as_tensor(view, device="cuda").data_ptr() == target.data_ptr()
        with torch.cuda.stream(side):  # read at once, on another stream: the server already waited for its copy
            assert bool((target == float(i)).all())


def test_unregister_then_free(client):
    region = client.register_cuda_shm("in", 1 << 20)
    client.infer("echo_dev", {"input": region.write(X)}, shm_outputs={"output": region.slot(4096, 4096)})
    client.unregister_shm("in")  # returns once the server has closed its handle
    assert region.ptr == 0  # then the client's allocation was freed
    assert client.shm_status()["regions"] == []


def test_bad_cuda_references_are_typed(client):
    region = client.register_cuda_shm("good", 4096)
    fields = dict(region.registration(), name="bad")

    def refused(**changes) -> dict:
        with pytest.raises((InvalidArgumentError, InvalidInputError, DeviceError)) as excinfo:
            client.request("shm_register", **dict(fields, **changes))
        return excinfo.value.details

    assert refused(device=cuda.device_count())["reason"] == "wrong_device"
    assert refused(handle=bytes(range(64)))["reason"] == "bad_handle"
    assert refused(byte_size=1 << 30)["reason"] == "out_of_bounds"  # inside the limits, past the allocation
    with pytest.raises(InvalidInputError) as excinfo:
        client.infer("echo_dev", {"input": region.raw(16)})
    assert excinfo.value.details["reason"] == "wrong_kind"
    bad = region.tensor((3, 4), np.float32)
    bad["shm"]["byte_size"] = 40
    with pytest.raises(InvalidInputError) as excinfo:
        client.infer("echo_dev", {"input": bad})
    assert excinfo.value.details["reason"] == "size_mismatch"
    assert [r["name"] for r in client.shm_status()["regions"]] == ["good"]
    np.testing.assert_allclose(client.infer("twice", {"input": region.write(X)})["output"], X * 2 + 1, rtol=1e-6)


@pytest.mark.skipif(cuda.device_count() < 2, reason="needs two GPUs")
def test_memory_of_another_device_is_refused(client):
    region = client.register_cuda_shm("dev1", 4096, device=1)
    with pytest.raises(InvalidArgumentError) as excinfo:
        client.request("shm_register", **dict(region.registration(), name="claimed0", device=0))
    assert excinfo.value.details["reason"] == "wrong_device" and excinfo.value.details["memory_device"] == 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
