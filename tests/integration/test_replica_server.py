"""A Ray Serve replica's data plane without Ray: trtserve's server for one model of a repository.

``ReplicaServer`` is what each replica runs (scaleout/replica_server.py); here it runs in
this process on its own thread, and the real client talks to it over TCP.  It imports no
Ray, so these tests run where Ray is not installed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from trtserve_client import Client
from trtserve_client.errors import PermissionDeniedError

import trtserve
from trtserve.errors import ModelUnavailableError
from trtserve.scaleout.replica_server import ReplicaServer

EXAMPLES = Path(__file__).resolve().parents[2] / "model_repository"
HOST = "127.0.0.1"


@pytest.fixture
def repository(tmp_path):
    root = tmp_path / "repo"
    for name in ("tensor_mlp", "identity"):
        shutil.copytree(EXAMPLES / name, root / name)
    return root


def test_serves_its_one_model_like_pipe_and_refuses_model_control(repository):
    server = ReplicaServer(str(repository), "tensor_mlp", {}, HOST, grace_s=5).start()
    try:
        host, port = server.address.rsplit(":", 1)
        assert host == HOST
        data = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
        with Client(host, int(port)) as client, trtserve.pipe(str(repository / "tensor_mlp" / "config.toml")) as mlp:
            item = {"data": data}
            mlp(item)
            np.testing.assert_allclose(client.infer("tensor_mlp", data)["y"], item["result"], rtol=1e-6, atol=1e-6)
            # The repository holds another model; the replica sees only its own.
            assert [row["name"] for row in client.repository_index()["models"]] == ["tensor_mlp"]
            with pytest.raises(PermissionDeniedError):
                client.load("identity")
            assert server.in_flight == 0  # the answer was sent: nothing in flight for the autoscaler
    finally:
        server.stop(grace_s=5)
    assert not server.alive()


def test_a_model_that_fails_to_load_fails_the_replica_with_the_reason(repository):
    (repository / "tensor_mlp" / "config.toml").write_text('backend = "NoSuchBackend"\n')
    with pytest.raises(ModelUnavailableError) as info:
        ReplicaServer(str(repository), "tensor_mlp", {}, HOST, grace_s=5).start()
    assert "failed to load in its replica" in info.value.message and "NoSuchBackend" in info.value.message
