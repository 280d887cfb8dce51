"""One client across several servers: least outstanding requests, failover, re-sends.

Real servers (``trtserve serve`` processes, or in-process ``Server`` threads), real TCP.
"""
from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import numpy as np
import pytest

from trtserve_client import AsyncClient, Client
from trtserve_client.errors import ConnectionFailedError, InvalidArgumentError, ModelUnavailableError

from .conftest import GateControl, build_test_repository

pytestmark = pytest.mark.timeout(180)

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def successes(client: Client, model: str = "identity") -> int:
    return sum(row["success_count"] for row in client.statistics(model)["models"])


class Load:
    """``threads`` threads sharing ``client``, each sending identity requests and checking
    every answer; bounded by ``max_seconds``.  Failures are kept, not raised."""

    def __init__(self, client: Client, threads: int, max_seconds: float = 90.0) -> None:
        self.client, self.max_seconds = client, max_seconds
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answered, self.errors = 0, []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        give_up = time.monotonic() + self.max_seconds
        while not self.stop_event.is_set() and time.monotonic() < give_up:
            data = rng.standard_normal((2, 4)).astype(np.float32)
            try:
                out = self.client.infer("identity", data, timeout=30)["output"]
                np.testing.assert_array_equal(out, data)
            except BaseException as exc:
                with self.lock:
                    self.errors.append(exc)
                continue
            with self.lock:
                self.answered += 1

    def wait_answers(self, more: int, timeout: float = 30.0) -> None:
        target, give_up = self.answered + more, time.monotonic() + timeout
        while self.answered < target:
            assert time.monotonic() < give_up, f"load stalled at {self.answered} answers"
            time.sleep(0.02)

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self.threads)


def test_a_stopped_server_loses_no_request_and_is_used_again_after_restart(process_factory):
    first = process_factory("--log-level", "WARNING")
    second = process_factory("--log-level", "WARNING")
    port = first.port
    with Client(endpoints=[f"{HOST}:{first.port}", (HOST, second.port)], connections=2) as client:
        load = Load(client, threads=32)
        try:
            load.wait_answers(500)
            with Client(HOST, first.port) as a, Client(HOST, second.port) as b:
                assert successes(a) > 0 and successes(b) > 0  # both take requests
            first.send_signal(signal.SIGTERM)  # drains: refuses new work, finishes what it has
            assert first.wait(60) == 0
            load.wait_answers(500)  # the survivor serves everything meanwhile
            restarted = process_factory("--log-level", "WARNING", "--port", str(port))
            with Client(HOST, restarted.port) as a:
                give_up = time.monotonic() + 30
                while successes(a) == 0:  # a fresh process: only new requests count
                    assert time.monotonic() < give_up, "the restarted server was never used again"
                    time.sleep(0.1)
            load.wait_answers(200)
        finally:
            load.stop()
    assert load.errors == [], f"{len(load.errors)} failed, first: {load.errors[:1]!r}"


def test_unreachable_endpoint_is_skipped_and_retries_can_be_turned_off(server_factory):
    live = server_factory()
    dead = f"{HOST}:{free_port()}"
    data = np.ones((1, 4), np.float32)
    with Client(endpoints=[dead, f"{HOST}:{live.port}"], connect_timeout=2) as client:
        for _ in range(20):  # the dead one fails once, is re-sent, then skipped
            np.testing.assert_array_equal(client.infer("identity", data)["output"], data)
    with Client(endpoints=[dead, f"{HOST}:{live.port}"], retries=0, connect_timeout=2) as client:
        outcomes = []
        for _ in range(4):
            try:
                client.infer("identity", data)
                outcomes.append("ok")
            except ConnectionFailedError:
                outcomes.append("failed")
        assert outcomes.count("failed") == 1  # no re-send: the caller sees the one failure
        assert outcomes.count("ok") == 3  # and the dead endpoint is then skipped


def test_requests_spread_by_least_outstanding(server_factory, repository, tmp_path):
    # Two repositories, so that each server's Gate model has gate files of its own.
    other = build_test_repository(tmp_path / "other")
    one, two = server_factory(repository), server_factory(other)
    gates = [GateControl(root / "_gates" / "gate_wide") for root in (repository, other)]

    async def scenario() -> dict[str, int]:
        async with AsyncClient(endpoints=[(HOST, one.port), (HOST, two.port)]) as client:
            calls = [asyncio.ensure_future(client.infer("gate_wide", b"x")) for _ in range(8)]
            loop = asyncio.get_running_loop()
            try:
                for gate in gates:  # each server holds 4 (its 4 instances) if the client balanced
                    await loop.run_in_executor(None, gate.wait_started, 4)
                outstanding = client.outstanding()
            finally:
                for gate in gates:
                    gate.open()
            await asyncio.gather(*calls)
            return outstanding

    assert sorted(asyncio.run(scenario()).values()) == [4, 4]


def test_single_address_signature_and_no_resend(server_factory):
    server = server_factory()
    with Client(HOST, server.port) as client:
        assert client.address == f"{HOST}:{server.port}" and client.endpoints == [client.address]
        assert client.live()


@pytest.mark.parametrize("kwargs, field", [
    ({"endpoints": []}, "endpoints"),
    ({"endpoints": ["nohost"]}, "endpoints"),
    ({"endpoints": ["h:0"]}, "endpoints"),
    ({"endpoints": [("h", "8001")]}, "endpoints"),
    ({"endpoints": ["h:1", "h:1"]}, "endpoints"),
    ({"endpoints": ["h:1"], "port": 9}, "endpoints"),
    ({"endpoints": ["h:1"], "retries": -1}, "retries"),
    ({"endpoints": ["h:1"], "retries": True}, "retries"),
    ({"endpoints": ["h:1"], "down_s": 0}, "down_s"),
])
def test_bad_endpoint_arguments_are_typed_errors(kwargs, field):
    with pytest.raises(InvalidArgumentError) as caught:
        AsyncClient(**kwargs)
    assert caught.value.details["field"] == field


SLOW_INIT = '''import time

import trtserve


class SlowInit(trtserve.Backend):
    """Echoes; takes 3 s to initialise, so its model stays LOADING meanwhile."""

    def init(self, context):
        time.sleep(3)

    def forward(self, items):
        for item in items:
            item["result"] = item["data"]


trtserve.register("SlowInit", SlowInit)
'''


def test_a_model_still_loading_on_one_endpoint_is_served_by_another(server_factory, tmp_path):
    folder = tmp_path / "slow-repository" / "slow"
    folder.mkdir(parents=True)
    (folder / "backend.py").write_text(SLOW_INIT)
    (folder / "config.toml").write_text('backend = "SlowInit"\n')
    ready = server_factory(folder.parent)
    loading = server_factory(folder.parent, model_control="explicit")
    with Client(HOST, loading.port) as control:
        threading.Thread(target=control.load, args=("slow",), daemon=True).start()
        give_up = time.monotonic() + 10
        while {m["name"]: m["state"] for m in control.repository_index()["models"]}.get("slow") != "LOADING":
            assert time.monotonic() < give_up, "the explicit load never started"
            time.sleep(0.01)
        with Client(endpoints=[f"{HOST}:{loading.port}", f"{HOST}:{ready.port}"]) as client:
            for i in range(20):  # every one refused by the loading server is sent to the ready one
                assert client.infer("slow", b"%d" % i) == {"output": b"%d" % i}
        with Client(HOST, loading.port) as alone, pytest.raises(ModelUnavailableError, match="LOADING"):
            alone.infer("slow", b"x")  # one endpoint: the caller sees why
