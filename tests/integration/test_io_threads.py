"""Several I/O loops (``io_threads``): connections spread over them, answered on the loop
that read them, one connection limit and one memory budget for the whole server, and a
shutdown that drains every loop.  Real servers on 127.0.0.1, real sockets."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from trtserve_client import Client

from trtserve.errors import ConfigError
from trtserve.server import Server

from .conftest import HOST, RawConn
from .ops_support import assert_cli_refuses
from .test_ops_access import assert_refused
from .test_ops_metrics import scrape, value

pytestmark = pytest.mark.timeout(90)


def loop_connections(handle) -> list[int]:
    return [len(shard.tracker.connections) for shard in handle.server.shards]


def wait_for(predicate, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < give_up, "condition never became true"
        time.sleep(0.01)


def io_thread_names() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("trtserve-io-")]


def test_connections_spread_over_the_loops_and_every_answer_is_right(server_factory):
    handle = server_factory(io_threads=3)
    assert handle.server.io_threads == 3 and len(io_thread_names()) >= 2
    clients = [Client(handle.host, handle.port, timeout=20) for _ in range(6)]
    try:
        for client in clients:
            assert client.live() is True
        wait_for(lambda: loop_connections(handle) == [2, 2, 2])

        def work(index: int) -> int:
            rng = np.random.default_rng(index)
            client = clients[index]
            for round_ in range(40):
                rows = rng.random((1 + round_ % 8, 4), dtype=np.float32)
                out = client.infer("identity", {"input": rows})["output"]
                np.testing.assert_array_equal(out, rows)
            blob = rng.bytes(4 << 20)  # a big frame on every loop at once
            assert bytes(client.infer("blob", {"blob": blob})["echoed"]) == blob
            return index

        with ThreadPoolExecutor(6) as pool:
            assert sorted(pool.map(work, range(6))) == list(range(6))
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: loop_connections(handle) == [0, 0, 0])


def test_the_connection_limit_is_the_servers_not_each_loops(server_factory, gates):
    handle = server_factory(io_threads=2, max_connections=3)
    conns = [handle.connect() for _ in range(3)]
    try:
        held = [conn.request("infer", model="gate_wide", inputs={"x": b"held"}) for conn in conns]
        gates["gate_wide"].wait_started(3)
        assert sorted(loop_connections(handle)) == [1, 2]
        assert handle.server.in_flight == 3  # every loop's (a Ray replica reports it to its autoscaler)
        with handle.connect() as fourth:  # every connection busy: no loop can make room
            error = assert_refused(fourth, None, "RESOURCE_EXHAUSTED")
        assert error["details"] == {"max_connections": 3} and "--max-connections 3" in error["message"]
        gates["gate_wide"].open()
        for conn, request_id in zip(conns, held):
            assert conn.recv()["id"] == request_id
    finally:
        for conn in conns:
            conn.close()


def test_shutdown_answers_what_every_loop_has_in_flight(repository, gates):
    from .conftest import ServerThread

    handle = ServerThread(repository, io_threads=3).start()
    conns = [handle.connect(timeout=20) for _ in range(3)]
    try:
        held = [conn.request("infer", model="gate_wide", inputs={"x": b"%d" % i}) for i, conn in enumerate(conns)]
        gates["gate_wide"].wait_started(3)
        assert loop_connections(handle) == [1, 1, 1]
        stopping = threading.Thread(target=handle.stop, kwargs={"grace_s": 20})
        stopping.start()
        wait_for(lambda: not handle.server.dispatcher.ready)
        gates["gate_wide"].open()
        for i, (conn, request_id) in enumerate(zip(conns, held)):
            answer = conn.recv()
            assert answer["id"] == request_id and answer["result"]["outputs"]["output"] == b"%d" % i, answer
            conn.assert_closed()
        stopping.join(30)
        assert not stopping.is_alive()
    finally:
        for conn in conns:
            conn.close()
        handle.stop()
    wait_for(lambda: not io_thread_names(), timeout=5)


def test_metrics_count_the_connections_of_every_loop(server_factory):
    handle = server_factory(io_threads=2, metrics_port=0)
    conns = [handle.connect() for _ in range(4)]
    try:
        for conn in conns:
            assert conn.result("live") == {"live": True}
        wait_for(lambda: loop_connections(handle) == [2, 2])
        assert value(scrape(handle), "trtserve_connections") == 4
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("bad", [0, -1, 2.0, "4"])
def test_io_threads_must_be_a_positive_integer(repository, bad):
    with pytest.raises(ConfigError, match=f"io_threads must be a positive integer, got {bad!r}"):
        Server(repository, host=HOST, io_threads=bad)


def test_more_loops_than_connections_are_not_started(repository):
    assert Server(repository, host=HOST, io_threads=4, max_connections=2).io_threads == 2


def test_a_raw_peer_is_served_on_a_second_loop(server_factory):
    handle = server_factory(io_threads=2)
    with handle.connect() as first, RawConn(handle.host, handle.port) as second:
        assert first.result("live") == {"live": True}
        assert second.result("live") == {"live": True}
        assert loop_connections(handle) == [1, 1]


@pytest.mark.parametrize(("value", "shown"), [("0", "0"), ("two", "'two'")])
def test_the_cli_refuses_an_io_threads_that_is_not_a_positive_integer(repository, tmp_path, value, shown):
    assert_cli_refuses(repository, tmp_path, ["--io-threads", value],
                       f"argument --io-threads: expected a positive integer, got {shown}")
