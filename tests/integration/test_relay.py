"""A front door's relay without Ray: the forwarder (scaleout/forwarder.py, link.py) on an
event loop of this process, relaying request frames to replica servers (ReplicaServer,
what each Ray replica runs) over TCP, and a dead "replica" that accepts and drops.

Requests are unpacked as a front door's protocol unpacks them (frames.decode_frame), and
the relayed answers are checked by unpacking the frames the client would receive.
"""
from __future__ import annotations

import asyncio
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvloop
from trtserve_client.frames import decode_frame, pack
from trtserve_client.wire import decode_value, encode_tensors

import trtserve
from trtserve.errors import DeadlineExceededError, TrtserveError
from trtserve.scaleout.forwarder import Forwarder
from trtserve.scaleout.replica_server import ReplicaServer
from trtserve.server.reply import Framed
from trtserve.stats import ModelStats

EXAMPLES = Path(__file__).resolve().parents[2] / "model_repository"
HOST = "127.0.0.1"
REQUESTS = 200


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("relay") / "repo"
    for name in ("tensor_mlp", "identity"):
        shutil.copytree(EXAMPLES / name, root / name)
    return root


@pytest.fixture(scope="module")
def replicas(repository):
    """Two replica servers of tensor_mlp and one of identity, for the module."""
    servers = {"mlp": [ReplicaServer(str(repository), "tensor_mlp", {}, HOST, grace_s=5).start() for _ in range(2)],
               "identity": [ReplicaServer(str(repository), "identity", {}, HOST, grace_s=5).start()]}
    yield servers
    for group in servers.values():
        for server in group:
            server.stop(grace_s=5)


class DeadReplica:
    """A listener that accepts connections, reads what comes and closes them unanswered."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0))
        self.address = f"{HOST}:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.recv(1 << 16)
            conn.close()

    def close(self) -> None:
        self.sock.close()


def request(request_id: int, data: np.ndarray, model: str = "tensor_mlp", **fields) -> dict:
    """A client's infer request, as the front door's protocol hands it on (buffers are views)."""
    return decode_frame(memoryview(pack({"v": 2, "id": request_id, "op": "infer", "model": model,
                                          "inputs": encode_tensors({"x": data} if model == "tensor_mlp"
                                                                   else {"input": data}), **fields})))


async def relay(forwarder: Forwarder, message: dict, timeout_s: float | None = None, stats: ModelStats | None = None):
    """Relay ``message``; the answer frame the client would get, unpacked (or the error)."""
    done = asyncio.get_running_loop().create_future()
    call = forwarder.relay(message, timeout_s, stats or ModelStats(), None, time.perf_counter(),
                           asyncio.get_running_loop())
    call.add_done_callback(lambda _arg, reply: done.set_result(reply), None)
    reply = await done
    if reply.error is not None:
        return reply.error
    assert isinstance(reply.value, Framed)
    return decode_frame(memoryview(b"".join(bytes(p) for p in reply.value.parts)))


def run(coroutine):
    return uvloop.run(coroutine)


def test_requests_are_relayed_to_the_least_busy_replica_and_answered_with_their_own_ids(repository, replicas):
    addresses = tuple(server.address for server in replicas["mlp"])
    forwarder = Forwarder("tensor_mlp", addresses=lambda: addresses, refresh=lambda: None)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((int(rng.integers(1, 9)), 16)).astype(np.float32) for _ in range(REQUESTS)]
    stats = ModelStats()

    async def main():
        ids = [int(i) for i in rng.integers(0, 2**64, REQUESTS, dtype=np.uint64)]
        return ids, await asyncio.gather(*(relay(forwarder, request(i, x), stats=stats) for i, x in zip(ids, inputs)))

    ids, answers = run(main())
    with trtserve.pipe(str(repository / "tensor_mlp" / "config.toml")) as mlp:
        for request_id, x, answer in zip(ids, inputs, answers):
            assert answer["id"] == request_id
            item = {"data": x}
            mlp(item)
            np.testing.assert_allclose(decode_value(answer["result"]["outputs"]["y"], "y"), item["result"],
                                       rtol=1e-6, atol=1e-6)
    assert stats.success == REQUESTS and forwarder.resent == 0 and not forwarder.busy
    served = [server.repository.get("tensor_mlp").statistics()["success_count"] for server in replicas["mlp"]]
    assert all(served)  # both replicas took a share


def test_large_tensors_travel_out_of_band_both_ways(replicas):
    address = replicas["identity"][0].address
    forwarder = Forwarder("identity", addresses=lambda: (address,), refresh=lambda: None)
    data = np.arange(64 * 4096, dtype=np.float32).reshape(64, 4096)  # 1 MiB, over the scratch buffer too
    answer = run(relay(forwarder, request(5, data, model="identity")))
    assert answer["id"] == 5
    np.testing.assert_array_equal(decode_value(answer["result"]["outputs"]["output"], "output"), data)


def test_bad_input_gets_the_replicas_typed_error_for_its_id(replicas):
    address = replicas["mlp"][0].address
    forwarder = Forwarder("tensor_mlp", addresses=lambda: (address,), refresh=lambda: None)
    stats = ModelStats()
    answer = run(relay(forwarder, request(77, np.ones((2, 15), np.float32)), stats=stats))
    assert answer["id"] == 77
    assert answer["error"]["name"] == "INVALID_INPUT" and "[-1, 16]" in answer["error"]["message"]
    assert stats.snapshot()["failure_by_reason"] == {"INVALID_INPUT": 1}


def test_requests_dropped_by_a_replica_are_resent_to_another(replicas):
    dead = DeadReplica()
    addresses = (dead.address, replicas["mlp"][0].address)
    forwarder = Forwarder("tensor_mlp", addresses=lambda: addresses, refresh=lambda: None)

    async def main():
        return await asyncio.gather(*(relay(forwarder, request(i, np.ones((1, 16), np.float32))) for i in range(64)))

    try:
        answers = run(main())
    finally:
        dead.close()
    assert [a["id"] for a in answers] == list(range(64)) and all("result" in a for a in answers)
    assert dead.accepted >= 1 and forwarder.resent >= 1


def test_when_every_replica_failed_a_request_waits_for_the_list_to_change(replicas):
    dead = DeadReplica()
    current = [(dead.address,)]
    refreshed = threading.Event()
    forwarder = Forwarder("tensor_mlp", addresses=lambda: current[0], refresh=refreshed.set)

    async def main():
        pending = asyncio.ensure_future(relay(forwarder, request(3, np.ones((1, 16), np.float32))))
        await asyncio.sleep(0.3)
        assert not pending.done() and refreshed.is_set()  # waiting, and the status thread was woken
        current[0] = (replicas["mlp"][1].address,)  # a replacement reported its address
        return await pending

    try:
        answer = run(main())
    finally:
        dead.close()
    assert answer["id"] == 3 and "result" in answer


def test_a_deadline_passing_while_no_replica_answers_is_deadline_exceeded():
    dead = DeadReplica()
    forwarder = Forwarder("tensor_mlp", addresses=lambda: (dead.address,), refresh=lambda: None)
    try:
        error = run(relay(forwarder, request(1, np.ones((1, 16), np.float32), timeout_ms=300), timeout_s=0.3))
    finally:
        dead.close()
    assert isinstance(error, DeadlineExceededError)
    assert not forwarder.busy


def test_a_cancelled_request_is_forgotten_and_its_late_answer_dropped(replicas):
    address = replicas["mlp"][0].address
    forwarder = Forwarder("tensor_mlp", addresses=lambda: (address,), refresh=lambda: None)

    async def main():
        call = forwarder.relay(request(1, np.ones((1, 16), np.float32)), None, ModelStats(), None,
                               time.perf_counter(), asyncio.get_running_loop())
        assert call.cancel()  # the client went away before the answer
        assert not forwarder.busy
        await asyncio.sleep(0.2)  # the answer arrives and is dropped
        link = next(iter(forwarder._loops.values())).replicas[address].link
        assert link is not None and link.in_flight == 0
        return await relay(forwarder, request(2, np.ones((1, 16), np.float32)))  # the connection goes on

    assert run(main())["id"] == 2


def test_a_retired_forwarder_refuses_new_requests():
    forwarder = Forwarder("tensor_mlp", addresses=lambda: (), refresh=lambda: None)
    forwarder.close()

    async def main():
        forwarder.relay(request(1, np.ones((1, 16), np.float32)), None, ModelStats(), None, time.perf_counter(),
                        asyncio.get_running_loop())

    with pytest.raises(TrtserveError, match="retired"):
        run(main())


def test_requests_in_flight_when_the_forwarder_closes_fail_shutting_down(replicas):
    dead = DeadReplica()  # keeps them in flight until their connection drops
    forwarder = Forwarder("tensor_mlp", addresses=lambda: (dead.address,), refresh=lambda: None)

    async def main():
        pending = asyncio.ensure_future(relay(forwarder, request(1, np.ones((1, 16), np.float32))))
        await asyncio.sleep(0)  # sent (or waiting for its connection)
        await asyncio.get_running_loop().run_in_executor(None, forwarder.close)
        return await pending

    try:
        error = run(main())
    finally:
        dead.close()
    assert isinstance(error, TrtserveError) and error.name == "SHUTTING_DOWN" and "retired" in error.message
    assert not forwarder.busy
