"""Queue policy through the server: queue_timeout, per-request timeout_ms, priorities,
QUEUE_FULL, and warmup before READY.

Every model here runs ``OpsRecorder`` on one instance with ``max = 1``: a batch is held
until the test creates the gate's ``open`` file, and the backend logs the items of each
batch in execution order.  So "the backend is still blocked" is a fact the test controls,
and the order of execution is read from the log rather than inferred from timings.

Timing tolerance: a deadline answer must arrive no earlier than the deadline (measured by
the client from before it sent the request, so the server's clock can only start later;
less 2 ms, because the server's loop timer counts whole milliseconds on a loop clock
cached per iteration) and at most 150 ms after it.  150 ms covers the timer thread's wake-up and a loop hop on a
loaded 2-core CI machine; a deadline that is checked only when the queue is next looked at
would answer only when the gate opens (seconds later), and fail.
"""
from __future__ import annotations

import select
import time
from pathlib import Path

import pytest

from .conftest import GateControl, write_model
from .ops_support import OPS_BACKENDS, assert_healthy, write_identity

pytestmark = pytest.mark.timeout(60)

LATE_S = 0.150  # see the module docstring
EARLY_S = 0.002  # the server's loop timer (libuv) counts whole milliseconds on a clock cached per loop iteration
QUEUE_TIMEOUT_MS = 300


def recorder(gates: Path, name: str, extra: str = "") -> str:
    return f"""backend = "OpsRecorder"
gate_dir = "{gates / name}"
max = 1
{extra}"""


@pytest.fixture
def repository(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    gates = root / "_gates"
    write_identity(root)
    write_model(root, "timed", recorder(gates, "timed", f"queue_timeout = {QUEUE_TIMEOUT_MS}\n"), backend_py=OPS_BACKENDS)
    write_model(root, "prio", recorder(gates, "prio", "priority_levels = 3\n"), backend_py=OPS_BACKENDS)
    write_model(root, "full", recorder(gates, "full", "max_queue_size = 2\n"), backend_py=OPS_BACKENDS)
    return root


class Recorder(GateControl):
    def log(self) -> list[list[bytes]]:
        path = self.folder / "log"
        return [line.split(b",") for line in path.read_bytes().splitlines()] if path.exists() else []

    @property
    def is_open(self) -> bool:
        return (self.folder / "open").exists()


@pytest.fixture
def gate(repository):
    """Gate controls by model name; every gate opens at teardown so no work is left held."""
    made: dict[str, Recorder] = {}

    def get(name: str) -> Recorder:
        return made.setdefault(name, Recorder(repository / "_gates" / name))

    yield get
    for control in made.values():
        control.open()


@pytest.fixture
def handle(server_factory):
    return server_factory(model_control="explicit", load_models=["*"])


def block(conn, gate: Recorder, model: str) -> int:
    """Start one request that holds the model's only instance; returns its id."""
    req_id = conn.request("infer", model=model, inputs={"x": b"block"})
    gate.wait_started(1)
    return req_id


def nothing_to_read(conn) -> bool:
    return not conn.frames and not select.select([conn.sock], [], [], 0)[0]


# --------------------------------------------------------------------------- deadlines


def test_queue_timeout_and_per_request_timeouts_fire_on_time_while_the_backend_is_blocked(handle, gate):
    """queue_timeout (300 ms) fails a queued request on time; a shorter timeout_ms (100 ms)
    wins over it; a longer one (5 s) does not extend it.  All three answers arrive while the
    only instance is still blocked, and none of the three ever runs."""
    timed = gate("timed")
    with handle.connect() as holder, handle.connect() as conn:
        blocker = block(holder, timed, "timed")
        cases = {"queue_timeout": (None, 0.300), "shorter": (100, 0.100), "longer": (5000, 0.300)}
        sent, ids = {}, {}
        for case, (timeout_ms, _) in cases.items():
            fields = {} if timeout_ms is None else {"timeout_ms": timeout_ms}
            sent[case] = time.monotonic()
            ids[conn.request("infer", model="timed", inputs={"x": case.encode()}, **fields)] = case
        arrived = {}
        for _ in cases:
            message = conn.recv()
            arrived[ids[message["id"]]] = (time.monotonic(), message)
        for case, (_, deadline) in cases.items():
            at, message = arrived[case]
            waited = at - sent[case]
            assert message.get("error", {}).get("name") == "DEADLINE_EXCEEDED", (case, message)
            assert deadline - EARLY_S <= waited <= deadline + LATE_S, f"{case}: answered after {waited * 1e3:.0f} ms, deadline {deadline * 1e3:.0f} ms"
        # The answers came while the backend was blocked: the gate is shut, the blocker unanswered.
        assert not timed.is_open and timed.started() == [1] and nothing_to_read(holder)
        timed.open()
        answer = holder.recv()
        assert answer["id"] == blocker and answer["result"]["outputs"]["output"] == b"block"
        stats = holder.result("statistics", model="timed")["models"][0]
    assert timed.log() == [[b"block"]], "a request that timed out in the queue still ran"
    # The 100 ms case races the scheduler's timer against the server's loop timer; whichever
    # wins, the request is dropped from the queue and counted once as a failure.
    assert stats["success_count"] == 1 and stats["failure_by_reason"] == {"DEADLINE_EXCEEDED": 3}, stats
    assert_healthy(handle.host, handle.port)


# --------------------------------------------------------------------------- priorities


def test_priorities_are_served_first(handle, gate):
    """priority_levels = 3, one blocked instance: after release, level 1 runs first, then 2,
    then 3; requests without a priority take the default (the lowest) level; FIFO within a
    level."""
    prio = gate("prio")
    sends = [(b"p3-a", 3), (b"p1-a", 1), (b"none-a", None), (b"p2-a", 2), (b"p1-b", 1),
             (b"p3-b", 3), (b"p2-b", 2), (b"none-b", None), (b"p1-c", 1)]
    with handle.connect() as conn:
        block(conn, prio, "prio")
        for label, level in sends:
            fields = {} if level is None else {"priority": level}
            conn.request("infer", model="prio", inputs={"x": label}, **fields)
        # Frames on one connection are handled in order: once this answer is back, every
        # request above is queued behind the blocked instance.
        live = conn.request("live")
        assert conn.recv() == {"id": live, "result": {"live": True}}
        assert prio.started() == [1]
        assert conn.error("infer", model="prio", inputs={"x": b"p4"}, priority=4)["name"] == "INVALID_ARGUMENT"
        prio.open()
        answers = conn.recv_many(len(sends) + 1)
    assert all("result" in m for m in answers.values()), answers
    expected = [b"block", b"p1-a", b"p1-b", b"p1-c", b"p2-a", b"p2-b", b"p3-a", b"none-a", b"p3-b", b"none-b"]
    assert [batch[0] for batch in prio.log()] == expected


# --------------------------------------------------------------------------- QUEUE_FULL


def test_queue_full_is_refused_at_enqueue_while_the_backend_is_blocked(handle, gate):
    """max_queue_size = 2: with the instance blocked and two requests queued, a third is
    refused QUEUE_FULL at once; the accepted ones all run once the gate opens."""
    full = gate("full")
    with handle.connect() as conn:
        blocker = block(conn, full, "full")
        queued = [conn.request("infer", model="full", inputs={"x": b"q%d" % i}) for i in range(2)]
        began = time.monotonic()
        refusal = conn.call("infer", model="full", inputs={"x": b"q2"})
        waited = time.monotonic() - began
        assert refusal["error"]["name"] == "QUEUE_FULL", refusal
        # "At once": no deadline or timer is involved, only a loop round trip; 150 ms is
        # generous on a loaded 2-core machine, and nothing is released before open().
        assert waited < LATE_S, f"QUEUE_FULL took {waited * 1e3:.0f} ms"
        assert not full.is_open and full.started() == [1]
        full.open()
        answers = conn.recv_many(3)
        assert sorted(answers) == sorted([blocker, *queued])
        assert all("result" in m for m in answers.values()), answers
        stats = conn.result("statistics", model="full")["models"][0]
    assert stats["failure_by_reason"] == {"QUEUE_FULL": 1} and stats["success_count"] == 3
    assert [batch[0] for batch in full.log()] == [b"block", b"q0", b"q1"]


# --------------------------------------------------------------------------- warmup


WARMUP = """
[[warmup]]
count = 3
[warmup.inputs.x]
dtype = "bytes"
file = "sample.bin"
"""


def test_model_is_ready_only_after_its_warmup_ran(handle, gate, repository):
    """While its warmup is held, a loading model is LOADING, not ready, and refuses infer
    with MODEL_UNAVAILABLE; it becomes READY when the warmup finishes.  Warm-up runs on the
    instances, so the statistics count only traffic."""
    warm = gate("warm")
    folder = write_model(repository, "warm", recorder(repository / "_gates", "warm") + WARMUP, backend_py=OPS_BACKENDS)
    (folder / "sample.bin").write_bytes(b"warmup")
    with handle.connect() as loader, handle.connect() as conn:
        load = loader.request("load", model="warm")
        warm.wait_started(1)
        row = next(r for r in conn.result("repository_index")["models"] if r["name"] == "warm")
        assert row["state"] == "LOADING", row
        assert conn.result("ready", model="warm") == {"ready": False}
        refused = conn.error("infer", model="warm", inputs={"x": b"early"})
        assert refused["name"] == "MODEL_UNAVAILABLE" and refused["details"]["state"] == "LOADING", refused
        assert nothing_to_read(loader), "load answered before its warmup finished"
        warm.open()
        assert loader.recv() == {"id": load, "result": {"name": "warm", "version": 1, "state": "READY"}}
        assert conn.result("ready", model="warm") == {"ready": True}
        stats = conn.result("statistics", model="warm")["models"][0]
        assert conn.result("infer", model="warm", inputs={"x": b"late"})["outputs"]["output"] == b"late"
    assert stats["success_count"] == 0 and stats["nodes"]["warm"]["batches"] == 0, stats
    assert warm.log() == [[b"warmup"]] * 3 + [[b"late"]]


def test_failing_warmup_leaves_the_model_unavailable_with_the_reason(handle, gate, repository):
    bad = gate("bad_warm")
    bad.open()  # nothing is held: the warmup sample itself fails
    folder = write_model(repository, "bad_warm", recorder(repository / "_gates", "bad_warm") + WARMUP, backend_py=OPS_BACKENDS)
    (folder / "sample.bin").write_bytes(b"raise")
    with handle.connect() as conn:
        error = conn.error("load", model="bad_warm")
        assert error["name"] == "MODEL_UNAVAILABLE" and "warmup sample 0 failed" in error["message"], error
        row = next(r for r in conn.result("repository_index")["models"] if r["name"] == "bad_warm")
        assert row["state"] == "UNAVAILABLE" and "warmup sample 0 failed" in row["reason"], row
        assert "asked to fail" in row["reason"], row
        assert conn.result("ready", model="bad_warm") == {"ready": False}
        refused = conn.error("infer", model="bad_warm", inputs={"x": b"x"})
        assert refused["name"] == "MODEL_UNAVAILABLE" and "warmup" in refused["details"]["reason"], refused
    assert bad.log() == [[b"raise"]], "the failed warmup should stop at its first failing run"
    assert_healthy(handle.host, handle.port)
