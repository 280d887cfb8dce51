"""/healthz and /readyz over real HTTP, as Kubernetes probes see them (deploy/kubernetes).

A probe succeeds on a status from 200 to 399 and fails otherwise (or on no answer).
"""
from __future__ import annotations

import os
import signal
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from trtserve.server.health import HEALTHZ, READYZ

from .conftest import GateControl
from .ops_support import wait_for

pytestmark = pytest.mark.timeout(120)


def get(host: str, port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_live_and_ready_while_serving(server_factory):
    handle = server_factory(metrics_port=0)
    host, port = handle.host, handle.server.metrics_port
    assert get(host, port, HEALTHZ) == (200, "ok\n")
    assert get(host, port, READYZ) == (200, "ready\n")
    status, body = get(host, port, "/metrics")  # the exporter is still there, at any other path
    assert status == 200 and "trtserve_requests_in_flight" in body and "trtserve_ready 1.0" in body


def test_not_ready_while_draining_but_still_live(server_factory, repository):
    handle = server_factory(metrics_port=0)
    host, port = handle.host, handle.server.metrics_port
    gate = GateControl(repository / "_gates" / "gate_wide")
    with handle.connect() as conn:
        conn.request("infer", model="gate_wide", inputs={"blob": b"x"})  # held in flight by the gate
        gate.wait_started(1)
        stopping = threading.Thread(target=handle.stop, kwargs={"grace_s": 30.0})
        stopping.start()
        try:
            wait_for(lambda: get(host, port, READYZ)[0] == 503, 10, "readiness to fail during the drain")
            assert get(host, port, READYZ)[1].startswith("not ready")
            assert get(host, port, HEALTHZ) == (200, "ok\n")  # draining is no reason to restart
        finally:
            gate.open()
        assert "result" in conn.recv()  # the request in flight finished during the drain
        stopping.join(30)
    assert not stopping.is_alive()


def test_health_of_a_trtserve_process_on_sigterm(process_factory, repository):
    """The probes against the real command, as in deploy/kubernetes/deployment.yaml."""
    proc = process_factory("--metrics-port", "0", "--log-level", "WARNING")
    # The metrics port is not printed; find it from the process's listening sockets.
    port = _metrics_port(proc.proc.pid, exclude=proc.port)
    assert get(proc.host, port, READYZ)[0] == 200 and get(proc.host, port, HEALTHZ)[0] == 200
    with proc.connect() as conn:
        result = conn.result("infer", model="echo", inputs={"input": _tensor()})
        assert "output" in result["outputs"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def _tensor() -> dict:
    from trtserve_client.wire import encode_tensor

    return encode_tensor(np.ones((1, 2), np.float32))


def _metrics_port(pid: int, exclude: int) -> int:
    """The other TCP port the process listens on (from /proc: no extra tools needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].split(":")[1], 16))
    ports.discard(exclude)
    assert len(ports) == 1, ports
    return ports.pop()

