"""Inline models over the network: a burst of frames read together runs as one batch on
the event loop, every answer is its own request's, and failures stay typed and local."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from trtserve_client.errors import ErrorCode
from trtserve_client.frames import pack

from .conftest import SUPPORT_BACKENDS, array, assert_serving, build_test_repository, tensor, write_model

INLINE_IDENTITY = """backend = "Identity"
inline = true
max = 64
[[input]]
name = "input"
dtype = "float32"
shape = [-1, 4]
"""


def _repository(tmp_path: Path) -> Path:
    root = build_test_repository(tmp_path / "repo")
    write_model(root, "fast", INLINE_IDENTITY)
    write_model(root, "fast_flaky", 'backend = "Flaky"\ninline = true\nmax = 8\n', backend_py=SUPPORT_BACKENDS)
    return root


pytestmark = pytest.mark.parametrize("repository", [_repository], indirect=True)


def _burst(conn, model: str, values: list, **fields) -> dict[int, dict]:
    """Send every request in one write (so the server reads them together); answers by id."""
    frames = [pack({"v": 2, "id": i + 1, "op": "infer", "model": model, "inputs": {"input": v}, **fields})
              for i, v in enumerate(values)]
    conn.send_bytes(b"".join(frames))
    return conn.recv_many(len(values))


def test_a_burst_runs_as_one_batch_and_each_answer_is_its_own(server):
    rows = [np.full((1 + i % 3, 4), i, np.float32) for i in range(16)]
    with server.connect() as conn:
        answers = _burst(conn, "fast", [tensor(r) for r in rows])
        stats = conn.result("statistics", model="fast")["models"][0]
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(array(answers[i + 1]["result"]["outputs"]["output"]), row)
    assert stats["success_count"] == 16
    assert stats["batch_sizes"] == {str(sum(len(r) for r in rows)): 1}, "the burst is one batch of all its rows"


def test_a_burst_over_max_rows_splits_into_batches(server):
    rows = [np.full((8, 4), i, np.float32) for i in range(10)]  # 80 rows, max 64
    with server.connect() as conn:
        answers = _burst(conn, "fast", [tensor(r) for r in rows])
        stats = conn.result("statistics", model="fast")["models"][0]
    assert all(np.array_equal(array(answers[i + 1]["result"]["outputs"]["output"]), r) for i, r in enumerate(rows))
    assert stats["batch_sizes"] == {"64": 1, "16": 1}


def test_bad_requests_in_a_burst_fail_alone(server):
    good = tensor(np.ones((1, 4), np.float32))
    values = [good, tensor(np.ones((1, 3), np.float32)), good, tensor(np.ones((1, 4), np.int32)), good]
    with server.connect() as conn:
        answers = _burst(conn, "fast", values)
    assert [("error" in answers[i]) for i in range(1, 6)] == [False, True, False, True, False]
    assert answers[2]["error"]["code"] == answers[4]["error"]["code"] == int(ErrorCode.INVALID_INPUT)


def test_a_failing_forward_fails_its_batch_and_the_server_keeps_serving(server):
    with server.connect() as conn:
        answers = _burst(conn, "fast_flaky", [b"ok", b"raise"])
        assert {answers[i]["error"]["name"] for i in (1, 2)} == {"BACKEND_ERROR"}  # one batch, one failure
        answers = _burst(conn, "fast_flaky", [b"ok", b"skip"])
        assert answers[1]["result"]["outputs"]["output"] == b"ok"
        assert answers[2]["error"]["name"] == "NO_RESULT"
    assert_serving(server.host, server.port)


def test_a_deadline_on_an_inline_request_that_answers_at_once(server):
    rows = [np.full((1, 4), i, np.float32) for i in range(4)]
    with server.connect() as conn:
        answers = _burst(conn, "fast", [tensor(r) for r in rows], timeout_ms=1000)
        stats = conn.result("statistics", model="fast")["models"][0]
    assert all("result" in answers[i + 1] for i in range(4))
    assert stats["success_count"] == 4 and stats["failure_count"] == 0


def test_inline_and_threaded_models_mix_on_one_connection(server):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with server.connect() as conn:
        frames = []
        for i in range(20):
            model = "fast" if i % 2 else "identity"
            frames.append(pack({"v": 2, "id": i + 1, "op": "infer", "model": model, "inputs": {"input": tensor(x + i)}}))
        conn.send_bytes(b"".join(frames))
        answers = conn.recv_many(20)
    for i in range(20):
        np.testing.assert_array_equal(array(answers[i + 1]["result"]["outputs"]["output"]), x + i)


def test_a_burst_larger_than_the_in_flight_limit_is_answered_whole(server_factory, repository):
    """Frames past max_in_flight wait in the backlog; the inline answers free the slots
    and the rest of the burst goes on (read in one socket read, none is stranded)."""
    handle = server_factory(repository, max_in_flight_per_connection=4)
    x = np.ones((1, 4), np.float32)
    with handle.connect() as conn:
        answers = _burst(conn, "fast", [tensor(x * i) for i in range(10)])
        stats = conn.result("statistics", model="fast")["models"][0]
    assert sorted(answers) == list(range(1, 11))
    assert all(np.array_equal(array(answers[i + 1]["result"]["outputs"]["output"]), x * i) for i in range(10))
    assert stats["success_count"] == 10
