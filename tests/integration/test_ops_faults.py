"""Faults against a ``trtserve serve`` subprocess: a client killed with SIGKILL mid-flight, a
backend that raises on one batch, a backend that hangs past the deadline, and a reader that
never reads its (big) responses.

After each fault the server must be healthy (live, ready, a correct infer from a fresh
connection), hold no more sockets and threads than before the fault (so the connection's
bookkeeping was released), and its RSS must stay within ``RSS_BOUND_MB`` of the baseline
taken after start-up and a warm-up request: 32 MiB leaves room for allocator noise and is
far below what unbounded buffering costs.  For the slow reader the server runs with
``--max-in-flight 4``, so what that connection may legitimately pin is 4 requests and their
answers (1 MiB with the 256 KiB answers used there) plus kernel socket buffers, which are
not in RSS; buffering every answer it asked for would pin ~250 MiB.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from trtserve_client.frames import pack

from .conftest import GateControl, RawConn, write_model
from .ops_support import (
    OPS_BACKENDS,
    assert_correct_infer,
    assert_healthy,
    log_problems,
    rss_mb,
    server_process,
    socket_count,
    thread_count,
    wait_for,
    write_identity,
)

pytestmark = pytest.mark.timeout(60)

RSS_BOUND_MB = 32  # see the module docstring
MAX_IN_FLIGHT = 4
BIG = 256 * 1024  # bytes in every answer of the "big" model
LATE_S = 0.150  # deadline tolerance, as in test_ops_queue.py: timer wake-up plus a loop hop on 2 loaded cores
EARLY_S = 0.002  # libuv timers count whole milliseconds on a loop clock cached per iteration


class Gate(GateControl):
    def log(self) -> list[list[bytes]]:
        path = self.folder / "log"
        return [line.split(b",") for line in path.read_bytes().splitlines()] if path.exists() else []


@pytest.fixture
def repository(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    gates = root / "_gates"
    write_identity(root)

    def recorder(name: str, extra: str) -> None:
        write_model(root, name, f'backend = "OpsRecorder"\ngate_dir = "{gates / name}"\n{extra}', backend_py=OPS_BACKENDS)

    recorder("hold", "instance_num = 4\n")  # the killed client's requests wait here
    recorder("batcher", "max = 4\n")  # one instance, batches of 4
    recorder("hang", "")  # one instance, held past the deadline
    write_model(root, "big", f'backend = "OpsExpand"\nout_bytes = {BIG}\n', backend_py=OPS_BACKENDS)
    return root


class Served:
    """A server subprocess with its baseline, and the checks every fault test ends with."""

    def __init__(self, proc, repository: Path) -> None:
        self.proc = proc
        self.host, self.port, self.pid = proc.host, proc.port, proc.proc.pid
        self.gates = {name: Gate(repository / "_gates" / name) for name in ("hold", "batcher", "hang")}
        self.sockets = socket_count(self.pid)  # before any client connects: the listener (and loop internals)
        with self.connect() as conn:  # warm-up: the first requests allocate codec and loop state
            for _ in range(20):
                assert_correct_infer(conn)
        self.rss_mb = rss_mb(self.pid)
        self.threads = thread_count(self.pid)

    def connect(self) -> RawConn:
        return RawConn(self.host, self.port)

    def assert_recovered(self) -> None:
        assert_healthy(self.host, self.port)
        # Connections and threads of the fault are gone (listener only, as at the baseline).
        wait_for(lambda: socket_count(self.pid) <= self.sockets, 5, f"sockets back to {self.sockets}")
        wait_for(lambda: thread_count(self.pid) <= self.threads, 5, f"threads back to {self.threads}")
        grown = rss_mb(self.pid) - self.rss_mb
        assert grown < RSS_BOUND_MB, f"server RSS grew {grown:.1f} MiB (bound {RSS_BOUND_MB} MiB)"
        assert not log_problems(self.proc.log()), log_problems(self.proc.log())


@pytest.fixture
def serve(repository, tmp_path):
    """``serve(*extra args)`` -> a started server subprocess with its baseline; gates open and
    the process ends at teardown."""
    started = []

    def start(*args: str) -> Served:
        stack = server_process(repository, tmp_path / f"server-{len(started)}.log", "--log-level", "WARNING", *args)
        proc = stack.__enter__()
        started.append(stack)
        return Served(proc, repository)

    yield start
    for name in ("hold", "batcher", "hang"):
        Gate(repository / "_gates" / name).open()
    for stack in started:
        stack.__exit__(None, None, None)


@pytest.fixture
def served(serve) -> Served:
    return serve()


# --------------------------------------------------------------------------- SIGKILL


KILLED_CLIENT = textwrap.dedent("""
    import asyncio, sys, time
    from trtserve_client import AsyncClient

    async def main(host, port, count):
        client = AsyncClient(host, port)
        await client.connect()
        calls = [asyncio.ensure_future(client.infer("hold", {"x": b"%d" % i})) for i in range(count)]
        # Frames leave in order on the one connection: once live answers, the server has read
        # (and queued) every infer above it.
        await client.live()
        print("sent", client.in_flight, flush=True)
        await asyncio.sleep(60)  # killed long before this ends

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""")


def test_client_killed_with_requests_in_flight(served):
    """A client process pipelines 100 requests against a blocked model and is SIGKILLed.
    Released afterwards, the model and the server serve normally, and the dead connection's
    socket and bookkeeping are gone."""
    hold = served.gates["hold"]
    count = 100  # below the server's per-connection limit of 128, so every one is read
    client = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, served.host, str(served.port), str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready, _, _ = select.select([client.stdout], [], [], 20)
        assert ready, "the client never reported its requests sent"
        line = client.stdout.readline()
        assert line.split() == ["sent", str(count)], (line, client.stderr.read() if client.poll() is not None else "")
        hold.wait_started(4)  # all four instances are blocked, 96 requests queued
        assert socket_count(served.pid) == served.sockets + 1
        os.kill(client.pid, signal.SIGKILL)
        assert client.wait(10) == -signal.SIGKILL
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        client.stdout.close()
        client.stderr.close()
    hold.open()
    with served.connect() as conn:
        result = conn.result("infer", model="hold", inputs={"x": b"after"}, timeout_ms=5000)
        assert result["outputs"]["output"] == b"after"
        stats = conn.result("statistics", model="hold")["models"][0]
    ran = sum(len(batch) for batch in hold.log())
    assert ran <= count + 1 and stats["failure_by_reason"].get("INTERNAL", 0) == 0, (ran, stats)
    served.assert_recovered()


# --------------------------------------------------------------------------- a batch that raises


def test_backend_raising_on_one_batch_fails_that_batch_only(served):
    """Batches of 4 behind a blocked instance: the batch holding b"raise" fails as a whole
    (BACKEND_ERROR for its 4 requests), the batch after it and a later request succeed."""
    gate = served.gates["batcher"]
    with served.connect() as conn:
        first = conn.request("infer", model="batcher", inputs={"x": b"block"})
        gate.wait_started(1)
        labels = [b"a", b"raise", b"b", b"c", b"d", b"e", b"f", b"g"]
        ids = {conn.request("infer", model="batcher", inputs={"x": label}): label for label in labels}
        live = conn.request("live")  # answered once every request above is queued
        assert conn.recv() == {"id": live, "result": {"live": True}}
        gate.open()
        answers = conn.recv_many(len(labels) + 1)
        assert answers[first]["result"]["outputs"]["output"] == b"block"
        outcome = {ids[i]: m.get("error", {}).get("name") or m["result"]["outputs"]["output"] for i, m in answers.items() if i in ids}
        assert outcome == {b"a": "BACKEND_ERROR", b"raise": "BACKEND_ERROR", b"b": "BACKEND_ERROR", b"c": "BACKEND_ERROR",
                           b"d": b"d", b"e": b"e", b"f": b"f", b"g": b"g"}
        failed = next(m for i, m in answers.items() if ids.get(i) == b"raise")["error"]
        assert "asked to fail" in failed["message"] and failed["details"]["batch_size"] == 4, failed
        assert conn.result("infer", model="batcher", inputs={"x": b"h"})["outputs"]["output"] == b"h"
        stats = conn.result("statistics", model="batcher")["models"][0]
    assert gate.log() == [[b"block"], labels[:4], labels[4:], [b"h"]]
    assert stats["nodes"]["batcher"]["failed_batches"] == 1 and stats["nodes"]["batcher"]["batches"] == 4
    assert stats["success_count"] == 6 and stats["failure_by_reason"] == {"BACKEND_ERROR": 4}
    served.assert_recovered()


# --------------------------------------------------------------------------- a backend that hangs


def test_backend_hanging_past_the_deadline(served):
    """A forward that never returns: the client gets DEADLINE_EXCEEDED on time (300 ms, within
    LATE_S), a request queued behind it too; meanwhile other models and health answer; the
    late result, when it finally comes, is dropped and the connection stays usable."""
    hang = served.gates["hang"]
    with served.connect() as conn:
        began = time.monotonic()
        stuck = conn.request("infer", model="hang", inputs={"x": b"stuck"}, timeout_ms=300)
        hang.wait_started(1)
        queued_at = time.monotonic()
        queued = conn.request("infer", model="hang", inputs={"x": b"queued"}, timeout_ms=300)
        expired = {}
        for _ in range(2):
            message = conn.recv()
            expired[message["id"]] = (time.monotonic(), message["error"]["name"])
        assert expired[stuck][1] == expired[queued][1] == "DEADLINE_EXCEEDED", expired
        for req_id, start in ((stuck, began), (queued, queued_at)):
            waited = expired[req_id][0] - start
            assert 0.300 - EARLY_S <= waited <= 0.300 + LATE_S, f"request {req_id}: DEADLINE_EXCEEDED after {waited * 1e3:.0f} ms"
        # The backend is still stuck, and the rest of the server does not care.
        assert hang.started() == [1]
        assert_healthy(served.host, served.port)
        with served.connect() as other:
            assert other.result("infer", model="big", inputs={"x": b"1"})["outputs"]["output"] == b"\x5a" * BIG
        hang.open()
        wait_for(lambda: hang.log() == [[b"stuck"]], 5, "the stuck forward to finish")
        # The late result was dropped: the next frame on this connection answers the next request.
        live = conn.request("live")
        assert conn.recv() == {"id": live, "result": {"live": True}}
        assert conn.result("infer", model="hang", inputs={"x": b"later"})["outputs"]["output"] == b"later"
    assert hang.log() == [[b"stuck"], [b"later"]], "the queued request ran after its deadline"
    served.assert_recovered()


# --------------------------------------------------------------------------- a reader that never reads


def test_slow_reader_does_not_block_others_or_grow_memory(serve):
    """A client sends 1,000 tiny requests whose answers are 256 KiB each and never reads.
    The server must stop serving it once its socket is full instead of buffering ~250 MiB of
    answers; another client's latency stays bounded meanwhile (p50 < 50 ms, max < 500 ms: an
    idle server answers in about a millisecond, and a loop stuck on the slow connection
    would take seconds); server RSS stays within RSS_BOUND_MB of the baseline."""
    served = serve("--max-in-flight", str(MAX_IN_FLIGHT))
    count = 1000
    frames = b"".join(pack({"v": 2, "id": i + 1, "op": "infer", "model": "big", "inputs": {"x": b"1"}}) for i in range(count))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        slow.connect((served.host, served.port))
        slow.setblocking(False)
        offset, last_progress = 0, time.monotonic()
        while offset < len(frames) and time.monotonic() - last_progress < 0.5:
            try:
                offset += slow.send(frames[offset:])
                last_progress = time.monotonic()
            except BlockingIOError:
                select.select([], [slow], [], 0.1)
        # Give the server time to do whatever it will do with what it read: it is done when
        # its RSS stops changing (or has clearly blown the bound).
        previous = None
        for _ in range(40):
            now = rss_mb(served.pid)
            if now == previous or now - served.rss_mb > 4 * RSS_BOUND_MB:
                break
            previous = now
            time.sleep(0.05)
        grown = rss_mb(served.pid) - served.rss_mb
        latencies = []
        with served.connect() as other:
            for _ in range(50):
                began = time.monotonic()
                assert_correct_infer(other)
                latencies.append(time.monotonic() - began)
        latencies.sort()
        assert latencies[25] < 0.050 and latencies[-1] < 0.500, f"p50 {latencies[25] * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms"
        assert grown < RSS_BOUND_MB, f"the server buffered {grown:.0f} MiB for a client that never reads ({offset} bytes of requests sent)"
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # drop it, as a crashed client
    served.assert_recovered()
