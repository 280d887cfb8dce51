"""The Ray Serve path against a real local Ray cluster: replicas, kills, autoscaling.

The front door is the real server (in-process, on its own thread) over a RayRepository;
the clients are the real trtserve_client over TCP; replicas are real Serve replicas
running the model's trtserve pipeline in Ray worker processes.  Expected outputs come from
the same model run in-process with ``trtserve.pipe()``.
"""
from __future__ import annotations

import signal
import time
import urllib.request

import numpy as np
import pytest
from trtserve_client import Client
from trtserve_client.errors import InvalidArgumentError, InvalidInputError, ModelNotFoundError, ModelUnavailableError

import trtserve

from .conftest import ServerProcess
from .ray_support import (
    EXAMPLES,
    SLOW_BACKEND,
    LoadLoop,
    front_door as front_door,  # fixtures: `as` marks the re-export
    model_folder,
    ray,
    ray_cluster as ray_cluster,
    replica_actors,
    running_replicas,
    serve,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CLIENTS = 32
MLP_CONFIG = (EXAMPLES / "tensor_mlp" / "config.toml").read_text()


def mlp_repository(tmp_path, replicas: int = 2):
    root = tmp_path / "repo"
    model_folder(root, "tensor_mlp", MLP_CONFIG + f"\n[ray]\nnum_replicas = {replicas}\nnum_cpus = 1\n",
                 source=EXAMPLES / "tensor_mlp")
    return root


@pytest.fixture(scope="module")
def reference():
    """tensor_mlp in-process: what every answer through Ray must equal."""
    with trtserve.pipe(str(EXAMPLES / "tensor_mlp" / "config.toml")) as models:
        yield models


def mlp_check(reference):
    def check(data: np.ndarray, outputs: dict) -> None:
        item = {"data": data}
        reference(item)
        # Rows are independent; a different batch composition may round the last bit differently.
        np.testing.assert_allclose(outputs["y"], item["result"], rtol=1e-6, atol=1e-6)

    return check


def mlp_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((int(rng.integers(1, 4)), 16)).astype(np.float32)


# The Slow test model (ray_support.SLOW_BACKEND): result = data * 2 after 20 ms per batch.
SLOW_CONFIG = """backend = "Slow"
sleep_ms = 20
max = 8
[ray]
{ray}
"""


def slow_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((1, 4))


def doubled(data: np.ndarray, outputs: dict) -> None:
    np.testing.assert_array_equal(outputs["output"], data * 2)


def test_two_replicas_answer_32_clients_like_pipe(front_door, reference, tmp_path):
    door = front_door(mlp_repository(tmp_path, replicas=2), server_options={"metrics_port": 0})
    load = LoadLoop(lambda: Client(door.host, door.port), "tensor_mlp", CLIENTS, mlp_input, mlp_check(reference),
                    max_requests=40, max_seconds=120).start()
    load.finish()
    assert load.errors == []
    assert load.answered == CLIENTS * 40

    with Client(door.host, door.port) as client:
        assert client.ready("tensor_mlp")
        metadata = client.model_metadata("tensor_mlp")
        assert [t["name"] for t in metadata["inputs"]] == ["x"] and metadata["max_batch_size"] == 8
        assert metadata["deployment"]["settings"] == {"num_replicas": 2, "num_cpus": 1}

        def both_replicas_reported():  # replica statistics are polled once a second
            row = client.statistics("tensor_mlp")["models"][0]
            done = sum(r["success_count"] for r in row["replicas"]) == CLIENTS * 40
            return row if done and all(r["success_count"] for r in row["replicas"]) else None

        row = wait_for(both_replicas_reported, 30, "statistics from both replicas")
        assert len(row["replicas"]) == 2
        assert row["success_count"] == CLIENTS * 40
        assert len({r["address"] for r in row["replicas"]}) == 2
        assert all(r["address"].startswith("127.0.0.1:") for r in row["replicas"])  # loopback, as asked
        assert row["deployment"]["replica_states"] == {"RUNNING": 2}
        index = {r["name"]: r for r in client.repository_index()["models"]}
        assert index["tensor_mlp"]["state"] == "READY"
        assert index["tensor_mlp"]["deployment"]["running_replicas"] == 2
    # The front door's Prometheus metrics count what it answered, as any server's do.
    url = f"http://{door.host}:{door.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert f'trtserve_request_success_total{{model="tensor_mlp",version="1"}} {float(CLIENTS * 40)}' in text


def test_bad_input_and_regions_through_the_front_door_get_typed_errors(front_door, tmp_path):
    """The front door relays frames without checking inputs: the replica's server answers
    bad input with the error `trtserve serve` gives; regions stay in the front door."""
    door = front_door(mlp_repository(tmp_path, replicas=1))
    with Client(door.host, door.port) as client:
        with pytest.raises(InvalidInputError, match=r"must have shape \[-1, 16\]"):
            client.infer("tensor_mlp", np.ones((2, 15), np.float32))
        with pytest.raises(InvalidInputError, match="must be float32, got int64"):
            client.infer("tensor_mlp", np.ones((2, 16), np.int64))
        with pytest.raises(ModelNotFoundError):
            client.infer("no_such_model", np.ones((2, 16), np.float32))
        region = client.register_system_shm("in", 4096)
        region.ndarray((2, 16), np.float32)[:] = 1
        with pytest.raises(InvalidArgumentError, match="shared-memory"):
            client.infer("tensor_mlp", {"x": region.tensor((2, 16), np.float32)})
        with pytest.raises(InvalidArgumentError, match="shared-memory"):
            client.infer("tensor_mlp", np.ones((2, 16), np.float32), shm_outputs={"y": region})
        assert client.infer("tensor_mlp", np.ones((2, 16), np.float32))["y"].shape == (2, 4)
        row = client.statistics("tensor_mlp")["models"][0]
        assert row["success_count"] == 1 and row["failure_by_reason"] == {"INVALID_INPUT": 2}


def test_replica_killed_five_times_under_load(front_door, tmp_path):
    # Each call keeps its replica busy for 20 ms, so every kill lands on calls in flight.
    root = tmp_path / "repo"
    model_folder(root, "slow", SLOW_CONFIG.format(ray="num_replicas = 2\nnum_cpus = 1"), backend=SLOW_BACKEND)
    door = front_door(root)
    app = door.server.repository.app_prefix + "slow"
    with Client(door.host, door.port) as probe:
        load = LoadLoop(lambda: Client(door.host, door.port), "slow", CLIENTS, slow_input, doubled,
                        max_seconds=240).start()
        try:
            for _ in range(5):
                wait_for(lambda: len(replica_actors(app)) == 2 and running_replicas(probe, "slow") == 2,
                         120, "two running replicas")
                answered = load.answered
                wait_for(lambda answered=answered: load.answered > answered + 50, 30, "load flowing before the kill")
                ray.kill(replica_actors(app)[0], no_restart=True)
                time.sleep(0.5)  # under load while Serve notices the death and replaces it
            wait_for(lambda: running_replicas(probe, "slow") == 2, 120, "the replacement replica")
            answered = load.answered
            wait_for(lambda: load.answered > answered + 50, 30, "load flowing after the last kill")
        finally:
            load.stop()
        assert load.errors == [], f"{len(load.errors)} failed, first: {load.errors[:1]!r}"
        row = probe.statistics("slow")["models"][0]
        assert row["success_count"] == load.answered
        assert row["failure_count"] == 0
        # The kills hit requests in flight, which the front door sent again to the survivor.
        assert row["resent_requests"] >= 1


# Serve warns that look_back_period_s should exceed its deprecated metrics_interval_s (10 s);
# the test's metric push interval is 0.5 s (ray_support.SERVE_ENV), so 1 s looks back far enough.
@pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")
def test_autoscaling_from_one_to_two_replicas_and_back(front_door, tmp_path):
    root = tmp_path / "repo"
    autoscaling = """min_replicas = 1
max_replicas = 2
target_ongoing_requests = 1
upscale_delay_s = 0.5
downscale_delay_s = 2
look_back_period_s = 1
num_cpus = 1"""
    model_folder(root, "slow", SLOW_CONFIG.format(ray=autoscaling), backend=SLOW_BACKEND)
    door = front_door(root)

    with Client(door.host, door.port) as probe:
        assert running_replicas(probe, "slow") == 1
        load = LoadLoop(lambda: Client(door.host, door.port), "slow", 8, slow_input, doubled, max_seconds=120).start()
        try:
            wait_for(lambda: running_replicas(probe, "slow") == 2, 90, "the scale-up to 2 replicas")
        finally:
            load.stop()
        assert load.errors == []
        wait_for(lambda: running_replicas(probe, "slow") == 1, 90, "the scale-down to 1 replica when idle")
        assert probe.infer("slow", np.ones((1, 4)))["output"].tolist() == [[2.0, 2.0, 2.0, 2.0]]


def test_second_front_door_attaches_without_redeploying(front_door, reference, tmp_path):
    root = mlp_repository(tmp_path, replicas=1)
    first = front_door(root)
    prefix = first.server.repository.app_prefix
    app = prefix + "tensor_mlp"
    before = {a._actor_id.hex() for a in replica_actors(app)}
    second = front_door(root, app_prefix=prefix)
    assert {a._actor_id.hex() for a in replica_actors(app)} == before  # same replicas: attached
    data = np.ones((2, 16), np.float32)
    with Client(first.host, first.port) as a, Client(second.host, second.port) as b:
        np.testing.assert_array_equal(a.infer("tensor_mlp", data)["y"], b.infer("tensor_mlp", data)["y"])


def test_model_failing_in_its_replicas_is_unavailable_with_the_reason(front_door, tmp_path):
    root = tmp_path / "repo"
    # Valid for the front door; the warmup sample (wrong dtype for the model) runs only in replicas.
    model_folder(root, "bad_warmup", MLP_CONFIG + """
[ray]
num_cpus = 0.5
[[warmup]]
[warmup.inputs.x]
dtype = "int64"
shape = [1, 16]
""", source=EXAMPLES / "tensor_mlp")
    model_folder(root, "typo", 'backend = "Identity"\n[ray]\nnum_replica = 2\n')
    door = front_door(root)
    with Client(door.host, door.port) as client:
        index = {r["name"]: r for r in client.repository_index()["models"]}
        assert index["typo"]["state"] == "UNAVAILABLE"
        assert "ray.num_replica" in index["typo"]["reason"] and "num_replicas" in index["typo"]["reason"]
        assert index["bad_warmup"]["state"] == "UNAVAILABLE"
        assert "deployment failed" in index["bad_warmup"]["reason"]
        with pytest.raises(ModelUnavailableError):
            client.infer("bad_warmup", np.ones((1, 16), np.float32))
        assert client.ready("typo") is False


def test_unload_deletes_the_serve_application(front_door, tmp_path):
    door = front_door(mlp_repository(tmp_path, replicas=1), server_options={"model_control": "explicit",
                                                                          "load_models": ["*"]})
    app = door.server.repository.app_prefix + "tensor_mlp"
    assert app in serve.status().applications
    with Client(door.host, door.port) as client:
        client.unload("tensor_mlp")
        wait_for(lambda: app not in serve.status().applications, 60, "the application's deletion")
        assert client.ready("tensor_mlp") is False
        client.load("tensor_mlp")
        assert client.infer("tensor_mlp", np.ones((1, 16), np.float32))["y"].shape == (1, 4)


def test_one_command_starts_a_local_cluster_and_stops_it(reference, tmp_path, monkeypatch):
    """`trtserve serve --ray local` as an operator runs it: its own cluster, gone at exit."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = mlp_repository(tmp_path, replicas=1)
    door = ServerProcess(root, "--ray", "local", "--ray-set", "num_cpus=0.5", "--ray-app-prefix", "cli-",
                         "--log-level", "WARNING", log_path=tmp_path / "door.log")
    try:
        door.start(timeout=240)  # starting Ray and a replica takes seconds, more on a busy machine
        data = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
        with Client(door.host, door.port) as client:
            mlp_check(reference)(data, client.infer("tensor_mlp", data))
            row = next(r for r in client.repository_index()["models"] if r["name"] == "tensor_mlp")
            assert row["deployment"]["app"] == "cli-tensor_mlp" and row["deployment"]["running_replicas"] == 1
        door.send_signal(signal.SIGTERM)
        assert door.wait(120) == 0, door.log()
    finally:
        door.close()


def test_model_that_cannot_be_placed_is_unavailable_after_the_deploy_timeout(front_door, tmp_path):
    root = tmp_path / "repo"
    model_folder(root, "huge", 'backend = "Identity"\n[ray]\nnum_cpus = 1000\n')  # more than the cluster has
    model_folder(root, "small", 'backend = "Identity"\n[ray]\nnum_cpus = 0.5\n')
    door = front_door(root, deploy_timeout_s=5)
    app = door.server.repository.app_prefix + "huge"
    with Client(door.host, door.port) as client:
        index = {r["name"]: r for r in client.repository_index()["models"]}
        assert index["huge"]["state"] == "UNAVAILABLE"
        assert "not running after 5 s" in index["huge"]["reason"]
        assert "asks for 1000 CPU" in index["huge"]["reason"]
        assert index["small"]["state"] == "READY"  # the others serve
        assert client.infer("small", np.ones((1, 2), np.float32))["output"].tolist() == [[1.0, 1.0]]
    def deleted_or_deleting():
        status = serve.status().applications.get(app)
        return status is None or str(getattr(status.status, "value", status.status)) == "DELETING"

    wait_for(deleted_or_deleting, 30, "the unplaceable application's deletion")
