"""The client library (Client and AsyncClient) against a real trtserve server.

The server is the real one from conftest (in-process on its own thread and uvloop loop, or
the ``trtserve serve`` subprocess).  Work is held and released with files (the Gate and
Release backends), never with sleeps, so ordering assertions are deterministic.  Errors
are asserted by code and class, never by message.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trtserve_client import AsyncClient, Client, errors, frames, wire
from trtserve_client.errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    ErrorCode,
    FrameTooLargeError,
    InvalidArgumentError,
    ModelUnavailableError,
    PermissionDeniedError,
    ProtocolError,
    QueueFullError,
)

from .conftest import ServerThread, write_model

pytestmark = pytest.mark.timeout(90)

CLIENTS_DIR = Path(__file__).resolve().parents[2] / "clients"
RELEASE_INSTANCES = 8

# Copied into model folders as backend.py (the model-folder backend feature).
CLIENT_BACKENDS = '''
"""Backends for the client tests."""
import time
from pathlib import Path

import trtserve


class Delay(trtserve.Backend):
    """result = data, after sleeping data[0] milliseconds: completion order follows the input."""

    def forward(self, items):
        for item in items:
            time.sleep(float(item["data"][0]) / 1000.0)
            item["result"] = item["data"]


class Release(trtserve.Backend):
    """Holds each item until <release_dir>/release-<tag> (or release-all) exists; tag = data[0].

    Writes started-<tag> on entry so a test knows the item is running.
    """

    config_keys = {"release_dir": trtserve.Key(str, None, "folder of the started/release files")}

    def init(self, context):
        super().init(context)
        self.dir = Path(context.config["release_dir"])
        self.dir.mkdir(parents=True, exist_ok=True)

    def forward(self, items):
        for item in items:
            tag = int(item["data"][0])
            (self.dir / f"started-{tag}").touch()
            give_up = time.monotonic() + 20.0  # a forgotten release never hangs the run
            while time.monotonic() < give_up and not any(
                (self.dir / name).exists() for name in (f"release-{tag}", "release-all")
            ):
                time.sleep(0.002)
            item["result"] = item["data"]


trtserve.register("Delay", Delay)
trtserve.register("Release", Release)
'''


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def repository(repository: Path) -> Path:
    """conftest's test repository plus the ``delay`` and ``release`` models."""
    support = repository / "_client"  # no config.toml: not a model
    support.mkdir()
    backend = support / "backend.py"
    backend.write_text(CLIENT_BACKENDS)
    write_model(repository, "delay", 'backend = "Delay"\ninstance_num = 16\n', backend_py=backend)
    write_model(
        repository,
        "release",
        f'backend = "Release"\nrelease_dir = "{repository / "_release"}"\ninstance_num = {RELEASE_INSTANCES}\n',
        backend_py=backend,
    )
    return repository


@pytest.fixture
def release_dir(repository: Path) -> Path:
    return repository / "_release"


@pytest.fixture(autouse=True)
def _let_held_work_finish(server_factory, gates, release_dir):
    """Whatever a test held is released before the server stops, so teardown never waits
    (depending on server_factory makes this teardown run before the servers stop)."""
    yield
    for gate in gates.values():
        gate.open()
    release_dir.mkdir(parents=True, exist_ok=True)
    (release_dir / "release-all").touch()


class LoopDriven:
    """An AsyncClient driven from the test's thread: each coroutine method runs to completion
    on a loop owned by this adapter, so one test body exercises both client classes."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kwargs: self.loop.run_until_complete(attr(*args, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


def make_client(kind: str, host: str, port: int, **options: Any) -> Any:
    if kind == "Client":
        return Client(host, port, **options)
    return LoopDriven(AsyncClient(host, port, **options))


@pytest.fixture(params=["Client", "AsyncClient"])
def client(request, server):
    """Each test using this runs twice: with the sync Client and with the AsyncClient."""
    handle = make_client(request.param, server.host, server.port, timeout=20.0)
    yield handle
    handle.close()


def assert_error(excinfo: pytest.ExceptionInfo, code: ErrorCode) -> None:
    """The exception is exactly the class for ``code``: chosen by code, nothing else."""
    assert excinfo.value.code == code, excinfo.value
    assert type(excinfo.value) is errors.error_class(code)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def wait_started(release_dir: Path, tags) -> None:
    wait_for(lambda: all((release_dir / f"started-{t}").exists() for t in tags), what=f"tags {list(tags)} to start")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- every operation


def test_health(client):
    assert client.live() is True
    assert client.ready() is True
    assert client.ready("identity") is True
    assert client.ready("identity", version=2) is True
    assert client.ready("broken") is False


def test_server_metadata(client):
    meta = client.server_metadata()
    assert meta["name"] == "trtserve" and isinstance(meta["version"], str)
    assert meta["protocol"] == wire.PROTOCOL_VERSION
    assert set(wire.OPERATIONS) <= set(meta["operations"])
    assert meta["max_frame"] == wire.DEFAULT_MAX_FRAME


def test_model_metadata_and_config(client):
    meta = client.model_metadata("identity")
    assert meta["name"] == "identity" and 2 in meta["versions"]
    assert meta["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "output", "dtype": "float32", "shape": [-1, 4]}]
    assert meta["max_batch_size"] == 8
    assert client.model_metadata("identity", version=2)["name"] == "identity"
    config = client.model_config("identity")
    assert config["name"] == "identity" and config["source"].endswith("config.toml")
    assert config["config"]["backend"] == "Identity" and config["config"]["max"] == 8


def test_repository_index(client):
    rows = {row["name"]: row for row in client.repository_index()["models"]}
    assert {"identity", "echo", "pair", "blob", "broken", "delay", "release"} <= set(rows)
    assert rows["identity"]["state"] == "READY" and rows["identity"]["version"] == 2
    assert rows["identity"]["versions_on_disk"] == [1, 2]
    assert rows["broken"]["state"] == "UNAVAILABLE" and rows["broken"]["reason"]


def test_statistics_count_requests(client):
    def successes() -> int:
        return sum(row["success_count"] for row in client.statistics("identity")["models"])

    before = successes()
    for i in range(5):
        client.infer("identity", np.full((1, 4), i, np.float32))
    assert successes() == before + 5
    assert "identity" in {row["name"] for row in client.statistics()["models"]}
    assert {row["name"] for row in client.statistics("identity")["models"]} == {"identity"}


def test_infer_inputs_and_outputs(client):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = client.infer("identity", x)  # one value: the input name comes from metadata
    assert list(out) == ["output"]
    np.testing.assert_array_equal(out["output"], x)
    assert out["output"].dtype == np.float32 and not out["output"].flags.writeable
    np.testing.assert_array_equal(client.infer("identity", {"input": x}, version=2)["output"], x)
    np.testing.assert_array_equal(client.infer("echo", np.arange(5))["output"], np.arange(5))
    assert client.infer("echo", b"raw bytes") == {"output": b"raw bytes"}
    assert client.infer("blob", b"\x00\xff\xd8") == {"echoed": b"\x00\xff\xd8"}


def test_infer_several_inputs_and_output_selection(client):
    a, b = np.linspace(0, 1, 5, dtype=np.float32), np.arange(5, dtype=np.int64)
    both = client.infer("pair", {"a": a, "b": b})
    np.testing.assert_array_equal(both["a"], a)
    np.testing.assert_array_equal(both["b"], b)
    only_b = client.infer("pair", {"a": a, "b": b}, outputs=["b"])
    assert list(only_b) == ["b"]


def test_infer_big_endian_and_non_contiguous_inputs(client):
    view = np.arange(12, dtype=">i4").reshape(3, 4).T  # big-endian and transposed
    out = client.infer("echo", view)["output"]
    assert out.dtype == np.int32 and out.shape == (4, 3)
    np.testing.assert_array_equal(out, view)


def test_load_and_unload(client):
    assert client.unload("echo") == {"name": "echo", "state": "UNLOADED"}
    assert client.ready("echo") is False
    with pytest.raises(ModelUnavailableError) as excinfo:
        client.infer("echo", b"x")
    assert_error(excinfo, ErrorCode.MODEL_UNAVAILABLE)
    loaded = client.load("echo")
    assert loaded["name"] == "echo" and loaded["state"] == "READY"
    assert client.infer("echo", b"back") == {"output": b"back"}


def test_load_and_unload_need_model_control(server_factory):
    plain = server_factory()  # model_control defaults to none
    with Client(plain.host, plain.port) as client:
        for operation in (client.load, client.unload):
            with pytest.raises(PermissionDeniedError) as excinfo:
                operation("echo")
            assert_error(excinfo, ErrorCode.PERMISSION_DENIED)


X = np.zeros((1, 4), np.float32)
ERROR_CASES = {
    "unknown-model": (lambda c: c.infer("no_such_model", X), ErrorCode.MODEL_NOT_FOUND),
    "unknown-model-metadata": (lambda c: c.model_metadata("no_such_model"), ErrorCode.MODEL_NOT_FOUND),
    "unknown-model-load": (lambda c: c.load("no_such_model"), ErrorCode.MODEL_NOT_FOUND),
    "wrong-dtype": (lambda c: c.infer("identity", X.astype(np.int32)), ErrorCode.INVALID_INPUT),
    "wrong-shape": (lambda c: c.infer("identity", np.zeros((1, 3), np.float32)), ErrorCode.INVALID_INPUT),
    "unknown-input-name": (lambda c: c.infer("identity", {"nope": X}), ErrorCode.INVALID_INPUT),
    "missing-input": (lambda c: c.infer("pair", {"a": np.zeros(2, np.float32)}), ErrorCode.INVALID_INPUT),
    "bytes-for-tensor": (lambda c: c.infer("identity", {"input": b"abc"}), ErrorCode.INVALID_INPUT),
    "batch-over-max": (lambda c: c.infer("identity", np.zeros((9, 4), np.float32)), ErrorCode.INVALID_INPUT),
    "dtype-not-on-wire": (lambda c: c.infer("echo", np.zeros(2, np.complex64)), ErrorCode.INVALID_INPUT),
    "python-list": (lambda c: c.infer("identity", [[1.0, 2.0, 3.0, 4.0]]), ErrorCode.INVALID_INPUT),
    "python-tuple-in-a-map": (lambda c: c.infer("identity", {"input": (1.0, 2.0, 3.0, 4.0)}), ErrorCode.INVALID_INPUT),
    "single-value-for-two-inputs": (lambda c: c.infer("pair", np.zeros(2, np.float32)), ErrorCode.INVALID_INPUT),
    "unknown-output": (lambda c: c.infer("identity", X, outputs=["nope"]), ErrorCode.INVALID_ARGUMENT),
    "version-not-served": (lambda c: c.infer("identity", X, version=1), ErrorCode.VERSION_NOT_FOUND),
    "unavailable-model": (lambda c: c.infer("broken", X), ErrorCode.MODEL_UNAVAILABLE),
    "backend-raised": (lambda c: c.infer("flaky", b"raise"), ErrorCode.BACKEND_ERROR),
    "no-result": (lambda c: c.infer("flaky", b"skip"), ErrorCode.NO_RESULT),
    "priority-out-of-range": (lambda c: c.infer("echo", b"x", priority=99), ErrorCode.INVALID_ARGUMENT),
    "unknown-operation": (lambda c: c.request("no_such_op"), ErrorCode.UNKNOWN_OPERATION),
    "mistyped-field": (lambda c: c.request("model_metadata", model=5), ErrorCode.INVALID_ARGUMENT),
    "empty-model-name": (lambda c: c.infer("", X), ErrorCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("call, code", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_typed_errors_by_code(client, call, code):
    with pytest.raises(errors.TrtserveError) as excinfo:
        call(client)
    assert_error(excinfo, code)
    assert client.live()  # an error answer costs nothing: the connection still works


# --------------------------------------------------------------------------- QUEUE_FULL


def test_queue_full_async(server, gates):
    """gate: one instance, max_queue_size 1.  One runs, one queues, the third is refused."""

    async def main():
        async with AsyncClient(server.host, server.port) as client:
            running = asyncio.create_task(client.infer("gate", {"input": b"1"}))
            await asyncio.to_thread(gates["gate"].wait_started, 1)
            contenders = {asyncio.create_task(client.infer("gate", {"input": b"2"})),
                          asyncio.create_task(client.infer("gate", {"input": b"3"}))}
            done, queued = await asyncio.wait(contenders, return_when=asyncio.FIRST_COMPLETED)
            with pytest.raises(QueueFullError) as excinfo:
                done.pop().result()
            assert_error(excinfo, ErrorCode.QUEUE_FULL)
            gates["gate"].open()
            assert (await running)["output"] == b"1"
            assert (await queued.pop())["output"] in (b"2", b"3")

    asyncio.run(main())


def test_queue_full_sync(server, gates):
    with Client(server.host, server.port) as client, concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = pool.submit(client.infer, "gate", {"input": b"1"})
        gates["gate"].wait_started(1)
        contenders = [pool.submit(client.infer, "gate", {"input": tag}) for tag in (b"2", b"3")]
        done, queued = concurrent.futures.wait(contenders, timeout=10, return_when=concurrent.futures.FIRST_COMPLETED)
        with pytest.raises(QueueFullError) as excinfo:
            done.pop().result()
        assert_error(excinfo, ErrorCode.QUEUE_FULL)
        gates["gate"].open()
        assert running.result(10)["output"] == b"1"
        assert queued.pop().result(10)["output"] in (b"2", b"3")


# --------------------------------------------------------------------------- deadlines


def test_client_timeout_raises_and_leaves_the_connection_usable(client, gates):
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as excinfo:
        # request(): no timeout_ms goes to the server, so only the client's timer can fire.
        client.request("infer", timeout=0.3, model="gate_wide", inputs={"input": b"held"})
    assert_error(excinfo, ErrorCode.DEADLINE_EXCEEDED)
    assert excinfo.value.details["side"] == "client"
    assert 0.3 <= time.monotonic() - started < 5
    assert client.live() and client.infer("echo", b"after") == {"output": b"after"}
    gates["gate_wide"].open()  # the held request now finishes; its late answer is dropped
    wait_for(lambda: client.statistics("gate_wide")["models"][0]["success_count"] == 1, what="the held request")
    assert client.infer("echo", b"still fine") == {"output": b"still fine"}
    assert client.in_flight == 0


def test_server_timeout_ms(client, gates):
    with pytest.raises(DeadlineExceededError) as excinfo:
        client.request("infer", model="gate_wide", inputs={"input": b"held"}, timeout_ms=150)
    assert_error(excinfo, ErrorCode.DEADLINE_EXCEEDED)
    assert "side" not in excinfo.value.details  # the server's answer, not the client's timer
    assert excinfo.value.details["timeout_ms"] == 150


def test_infer_timeout_is_sent_to_the_server_too(client, gates):
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        client.infer("gate_wide", {"input": b"held"}, timeout=0.3)
    assert time.monotonic() - started < 5
    assert client.live()


# --------------------------------------------------------------------------- pipelining


def test_out_of_order_responses_are_matched_by_id(server, release_dir):
    """Six requests run at once on one connection; the test releases them in a shuffled
    order and each response must resolve exactly the request that was released."""
    order = [3, 0, 5, 1, 4, 2]

    async def main():
        async with AsyncClient(server.host, server.port, connections=1) as client:
            tasks = {tag: asyncio.create_task(client.infer("release", {"x": np.array([tag, 100 + tag])})) for tag in order}
            await asyncio.to_thread(wait_started, release_dir, order)
            waiting = set(tasks.values())
            for tag in order:
                (release_dir / f"release-{tag}").touch()
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                assert done == {tasks[tag]}
                np.testing.assert_array_equal(tasks[tag].result()["output"], [tag, 100 + tag])

    asyncio.run(main())


def test_200_requests_in_flight_on_one_connection(server):
    """Every tenth request sleeps 500 ms, the rest none: later requests overtake earlier ones
    (500 ms, not less: on a loaded 2-core machine a quick request can take tens of ms)."""
    n = 200

    async def main():
        async with AsyncClient(server.host, server.port, connections=1) as client:
            await client.connect()
            completed: list[int] = []
            tasks = []
            for i in range(n):
                task = asyncio.create_task(client.infer("delay", {"x": np.array([500 if i % 10 == 0 else 0, i])}))
                task.add_done_callback(lambda _, i=i: completed.append(i))
                tasks.append(task)
            await asyncio.sleep(0)  # one loop pass: every task has written its frame
            assert client.connections[0].in_flight == n
            results = await asyncio.gather(*tasks)
            return completed, results

    completed, results = asyncio.run(main())
    for i, result in enumerate(results):
        assert int(result["output"][1]) == i
    assert sorted(completed) == list(range(n))
    assert completed.index(0) > completed.index(1)  # out of order, and still matched


def test_sync_client_is_thread_safe(server):
    with Client(server.host, server.port, connections=2) as client:

        def worker(t: int) -> None:
            for i in range(30):
                x = np.full((1, 4), t * 1000 + i, np.float32)
                np.testing.assert_array_equal(client.infer("identity", x)["output"], x)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for future in [pool.submit(worker, t) for t in range(16)]:
                future.result(30)


# --------------------------------------------------------------------------- pool


@pytest.mark.parametrize("strategy, per_connection", [("least_in_flight", 1), ("round_robin", 2)])
def test_pool_spreads_requests(server, gates, strategy, per_connection):
    async def main():
        async with AsyncClient(server.host, server.port, connections=4, strategy=strategy) as client:
            await client.connect()
            tasks = [asyncio.create_task(client.infer("gate_wide", {"x": b"%d" % i})) for i in range(4 * per_connection)]
            await asyncio.sleep(0)
            assert [c.in_flight for c in client.connections] == [per_connection] * 4
            # The client's connect returns at the TCP handshake; the server accepts a bit later.
            accepted = lambda: server.call(lambda: len(server.server.tracker.connections)) == 4  # noqa: E731
            await asyncio.to_thread(wait_for, accepted, 10.0, "the server to accept 4 connections")
            gates["gate_wide"].open()
            results = await asyncio.gather(*tasks)
            assert sorted(r["output"] for r in results) == sorted(b"%d" % i for i in range(4 * per_connection))

    asyncio.run(main())


def test_least_in_flight_avoids_a_busy_connection(server, gates):
    async def main():
        async with AsyncClient(server.host, server.port, connections=2) as client:
            held = asyncio.create_task(client.infer("gate_wide", {"x": b"held"}))
            await asyncio.to_thread(gates["gate_wide"].wait_started, 1)
            busy = next(c for c in client.connections if c.in_flight == 1)
            for _ in range(6):  # while one connection is busy, every call takes the other
                assert await client.infer("echo", b"x") == {"output": b"x"}
                assert busy.in_flight == 1
            gates["gate_wide"].open()
            await held

    asyncio.run(main())


# --------------------------------------------------------------------------- connections


@pytest.mark.parametrize("kind", ["Client", "AsyncClient"])
def test_reconnects_after_server_restart(server, repository, kind):
    client = make_client(kind, server.host, server.port, timeout=20.0)
    port = server.port
    try:
        assert client.live()
        server.stop()
        with pytest.raises(ConnectionFailedError) as excinfo:
            client.live()  # down: the dropped connection or a refused connect
        assert_error(excinfo, ErrorCode.CONNECTION_ERROR)
        restarted = ServerThread(repository, model_control="explicit", load_models=["*"])
        restarted.server.port = port  # the same address the client knows
        restarted.start()
        try:
            assert client.live()
            assert client.infer("echo", b"again") == {"output": b"again"}
        finally:
            restarted.stop()
    finally:
        client.close()


def test_pending_requests_fail_when_the_server_dies(server_process, gates):
    async def main():
        async with AsyncClient(server_process.host, server_process.port) as client:
            tasks = [asyncio.create_task(client.infer("gate_wide", {"x": b"%d" % i})) for i in range(3)]
            await asyncio.to_thread(gates["gate_wide"].wait_started, 3)
            server_process.proc.kill()  # SIGKILL: no goodbye, the socket just closes
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(type(o) is ConnectionFailedError for o in outcomes), outcomes
            assert not client.connections[0].connected
            with pytest.raises(ConnectionFailedError):
                await client.live()  # nothing listens any more

    asyncio.run(main())


def test_connection_level_error_fails_pending_then_reconnects(server_factory, gates):
    """A frame over the server's max_frame makes it answer "id": nil and close."""
    small = server_factory(max_frame=4096, model_control="explicit", load_models=["*"])

    async def main():
        async with AsyncClient(small.host, small.port, connections=1) as client:  # client limit 64 MiB
            held = asyncio.create_task(client.infer("gate_wide", {"x": b"held"}))
            await asyncio.to_thread(gates["gate_wide"].wait_started, 1)
            with pytest.raises(ConnectionFailedError) as excinfo:
                await client.infer("echo", {"x": b"x" * 10_000})
            assert_error(excinfo, ErrorCode.CONNECTION_ERROR)
            assert type(excinfo.value.__cause__) is FrameTooLargeError
            assert excinfo.value.details["cause_code"] == ErrorCode.FRAME_TOO_LARGE
            with pytest.raises(ConnectionFailedError):
                await held  # innocent, but its connection is gone
            assert await client.live()  # the next call reconnects

    asyncio.run(main())


def test_client_refuses_oversized_frames_locally(server, gates):
    async def main():
        async with AsyncClient(server.host, server.port, connections=1, max_frame=4096) as client:
            held = asyncio.create_task(client.infer("gate_wide", {"x": b"held"}))
            await asyncio.to_thread(gates["gate_wide"].wait_started, 1)
            with pytest.raises(FrameTooLargeError) as excinfo:
                await client.infer("echo", {"x": b"x" * 10_000})
            assert_error(excinfo, ErrorCode.FRAME_TOO_LARGE)
            gates["gate_wide"].open()
            assert (await held)["output"] == b"held"  # nothing was sent: the connection survived

    asyncio.run(main())


def test_garbage_from_the_peer_fails_pending_then_reconnects():
    """A peer that is not a trtserve server: first connection answers garbage, the second
    closes mid-frame, the third answers properly."""

    async def main():
        connections = 0

        async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            header = await reader.readexactly(4)
            [request] = frames.FrameDecoder(1 << 20).feed(header + await reader.readexactly(int.from_bytes(header, "big")))
            if connections == 1:
                writer.write(b"\x00\x00\x00\x01\x00")  # neither frame layout
            elif connections == 2:
                writer.write(frames.pack({"id": request["id"], "result": {"live": True}})[:-3])
            else:
                writer.write(frames.pack({"id": request["id"], "result": {"live": True}}))
            await writer.drain()
            writer.close()

        listener = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        async with listener, AsyncClient("127.0.0.1", port, timeout=10) as client:
            with pytest.raises(ConnectionFailedError) as excinfo:
                await client.live()
            assert type(excinfo.value.__cause__) is ProtocolError
            with pytest.raises(ConnectionFailedError):
                await client.live()  # EOF in the middle of a response frame
            assert await client.live()

    asyncio.run(main())


def test_connect_failure_is_typed():
    port = free_port()  # nothing listens there
    with Client("127.0.0.1", port, connect_timeout=5) as client:
        with pytest.raises(ConnectionFailedError) as excinfo:
            client.live()
        assert_error(excinfo, ErrorCode.CONNECTION_ERROR)
        with pytest.raises(ConnectionFailedError):
            client.connect()


def test_closed_client_refuses_calls_and_stops_its_thread(server):
    before = {t for t in threading.enumerate() if t.name == "trtserve-client-loop"}
    with Client(server.host, server.port) as client:
        assert client.live()
        assert len({t for t in threading.enumerate() if t.name == "trtserve-client-loop"} - before) == 1
    assert not {t for t in threading.enumerate() if t.name == "trtserve-client-loop"} - before
    with pytest.raises(ConnectionFailedError):
        client.live()
    client.close()  # idempotent


def test_invalid_client_arguments_are_refused_before_sending():
    for options in ({"connections": 0}, {"strategy": "random"}, {"timeout": 0}, {"timeout": -1}):
        with pytest.raises(InvalidArgumentError):
            AsyncClient("127.0.0.1", 1, **options)
    for port in (0, 70000, "8001", None):
        with pytest.raises(InvalidArgumentError):
            AsyncClient("127.0.0.1", port)
    with pytest.raises(InvalidArgumentError):
        Client("127.0.0.1", 1, connections=0)


# --------------------------------------------------------------------------- dependencies

ISOLATED = r'''
import importlib.abc, json, sys

BLOCKED = {"trtserve", "uvloop"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the client must not need it")
        return None

sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
before = set(sys.modules)

import numpy as np
from trtserve_client import Client

with Client("127.0.0.1", int(sys.argv[2])) as client:
    out = client.infer("echo", np.arange(3))["output"]
# Modules without a file (cython_runtime, say) are synthetic, not packages anyone installs.
loaded = {m.partition(".")[0] for m in set(sys.modules) - before if getattr(sys.modules[m], "__file__", None)}
third_party = sorted(loaded - set(sys.stdlib_module_names) - {"__main__"})
print(json.dumps({"output": out.tolist(), "third_party": third_party, "file": sys.modules["trtserve_client"].__file__}))
'''


def test_client_needs_only_msgpack_and_numpy(server):
    # -I: no PYTHONPATH, no user site, no current directory on the path.
    proc = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, str(CLIENTS_DIR), str(server.port)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["output"] == [0, 1, 2]
    assert set(report["third_party"]) <= {"numpy", "msgpack", "trtserve_client"}, report["third_party"]
    assert report["file"].startswith(str(CLIENTS_DIR))


def test_the_client_builds_as_its_own_wheel_needing_only_msgpack_and_numpy(tmp_path):
    """`pip install ./clients`: a wheel of trtserve_client alone, whose only requirements are
    msgpack and numpy.  Built the way pip installs it: in an isolated build environment with
    the build backend pyproject.toml names (a fresh venv's bundled setuptools may be too old
    to build wheels on its own)."""
    import zipfile

    import shutil

    clients = tmp_path / "clients"  # a copy: the build must not leave files in the checkout
    shutil.copytree(Path(__file__).resolve().parents[2] / "clients", clients,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path / "dist"), str(clients)], check=True, timeout=240)
    (wheel,) = (tmp_path / "dist").glob("trtserve_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"trtserve_client"}
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in requires) == ["msgpack", "numpy"]
