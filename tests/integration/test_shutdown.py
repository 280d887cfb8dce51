"""Graceful shutdown: stop accepting, answer everything in flight, close models, exit 0."""
from __future__ import annotations

import asyncio
import signal
import socket
import time

import pytest

from .conftest import HOST

pytestmark = pytest.mark.timeout(60)


def wait_refused(port: int, timeout: float = 10.0) -> None:
    """Wait until the listening socket is closed (connections are refused)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.01)
    raise AssertionError(f"port {port} still accepts connections")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_answers_everything_in_flight(process_factory, gates, sig):
    proc = process_factory("--log-level", "INFO")
    gate, n = gates["gate_wide"], 6  # 4 instances: 4 requests running and 2 queued
    with proc.connect() as conn:
        sent = {conn.request("infer", model="gate_wide", inputs={"x": b"req-%d" % i}): b"req-%d" % i for i in range(n)}
        gate.wait_started(4)
        assert conn.result("live") == {"live": True}  # all n were read before the signal
        proc.send_signal(sig)
        wait_refused(proc.port)
        # Sent after the signal: the server reads no new frame, so this is never answered.
        late = conn.request("infer", model="echo", inputs={"x": b"late"})
        gate.open()
        answers = conn.recv_many(n)
        assert {i: m["result"]["outputs"]["output"] for i, m in answers.items()} == sent
        conn.assert_closed()  # a clean EOF after the last answer
        assert late not in {m["id"] for m in conn.frames}
    assert proc.wait(30) == 0, proc.log()
    assert "stopped" in proc.log()


def test_second_signal_ends_the_grace_period(process_factory, gates):
    proc = process_factory("--grace-period", "60")
    gate = gates["gate"]
    with proc.connect() as conn:
        held = conn.request("infer", model="gate", inputs={"x": b"held"})
        gate.wait_started(1)
        proc.send_signal(signal.SIGTERM)
        wait_refused(proc.port)
        proc.send_signal(signal.SIGTERM)
        message = conn.recv()
        assert message["id"] == held and message["error"]["name"] == "SHUTTING_DOWN"
        conn.assert_closed()
    gate.open()  # the running batch finishes; then the model closes and the process exits
    assert proc.wait(30) == 0, proc.log()


def test_stop_after_grace_answers_shutting_down(server_factory, gates):
    handle = server_factory()
    gate = gates["gate_wide"]
    with handle.connect() as conn:
        ids = {conn.request("infer", model="gate_wide", inputs={"x": b"%d" % i}) for i in range(2)}
        gate.wait_started(2)
        stopping = asyncio.run_coroutine_threadsafe(handle.server.stop(grace_s=0.1), handle.loop)
        answers = conn.recv_many(2)
        assert set(answers) == ids
        assert {m["error"]["name"] for m in answers.values()} == {"SHUTTING_DOWN"}
        conn.assert_closed()
    gate.open()  # closing the models waits for the running batches
    stopping.result(30)
    assert handle.server.repository.loaded() == []


def test_idle_server_stops_at_once(server_factory):
    handle = server_factory()
    with handle.connect() as conn:
        assert conn.result("live") == {"live": True}
        start = time.monotonic()
        asyncio.run_coroutine_threadsafe(handle.server.stop(), handle.loop).result(30)
        assert time.monotonic() - start < 5
        conn.assert_closed()
    wait_refused(handle.port)
