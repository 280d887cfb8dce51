"""The Prometheus endpoint, scraped over HTTP with urllib from a real server on 127.0.0.1."""
from __future__ import annotations

import socket
import struct
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import tensor
from .test_ops_access import certificate as certificate  # the self-signed certificate fixture

pytestmark = pytest.mark.timeout(60)

ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)
TOKEN = "metrics-test-token-0123456789"


def scrape(handle) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{handle.host}:{handle.server.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_disconnected(handle, timeout: float = 10.0) -> None:
    tracker = handle.server.tracker
    give_up = time.monotonic() + timeout
    while handle.call(lambda: len(tracker.connections)):
        assert time.monotonic() < give_up, "the server kept connections open"
        time.sleep(0.01)


def identity(**labels):
    return dict(model="identity", version="2", **labels)


@pytest.fixture
def metered(server_factory):
    return server_factory(metrics_port=0, model_control="explicit", load_models=["*"])


def test_metrics_are_off_by_default(server_factory):
    handle = server_factory()
    assert handle.server.metrics is None and handle.server.metrics_port is None


def test_every_family_is_exposed_with_its_labels(metered):
    samples = scrape(metered)
    names = {name for name, _ in samples}
    for family in ("trtserve_request_queue_seconds", "trtserve_request_compute_seconds", "trtserve_batch_size"):
        assert f"{family}_count" in names and f"{family}_bucket" in names
    for gauge in ("trtserve_queue_items", "trtserve_instances_busy", "trtserve_instances", "trtserve_model_state",
                  "trtserve_connections", "trtserve_requests_in_flight", "trtserve_ready", "trtserve_refusals_total",
                  "trtserve_reading_paused_total"):
        assert gauge in names, gauge
    assert value(samples, "trtserve_instances", model="gate_wide", version="1", node="gate_wide") == 4
    assert value(samples, "trtserve_model_state", model="identity", state="READY") == 1
    assert value(samples, "trtserve_model_state", model="broken", state="UNAVAILABLE") == 1
    assert value(samples, "trtserve_model_state", model="broken", state="READY") == 0
    assert value(samples, "trtserve_ready") == 1
    assert all(value(samples, "trtserve_refusals_total", type=kind) == 0 for kind in
               ("auth", "connection_limit", "frame_too_large", "protocol_error", "permission_denied"))


def test_request_counters_histograms_and_batches_move(metered):
    with metered.connect() as conn:
        for _ in range(3):
            conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})
        samples = scrape(metered)
        assert value(samples, "trtserve_connections") == 1
    assert value(samples, "trtserve_request_success_total", **identity()) == 3
    for family in ("trtserve_request_duration_seconds", "trtserve_request_queue_seconds", "trtserve_request_compute_seconds"):
        assert value(samples, f"{family}_count", **identity()) == 3
        assert value(samples, f"{family}_bucket", **identity(le="10.0")) == 3
    # Identity computes nothing, yet its forward and a round trip take some time: sums move.
    assert value(samples, "trtserve_request_duration_seconds_sum", **identity()) > 0
    assert value(samples, "trtserve_request_compute_seconds_sum", **identity()) > 0
    assert value(samples, "trtserve_batch_size_count", **identity(node="identity")) == 3
    assert value(samples, "trtserve_batch_size_sum", **identity(node="identity")) == 6  # 3 batches of 2 rows
    assert value(samples, "trtserve_batch_size_bucket", **identity(node="identity", le="2.0")) == 3
    assert value(samples, "trtserve_batch_size_bucket", **identity(node="identity", le="1.0")) == 0


def test_failures_are_counted_by_reason(metered, gates):
    with metered.connect() as conn:
        assert conn.error("infer", model="identity", inputs={"input": tensor(np.zeros((1, 3), np.float32))})["name"] == "INVALID_INPUT"
        assert conn.error("infer", model="flaky", inputs={"x": b"raise"})["name"] == "BACKEND_ERROR"
        assert conn.error("infer", model="flaky", inputs={"x": b"skip"})["name"] == "NO_RESULT"
        assert conn.error("infer", model="no_such_model", inputs={"x": b"?"})["name"] == "MODEL_NOT_FOUND"
        assert conn.error("infer", model="broken", inputs={"x": b"?"})["name"] == "MODEL_UNAVAILABLE"
        assert conn.error("infer", model="identity", version=7, inputs={"input": tensor(ROWS)})["name"] == "VERSION_NOT_FOUND"
        running = conn.request("infer", model="gate", inputs={"x": b"run"})
        gates["gate"].wait_started(1)
        queued = conn.request("infer", model="gate", inputs={"x": b"wait"})
        assert conn.error("infer", model="gate", inputs={"x": b"full"})["name"] == "QUEUE_FULL"  # max_queue_size 1
        busy = scrape(metered)
        held = [conn.request("infer", model="gate_wide", inputs={"x": b"%d" % i}) for i in range(4)]
        gates["gate_wide"].wait_started(4)  # every instance busy: the next one waits in the queue
        late = conn.request("infer", model="gate_wide", inputs={"x": b"late"}, timeout_ms=50)
        answer = conn.recv()
        assert answer["id"] == late and answer["error"]["name"] == "DEADLINE_EXCEEDED"
        gates["gate"].open()
        gates["gate_wide"].open()
        assert sorted(conn.recv_many(6)) == sorted([running, queued, *held])
        samples = scrape(metered)
    assert value(busy, "trtserve_instances_busy", model="gate", version="1", node="gate") == 1
    assert value(busy, "trtserve_queue_items", model="gate", version="1", node="gate") == 1
    assert value(busy, "trtserve_requests_in_flight") == 2
    flaky = dict(model="flaky", version="1")
    expected = {
        ("identity", "2", "INVALID_INPUT"): 1,
        ("flaky", "1", "BACKEND_ERROR"): 1,
        ("flaky", "1", "NO_RESULT"): 1,
        ("", "", "MODEL_NOT_FOUND"): 1,  # made-up names never become label values
        ("broken", "", "MODEL_UNAVAILABLE"): 1,
        ("identity", "", "VERSION_NOT_FOUND"): 1,
        ("gate", "1", "QUEUE_FULL"): 1,
        ("gate_wide", "1", "DEADLINE_EXCEEDED"): 1,
    }
    for (model, version, reason), count in expected.items():
        assert value(samples, "trtserve_request_failure_total", model=model, version=version, reason=reason) == count, reason
    assert value(samples, "trtserve_request_success_total", model="gate", version="1") == 2
    assert value(samples, "trtserve_request_success_total", model="gate_wide", version="1") == 4
    assert value(samples, "trtserve_request_success_total", **flaky) == 0
    assert value(samples, "trtserve_queue_items", model="gate", version="1", node="gate") == 0


def test_refusals_are_counted_by_type(server_factory):
    handle = server_factory(metrics_port=0, token=TOKEN, max_connections=2, max_buffered_per_connection=1 << 20)
    with handle.connect() as conn:
        assert conn.error("live")["name"] == "UNAUTHENTICATED"  # no auth first
    wait_disconnected(handle)
    with handle.connect() as conn:
        conn.result("auth", token=TOKEN)
        assert conn.error("load", model="echo")["name"] == "PERMISSION_DENIED"
        with handle.connect() as second:
            second.result("auth", token=TOKEN)
            with handle.connect() as third:  # at the limit: the connection idle the longest makes room
                assert third.result("auth", token=TOKEN)["authenticated"]
                evicted = conn.recv()
                assert evicted["id"] is None and evicted["error"]["name"] == "RESOURCE_EXHAUSTED"
    wait_disconnected(handle)  # else the next connection may still count against the limit
    with handle.connect() as conn:
        conn.send_bytes(struct.pack(">I", 1 << 20))  # over the 64 KiB allowed before auth
        assert conn.recv()["error"]["name"] == "FRAME_TOO_LARGE"
    with handle.connect() as conn:
        conn.send_bytes(struct.pack(">I", 1) + b"\xc1")  # 0xc1 is never valid msgpack
        assert conn.recv()["error"]["name"] == "PROTOCOL_ERROR"
    with handle.connect() as conn:
        conn.result("auth", token=TOKEN)
        conn.send_bytes(struct.pack(">I", 2 << 20))  # more than this connection's share of request memory
        assert conn.recv()["error"]["name"] == "RESOURCE_EXHAUSTED"
    samples = scrape(handle)
    for kind in ("auth", "connection_limit", "frame_too_large", "protocol_error", "permission_denied", "memory"):
        assert value(samples, "trtserve_refusals_total", type=kind) == 1, kind


def test_reload_neither_double_counts_nor_leaks_listeners(metered):
    with metered.connect() as conn:
        conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})
        for _ in range(3):
            assert conn.result("load", model="identity")["state"] == "READY"
        conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})
        samples = scrape(metered)
    assert value(samples, "trtserve_request_success_total", **identity()) == 2
    assert value(samples, "trtserve_request_queue_seconds_count", **identity()) == 2
    assert value(samples, "trtserve_batch_size_count", **identity(node="identity")) == 2
    pipeline = metered.call(lambda: metered.server.repository.get("identity").pipeline)
    assert len(pipeline.stats.listeners) == 1 and len(pipeline.nodes[0].stats.listeners) == 1


def test_model_state_follows_unload(metered):
    with metered.connect() as conn:
        conn.result("unload", model="echo")
        samples = scrape(metered)
    assert value(samples, "trtserve_model_state", model="echo", state="UNLOADED") == 1
    assert value(samples, "trtserve_model_state", model="echo", state="READY") == 0
    assert ("trtserve_queue_items", (("model", "echo"), ("node", "echo"), ("version", "1"))) not in samples


def test_servers_in_one_process_keep_separate_registries(server_factory):
    first, second = server_factory(metrics_port=0), server_factory(metrics_port=0)
    with first.connect() as conn:
        conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})
    assert value(scrape(first), "trtserve_request_success_total", **identity()) == 1
    assert value(scrape(second), "trtserve_request_success_total", **identity()) == 0


def test_metrics_port_is_released_at_stop(server_factory, repository):
    handle = server_factory(metrics_port=0)
    port = handle.server.metrics_port
    handle.stop()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((handle.host, port))  # nothing listens there any more


def test_failed_tls_handshakes_are_counted(server_factory, certificate):
    """A plaintext client and one that rejects the certificate fail the handshake inside the
    SSL layer; each counts once as tls_handshake. A good TLS connection does not count."""
    import gc
    import ssl

    from trtserve_client import Client
    from trtserve.server.auth import server_ssl_context

    cert, key = certificate
    handle = server_factory(metrics_port=0, ssl_context=server_ssl_context(cert, key))
    with Client(handle.host, handle.port, tls=True, ca_file=str(cert), timeout=10) as client:
        assert client.live() is True
    with socket.create_connection((handle.host, handle.port), timeout=5) as plain:
        plain.sendall(b"\x00\x00\x00\x05hello")  # not a TLS ClientHello
        assert plain.recv(100) == b""  # the server hangs up
    with socket.create_connection((handle.host, handle.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")  # untrusted
    give_up = time.monotonic() + 10
    while value(scrape(handle), "trtserve_refusals_total", type="tls_handshake") < 2:
        assert time.monotonic() < give_up, "failed handshakes were not counted"
        handle.call(gc.collect)  # the default asyncio loop frees them later than uvloop does
        time.sleep(0.05)
    assert value(scrape(handle), "trtserve_refusals_total", type="tls_handshake") == 2


def test_cli_metrics_port_serves_prometheus_text(process_factory):
    with socket.socket() as probe:  # a free port for the flag (the server binds it right after)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = process_factory("--metrics-port", str(port), "--log-level", "WARNING")
    from trtserve_client import Client

    with Client(proc.host, proc.port, timeout=10) as client:
        assert client.infer("echo", b"scraped") == {"output": b"scraped"}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    success = [s for s in families["trtserve_request_success"].samples
               if s.name == "trtserve_request_success_total" and s.labels.get("model") == "echo"]
    assert [s.value for s in success] == [1.0]


def test_a_request_dropped_with_its_vanished_client_is_not_counted_as_answered(metered, gates):
    """The client saw no answer, so the per-answer metrics count none; the model's own
    statistics count the dropped request as CONNECTION_ERROR (docs/operations.md)."""
    conn = metered.connect()
    conn.request("infer", model="gate", inputs={"x": b"run"})
    gates["gate"].wait_started(1)
    conn.request("infer", model="gate", inputs={"x": b"queued"})  # waits behind the running one
    wait = time.monotonic() + 10
    while metered.call(lambda: metered.server.repository.get("gate").pipeline.nodes[0].queue_depth()) < 1:
        assert time.monotonic() < wait
        time.sleep(0.005)
    conn.abort()
    wait_disconnected(metered)
    gates["gate"].open()
    samples = scrape(metered)
    gate = dict(model="gate", version="1")
    assert value(samples, "trtserve_request_failure_total", reason="CONNECTION_ERROR", **gate) == 0
    assert value(samples, "trtserve_request_duration_seconds_count", **gate) == 0
    with metered.connect() as other:
        stats = other.result("statistics", model="gate")["models"][0]
    assert stats["failure_by_reason"].get("CONNECTION_ERROR") == 1
