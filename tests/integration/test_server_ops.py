"""Every operation against a real server: in-process, and a smoke subset through the console script."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from trtserve_client.wire import DEFAULT_MAX_FRAME, OPERATIONS

import trtserve

from .conftest import array, tensor, trtserve_command, write_model

pytestmark = pytest.mark.timeout(60)

ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)


# --------------------------------------------------------------------------- health and metadata


def test_live_and_ready(server):
    with server.connect() as conn:
        assert conn.result("live") == {"live": True}
        assert conn.result("ready") == {"ready": True}
        assert conn.result("ready", model="identity") == {"ready": True}
        assert conn.result("ready", model="identity", version=2) == {"ready": True}
        assert conn.result("ready", model="broken") == {"ready": False}


def test_server_metadata(server):
    with server.connect() as conn:
        meta = conn.result("server_metadata")
    assert meta == {
        "name": "trtserve",
        "version": trtserve.__version__,
        "protocol": 2,
        "operations": list(OPERATIONS),
        "max_frame": DEFAULT_MAX_FRAME,
    }


def test_model_metadata(server):
    with server.connect() as conn:
        meta = conn.result("model_metadata", model="identity")
        assert conn.result("model_metadata", model="identity", version=2) == meta
    assert meta["name"] == "identity"
    assert meta["versions"] == [2]
    assert meta["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "output", "dtype": "float32", "shape": [-1, 4]}]
    assert meta["max_batch_size"] == 8
    assert [n["backend"] for n in meta["nodes"]] == ["Identity"]


def test_model_config(server, repository):
    with server.connect() as conn:
        config = conn.result("model_config", model="identity")
    assert config["name"] == "identity"
    assert config["source"] == str(repository / "identity" / "config.toml")
    assert config["config"]["backend"] == "Identity"
    assert config["config"]["input"][0] == {"name": "input", "dtype": "float32", "shape": [-1, 4]}


def test_repository_index(server):
    with server.connect() as conn:
        rows = {row["name"]: row for row in conn.result("repository_index")["models"]}
    assert set(rows) == {"identity", "echo", "pair", "blob", "gate", "gate_wide", "flaky", "broken"}
    identity = rows["identity"]
    assert (identity["version"], identity["versions_on_disk"], identity["state"], identity["reason"]) == (2, [1, 2], "READY", None)
    assert rows["broken"]["state"] == "UNAVAILABLE"
    assert "NoSuchBackend" in rows["broken"]["reason"]


def test_statistics(server):
    with server.connect() as conn:
        for _ in range(3):
            conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})
        one = conn.result("statistics", model="identity")["models"]
        every = {m["name"]: m for m in conn.result("statistics")["models"]}
    assert len(one) == 1 and one[0]["name"] == "identity" and one[0]["version"] == 2
    assert one[0]["success_count"] == 3 and one[0]["failure_count"] == 0
    assert sum(one[0]["batch_sizes"].values()) == 3
    assert "broken" not in every and every["identity"]["success_count"] == 3
    assert every["echo"]["success_count"] == 0


# --------------------------------------------------------------------------- infer


def test_infer_declared_input(server):
    with server.connect() as conn:
        result = conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})
    assert result["model"] == "identity" and result["version"] == 2
    np.testing.assert_array_equal(array(result["outputs"]["output"]), ROWS)


@pytest.mark.parametrize("value", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([1.5, -2.0]), np.zeros((0, 3), np.int16)])
def test_infer_undeclared_model_takes_any_single_tensor(server, value):
    with server.connect() as conn:
        result = conn.result("infer", model="echo", inputs={"anything": tensor(value)})
    out = array(result["outputs"]["output"])
    assert out.dtype == value.dtype
    np.testing.assert_array_equal(out, value)


def test_infer_bytes(server):
    with server.connect() as conn:
        assert conn.result("infer", model="blob", inputs={"blob": b"\x00jpeg\xff"})["outputs"] == {"echoed": b"\x00jpeg\xff"}
        assert conn.result("infer", model="echo", inputs={"x": b"raw"})["outputs"] == {"output": b"raw"}


def test_infer_several_inputs_and_output_filter(server):
    a, b = np.array([1.0, 2.0], np.float32), np.array([7, 8, 9], np.int64)
    with server.connect() as conn:
        both = conn.result("infer", model="pair", inputs={"a": tensor(a), "b": tensor(b)})["outputs"]
        only_b = conn.result("infer", model="pair", inputs={"a": tensor(a), "b": tensor(b)}, outputs=["b"])["outputs"]
    np.testing.assert_array_equal(array(both["a"]), a)
    np.testing.assert_array_equal(array(both["b"]), b)
    assert list(only_b) == ["b"]
    np.testing.assert_array_equal(array(only_b["b"]), b)


def test_infer_with_timeout_in_time(server):
    with server.connect() as conn:
        result = conn.result("infer", model="identity", inputs={"input": tensor(ROWS)}, timeout_ms=10_000)
    np.testing.assert_array_equal(array(result["outputs"]["output"]), ROWS)


def test_pipelined_requests_on_one_connection(server):
    """Many requests in flight on one connection, answered by id, beyond the in-flight limit."""
    count = 600
    with server.connect() as conn:
        sent = {}
        for i in range(count):
            data = np.full((1, 4), i, np.float32)
            sent[conn.request("infer", model="identity", inputs={"input": tensor(data)})] = data
        answers = conn.recv_many(count)
    assert set(answers) == set(sent)
    for req_id, message in answers.items():
        np.testing.assert_array_equal(array(message["result"]["outputs"]["output"]), sent[req_id])


def test_concurrent_connections(server):
    failures = []

    def client(k: int) -> None:
        try:
            with server.connect() as conn:
                for i in range(50):
                    data = np.full((1, 4), k * 1000 + i, np.float32)
                    out = conn.result("infer", model="identity", inputs={"input": tensor(data)})["outputs"]["output"]
                    np.testing.assert_array_equal(array(out), data)
        except BaseException as exc:  # reported below, on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures


def test_half_closed_client_gets_its_answers(server):
    """A client that shuts down its sending side still receives every answer, then EOF."""
    with server.connect() as conn:
        ids = [conn.request("infer", model="identity", inputs={"input": tensor(ROWS)}) for _ in range(5)]
        conn.sock.shutdown(socket.SHUT_WR)
        answers = conn.recv_many(5)
        conn.assert_closed()
    assert sorted(answers) == ids and all("result" in m for m in answers.values())


# --------------------------------------------------------------------------- model control


def test_unload_then_load(server):
    with server.connect() as conn:
        assert conn.result("unload", model="echo") == {"name": "echo", "state": "UNLOADED"}
        assert conn.result("ready", model="echo") == {"ready": False}
        assert conn.error("infer", model="echo", inputs={"x": b"1"})["name"] == "MODEL_UNAVAILABLE"
        rows = {r["name"]: r for r in conn.result("repository_index")["models"]}
        assert rows["echo"]["state"] == "UNLOADED"
        assert conn.result("load", model="echo") == {"name": "echo", "version": 1, "state": "READY"}
        assert conn.result("infer", model="echo", inputs={"x": b"1"})["outputs"] == {"output": b"1"}


def test_load_a_model_added_after_start(server, repository):
    write_model(repository, "late", 'backend = "Identity"\n', versions=(3,))
    with server.connect() as conn:
        assert conn.result("load", model="late") == {"name": "late", "version": 3, "state": "READY"}
        assert conn.result("infer", model="late", inputs={"x": b"hi"}) == {"model": "late", "version": 3, "outputs": {"output": b"hi"}}


def test_load_failure_is_reported_and_recorded(server):
    with server.connect() as conn:
        error = conn.error("load", model="broken")
        assert error["name"] == "CONFIG_ERROR" and "NoSuchBackend" in error["message"]
        rows = {r["name"]: r for r in conn.result("repository_index")["models"]}
        assert rows["broken"]["state"] == "UNAVAILABLE"
        assert conn.result("ready", model="identity") == {"ready": True}


def test_poll_mode_follows_the_repository(server_factory, repository):
    handle = server_factory(model_control="poll", poll_interval_s=0.05)
    with handle.connect() as conn:
        write_model(repository, "polled", 'backend = "Identity"\n')
        wait_until(lambda: conn.result("repository_index")["models"], lambda rows: any(r["name"] == "polled" and r["state"] == "READY" for r in rows))
        assert conn.result("infer", model="polled", inputs={"x": b"p"})["outputs"] == {"output": b"p"}
        shutil.rmtree(repository / "polled")
        wait_until(lambda: conn.result("repository_index")["models"], lambda rows: all(r["name"] != "polled" for r in rows))
        assert conn.error("infer", model="polled", inputs={"x": b"p"})["name"] == "MODEL_NOT_FOUND"


def wait_until(read, check, timeout: float = 10.0):
    give_up = time.monotonic() + timeout
    while not check(value := read()):
        assert time.monotonic() < give_up, f"never satisfied: {value}"
        time.sleep(0.02)
    return value


# --------------------------------------------------------------------------- the console script


def test_console_script_smoke(server_process):
    with server_process.connect() as conn:
        assert conn.result("live") == {"live": True}
        assert conn.result("ready") == {"ready": True}
        assert conn.result("server_metadata")["operations"] == list(OPERATIONS)
        assert conn.result("model_metadata", model="identity")["max_batch_size"] == 8
        assert conn.result("model_config", model="echo")["config"] == {"backend": "Identity"}
        assert {r["name"] for r in conn.result("repository_index")["models"]} >= {"identity", "broken"}
        out = conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})["outputs"]["output"]
        np.testing.assert_array_equal(array(out), ROWS)
        assert conn.result("statistics", model="identity")["models"][0]["success_count"] == 1
        assert conn.result("unload", model="echo")["state"] == "UNLOADED"
        assert conn.result("load", model="echo")["state"] == "READY"


def test_python_dash_m(process_factory):
    proc = process_factory("--max-frame", "4096", command=[sys.executable, "-m", "trtserve"])
    with proc.connect() as conn:
        assert conn.result("server_metadata")["max_frame"] == 4096
        out = conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})["outputs"]["output"]
        np.testing.assert_array_equal(array(out), ROWS)


def test_console_script_refuses_a_missing_repository(tmp_path):
    done = subprocess.run(trtserve_command() + ["serve", "--repository", str(tmp_path / "nope"), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "is not a directory" in done.stderr and done.stdout == ""


def test_console_script_reports_a_busy_port(repository):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(trtserve_command() + ["serve", "--repository", str(repository), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and done.stdout == ""


def test_a_sticky_cuda_error_makes_the_server_not_live_nor_ready(server, monkeypatch):
    """After a sticky CUDA error the process's GPU is unusable until a restart: live and
    ready turn false (with the reason) so an orchestrator restarts it; CPU models still serve."""
    from trtserve.cuda import errors as cuda_errors

    error = cuda_errors.CudaError("cudaEventSynchronize: CUDA call failed with cudaErrorIllegalAddress",
                                  api="runtime", error="cudaErrorIllegalAddress", code=700, sticky=True)
    with server.connect() as conn:
        assert conn.result("live") == {"live": True} and conn.result("ready") == {"ready": True}
        monkeypatch.setattr(cuda_errors, "_poisoned", None)  # undone after the test: never poisoned
        cuda_errors.poison(error)
        try:
            live = conn.result("live")
            assert live["live"] is False and "cudaErrorIllegalAddress" in live["reason"]
            assert conn.result("ready") == {"ready": False}
            assert conn.result("infer", model="echo", inputs={"x": b"cpu"})["outputs"] == {"output": b"cpu"}
        finally:
            monkeypatch.setattr(cuda_errors, "_poisoned", None)  # the process forgets (a restart, here)
        assert conn.result("live") == {"live": True} and conn.result("ready") == {"ready": True}
