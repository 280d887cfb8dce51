"""Hung and hostile model code against a ``trtserve serve`` subprocess: a hung init, model
code that raises SystemExit, a backend.py that registers a built-in's name.  Each leaves
the server serving the other models; a hung load delays neither other loads nor a stop."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import IDENTITY_CONFIG, GateControl, array, build_test_repository, tensor, write_model
from .hostile_support import early_server
from .ops_support import assert_correct_infer, log_problems, server_process, wait_for

pytestmark = pytest.mark.timeout(120)

SLEEPY = """
import time, trtserve

class Sleepy(trtserve.Backend):
    def init(self, context):
        super().init(context)
        time.sleep(60)  # a hung init: a lock never released, a device that never answers

trtserve.register("Sleepy", Sleepy)
"""
LEAVES = "import sys\nsys.exit(3)\n"
EXITS_IN_FORWARD = """
import sys, trtserve

class Leaves(trtserve.Backend):
    def forward(self, items):
        sys.exit(4)

trtserve.register("Leaves", Leaves)
"""
HIJACK = """
import trtserve

class Impostor(trtserve.Backend):
    def forward(self, items):
        for item in items:
            item["result"] = item["data"] * 0 - 1

trtserve.register("Identity", Impostor)
"""


def model_with_code(root: Path, name: str, config: str, code: str) -> None:
    folder = write_model(root, name, config)
    (folder / "backend.py").write_text(code)


@pytest.fixture
def repository(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    write_model(root, "identity", IDENTITY_CONFIG)
    model_with_code(root, "sleepy", 'backend = "Sleepy"\nload_timeout = 2\n', SLEEPY)
    model_with_code(root, "sleepy_long", 'backend = "Sleepy"\nload_timeout = 60\n', SLEEPY)
    model_with_code(root, "leaver", 'backend = "Identity"\n', LEAVES)
    model_with_code(root, "hijack", 'backend = "Identity"\n', HIJACK)
    model_with_code(root, "exits_threaded", 'backend = "Leaves"\n', EXITS_IN_FORWARD)
    model_with_code(root, "exits_inline", 'backend = "Leaves"\ninline = true\n', EXITS_IN_FORWARD)
    return root


def states(conn) -> dict[str, tuple[str, str | None]]:
    return {row["name"]: (row["state"], row["reason"]) for row in conn.result("repository_index")["models"]}


def test_a_hung_init_neither_delays_serving_nor_stopping(repository, tmp_path):
    """A model whose init sleeps 60 s: the server binds at once, serves the other models,
    declares the hung one UNAVAILABLE after its load_timeout, and stops at once."""
    args = ("--model-control", "explicit", "--load-model", "identity", "--load-model", "sleepy", "--log-level", "INFO")
    with early_server(repository, tmp_path / "server.log", *args) as server:
        accepting = server.wait_accepting()
        assert accepting < 10  # interpreter start-up, then bind before any model loads
        with server.connect() as conn:
            assert conn.result("live") == {"live": True}
            assert conn.result("ready") == {"ready": False}  # start-up models still loading
            wait_for(lambda: conn.result("ready", model="identity") == {"ready": True}, 10, "identity READY")
            assert_correct_infer(conn)  # identity serves while sleepy hangs
            assert states(conn)["sleepy"][0] == "LOADING"
            assert server.listening_line(15).startswith("trtserve listening on")
            state, reason = states(conn)["sleepy"]
            assert state == "UNAVAILABLE" and "did not finish loading within load_timeout = 2 s" in reason
            assert conn.result("ready") == {"ready": True}
            assert conn.error("load", model="sleepy")["name"] == "MODEL_UNAVAILABLE"  # its init still runs
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        stopped = time.monotonic() - started
        assert stopped < 3, "a hung init held up the stop"
        print(f"hung init: accepting {accepting:.2f} s after exec, load_timeout 2 s, SIGTERM to exit {stopped:.2f} s")
    assert not log_problems(server.log())


def test_hung_loads_starve_no_other_load(repository, tmp_path):
    """Two loads that hang delay no other `load`: each load has a thread of its own."""
    args = ("--model-control", "explicit", "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc, proc.connect() as conn:
        hung = [conn.request("load", model="sleepy_long"), conn.request("load", model="sleepy")]
        started = time.monotonic()
        loaded = conn.request("load", model="identity")
        answers = {}
        while loaded not in answers:
            message = conn.recv()
            answers[message["id"]] = message
        assert answers[loaded]["result"]["state"] == "READY"
        assert time.monotonic() - started < 2
        assert_correct_infer(conn)
        assert hung[0] not in answers  # still loading (60 s)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0 and time.monotonic() - started < 3  # not held up by the hung loads


def test_a_signal_while_models_load_stops_the_server(repository, tmp_path):
    args = ("--model-control", "explicit", "--load-model", "sleepy_long", "--log-level", "INFO")
    with early_server(repository, tmp_path / "server.log", *args) as server:
        server.wait_accepting()
        with server.connect() as conn:
            assert conn.result("live") == {"live": True}
        started = time.monotonic()
        server.signal(signal.SIGINT)
        assert server.proc.wait(10) == 0
        assert time.monotonic() - started < 3


def test_a_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM waits for the request in flight (--grace-period 60); the second
    answers it SHUTTING_DOWN and exits without waiting for its model, whose forward hangs."""
    repo = build_test_repository(tmp_path / "gated")
    gate = GateControl(repo / "_gates" / "gate")
    try:
        with server_process(repo, tmp_path / "server.log", "--grace-period", "60") as proc, proc.connect() as conn:
            held = conn.request("infer", model="gate", inputs={"x": b"held"})
            gate.wait_started(1)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert proc.proc.poll() is None  # waiting for the request in flight
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            message = conn.recv()
            assert message["id"] == held and message["error"]["name"] == "SHUTTING_DOWN"
            conn.assert_closed()
            assert proc.wait(10) == 0
            assert time.monotonic() - started < 3  # the gate stays shut: its forward still runs
    finally:
        gate.open()


def test_system_exit_from_a_backend_py_is_only_that_models_failure(repository, tmp_path):
    """A backend.py that raises SystemExit at import, at start or at run time: that model is
    UNAVAILABLE with the reason, never LOADING for ever, and the server goes on."""
    args = ("--model-control", "explicit", "--load-model", "identity", "--load-model", "leaver", "--log-level", "INFO")
    with server_process(repository, tmp_path / "server.log", *args) as proc, proc.connect() as conn:
        state, reason = states(conn)["leaver"]
        assert state == "UNAVAILABLE" and "SystemExit: 3" in reason
        assert_correct_infer(conn)
        error = conn.error("load", model="leaver")
        assert error["name"] == "CONFIG_ERROR" and "SystemExit: 3" in error["message"]
        assert states(conn)["leaver"][0] == "UNAVAILABLE"  # not LOADING
        assert proc.proc.poll() is None
    assert "model leaver: load failed" in proc.log() and "SystemExit: 3" in proc.log()


def test_a_backend_py_cannot_hijack_a_built_in(repository, tmp_path):
    """A backend.py registering "Identity" fails its own load; a reload of the identity model
    after it still runs the built-in."""
    args = ("--model-control", "explicit", "--load-model", "identity", "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc, proc.connect() as conn:
        error = conn.error("load", model="hijack")
        assert error["name"] == "CONFIG_ERROR" and "registers 'Identity', the name of a built-in" in error["message"]
        assert conn.result("load", model="identity")["state"] == "READY"  # a reload after the attempt
        data = np.arange(8, dtype=np.float32).reshape(2, 4)
        result = conn.result("infer", model="identity", inputs={"input": tensor(data)})
        np.testing.assert_array_equal(array(result["outputs"]["output"]), data)


@pytest.mark.parametrize("model", ["exits_threaded", "exits_inline"])
def test_system_exit_from_forward_fails_only_its_batch(repository, tmp_path, model):
    """A forward that raises SystemExit, on an instance thread or inline on the event loop:
    each request gets BACKEND_ERROR naming it, the model goes on answering, the server too."""
    args = ("--model-control", "explicit", "--load-model", "identity", "--load-model", model, "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc, proc.connect() as conn:
        for _ in range(3):  # the instance survives: no request waits for a dead thread
            error = conn.error("infer", model=model, inputs={"x": b"1"}, timeout_ms=5000)
            assert error["name"] == "BACKEND_ERROR" and "SystemExit: 4" in error["message"], error
        assert_correct_infer(conn)
        assert proc.proc.poll() is None
