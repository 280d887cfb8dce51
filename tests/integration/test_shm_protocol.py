"""System shared memory on the wire: real POSIX objects (multiprocessing.shared_memory), a
real server, real sockets.

Covers the reference forms (tensor and raw-bytes inputs, outputs written into regions,
inline and referenced inputs mixed), every bad reference with its typed error and
``details.reason`` (the server keeps serving after each), two connections that try to use,
list and unregister each other's regions, the per-connection limits, unregistering a
region that a held request still uses, and that a region's mapping leaves the server's
address space when its connection closes or the server stops (read from /proc/self/maps:
the in-process server shares this process).
"""
from __future__ import annotations

import os
import time
from multiprocessing import shared_memory

import numpy as np
import pytest

from trtserve.server.shm import ALIVE_CHECK_S

from .conftest import array, assert_serving, tensor
from .ops_support import wait_for

pytestmark = pytest.mark.timeout(60)

X = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture
def segments():
    """``make(size)`` -> a new POSIX shared-memory object; every one is unlinked after the test."""
    made: list[shared_memory.SharedMemory] = []

    def make(size: int = 4096) -> shared_memory.SharedMemory:
        shm = shared_memory.SharedMemory(create=True, size=size)
        made.append(shm)
        return shm

    yield make
    for shm in made:
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass  # the test removed it


def ref(region: str, offset: int = 0, byte_size: int = 32, dtype: str = "float32", shape=(2, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "shm": {"region": region, "offset": offset, "byte_size": byte_size}}


def put(shm: shared_memory.SharedMemory, array: np.ndarray, offset: int = 0) -> None:
    np.frombuffer(shm.buf, np.uint8, array.nbytes, offset)[:] = array.reshape(-1).view(np.uint8)


def mapped(key: str) -> bool:
    """Whether this process maps the object ``key``: once the test closed its own mapping,
    whether the in-process server still does."""
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(f"/dev/shm/{key.lstrip('/')}") for line in maps)


def register(conn, name: str, shm, byte_size: int | None = None, **fields) -> dict:
    return conn.result("shm_register", name=name, key=shm.name, byte_size=byte_size or shm.size, **fields)


def reason(error: dict) -> str:
    return error["details"].get("reason")


# --------------------------------------------------------------------------- round trips


def test_tensor_in_and_out_through_regions(server, segments):
    shm = segments()
    put(shm, X)
    with server.connect() as conn:
        row = register(conn, "io", shm)
        assert row == {"name": "io", "kind": "system", "byte_size": 4096, "in_use": 0, "unregistering": False,
                       "key": "/" + shm.name, "offset": 0}
        result = conn.result("infer", model="identity", inputs={"input": ref("io")})
        np.testing.assert_array_equal(array(result["outputs"]["output"]), X)  # referenced in, inline out
        result = conn.result("infer", model="identity", inputs={"input": ref("io")},
                             shm_outputs={"output": {"region": "io", "offset": 1024, "byte_size": 64}})
        assert result["outputs"] == {"output": {"dtype": "float32", "shape": [2, 4],
                                                "shm": {"region": "io", "offset": 1024, "byte_size": 32}}}
        np.testing.assert_array_equal(np.frombuffer(shm.buf, np.float32, 8, 1024).reshape(2, 4), X)


def test_inline_out_into_a_region_and_a_region_at_an_offset_of_its_object(server, segments):
    shm = segments(3 * 4096)
    with server.connect() as conn:
        register(conn, "tail", shm, byte_size=4096 + 100, offset=4096 + 7)  # not page-aligned
        conn.result("infer", model="identity", inputs={"input": tensor(X)},
                    shm_outputs={"output": {"region": "tail", "offset": 4096, "byte_size": 100}})
        np.testing.assert_array_equal(np.frombuffer(shm.buf, np.float32, 8, 4096 + 7 + 4096), X.ravel())


def test_raw_bytes_and_mixed_inputs(server, segments):
    shm = segments()
    shm.buf[10:15] = b"hello"
    a = np.array([1.5, 2.5, 3.5], np.float32)
    put(shm, a, offset=64)
    with server.connect() as conn:
        register(conn, "r", shm)
        result = conn.result("infer", model="blob", inputs={"blob": {"shm": {"region": "r", "offset": 10, "byte_size": 5}}},
                             shm_outputs={"echoed": {"region": "r", "offset": 200, "byte_size": 16}})
        assert result["outputs"]["echoed"] == {"shm": {"region": "r", "offset": 200, "byte_size": 5}}
        assert bytes(shm.buf[200:205]) == b"hello"
        result = conn.result("infer", model="pair", inputs={"a": ref("r", 64, 12, shape=[3]), "b": tensor(np.arange(3))},
                             shm_outputs={"b": {"region": "r", "offset": 512, "byte_size": 24}})
        np.testing.assert_array_equal(array(result["outputs"]["a"]), a)
        np.testing.assert_array_equal(np.frombuffer(shm.buf, np.int64, 3, 512), np.arange(3))


def test_empty_tensor_by_reference(server, segments):
    shm = segments()
    with server.connect() as conn:
        register(conn, "r", shm)
        result = conn.result("infer", model="identity", inputs={"input": ref("r", 0, 0, shape=[0, 4])})
        assert array(result["outputs"]["output"]).shape == (0, 4)


# --------------------------------------------------------------------------- bad references


@pytest.mark.parametrize("inputs, outputs, code, why", [
    ({"input": ref("nope")}, None, "INVALID_INPUT", "unknown_region"),
    ({"input": ref("r", offset=4090)}, None, "INVALID_INPUT", "out_of_bounds"),
    ({"input": ref("r", byte_size=16)}, None, "INVALID_INPUT", "size_mismatch"),
    ({"input": ref("r", byte_size=5000, shape=[1250])}, None, "INVALID_INPUT", "out_of_bounds"),
    ({"input": {"dtype": "float32", "shape": [2, 4], "shm": {"region": "r", "offset": -1, "byte_size": 32}}}, None,
     "INVALID_INPUT", "malformed"),
    ({"input": {"dtype": "float32", "shape": [2, 4], "shm": "r"}}, None, "INVALID_INPUT", "malformed"),
    ({"input": tensor(X)}, {"output": {"region": "nope", "offset": 0, "byte_size": 32}}, "INVALID_ARGUMENT", "unknown_region"),
    ({"input": tensor(X)}, {"output": {"region": "r", "offset": 4080, "byte_size": 32}}, "INVALID_ARGUMENT", "out_of_bounds"),
    ({"input": tensor(X)}, {"output": {"region": "r", "offset": 0, "byte_size": 31}}, "INVALID_ARGUMENT", "too_small"),
    ({"input": tensor(X)}, {"output": {"region": "r", "byte_size": 32.0}}, "INVALID_ARGUMENT", "malformed"),
])
def test_every_bad_reference_is_typed_and_the_server_goes_on(server, segments, inputs, outputs, code, why):
    shm = segments()
    with server.connect() as conn:
        register(conn, "r", shm)
        fields = {} if outputs is None else {"shm_outputs": outputs}
        error = conn.error("infer", model="identity", inputs=inputs, **fields)
        assert (error["name"], reason(error)) == (code, why), error
        assert "r" in error["message"] or "nope" in error["message"] or why == "malformed"
        assert conn.result("shm_status")["regions"][0]["in_use"] == 0  # refused requests hold nothing
        np.testing.assert_array_equal(array(conn.result("infer", model="identity", inputs={"input": tensor(X)})["outputs"]["output"]), X)
    assert_serving(server.host, server.port)


def test_shm_outputs_must_name_outputs_of_the_answer(server, segments):
    shm = segments()
    with server.connect() as conn:
        register(conn, "r", shm)
        slot = {"region": "r", "offset": 0, "byte_size": 64}
        error = conn.error("infer", model="identity", inputs={"input": tensor(X)}, shm_outputs={"nope": slot})
        assert error["name"] == "INVALID_ARGUMENT" and error["details"]["expected"] == ["output"]
        error = conn.error("infer", model="pair", inputs={"a": tensor(X[0]), "b": tensor(np.arange(4))},
                           outputs=["a"], shm_outputs={"b": slot})  # not among the selected outputs
        assert error["name"] == "INVALID_ARGUMENT" and error["details"]["expected"] == ["a"]
        error = conn.error("infer", model="echo", inputs={"x": tensor(X)}, shm_outputs={"nope": slot})
        assert error["name"] == "INVALID_ARGUMENT" and "returned no output 'nope'" in error["message"]
        assert conn.error("infer", model="identity", inputs={"input": tensor(X)}, shm_outputs=[])["name"] == "INVALID_ARGUMENT"


def test_a_region_that_vanished_or_shrank_is_refused(server, segments):
    shm = segments()
    with server.connect() as conn:
        register(conn, "gone", shm)
        shm.unlink()  # removed from /dev/shm: the server's mapping no longer reaches the client's object
        time.sleep(2 * ALIVE_CHECK_S)  # the server looks at most this often
        error = conn.error("infer", model="identity", inputs={"input": ref("gone")})
        assert (error["name"], reason(error)) == ("INVALID_INPUT", "vanished")
        assert "/dev/shm" in error["message"]
        small = segments()
        register(conn, "small", small)
        os.truncate(f"/dev/shm/{small.name}", 16)  # touching the lost pages would be SIGBUS
        time.sleep(2 * ALIVE_CHECK_S)
        error = conn.error("infer", model="identity", inputs={"input": tensor(X)},
                           shm_outputs={"output": {"region": "small", "offset": 0, "byte_size": 32}})
        assert (error["name"], reason(error)) == ("INVALID_ARGUMENT", "vanished")
    assert_serving(server.host, server.port)


@pytest.mark.parametrize("fields, code, why", [
    ({"name": "a", "key": "/trtserve-test-no-such-object", "byte_size": 8}, "INVALID_ARGUMENT", "not_found"),
    ({"name": "a", "key": "../etc/passwd", "byte_size": 8}, "INVALID_ARGUMENT", "malformed"),
    ({"name": "a", "key": "a/b", "byte_size": 8}, "INVALID_ARGUMENT", "malformed"),
    ({"name": "a", "key": "..", "byte_size": 8}, "INVALID_ARGUMENT", "malformed"),
    ({"name": "", "key": "SEG", "byte_size": 8}, "INVALID_ARGUMENT", "malformed"),
    ({"name": "a", "key": "SEG", "byte_size": 0}, "INVALID_ARGUMENT", "malformed"),
    ({"name": "a", "key": "SEG", "byte_size": 4097}, "INVALID_ARGUMENT", "out_of_bounds"),
    ({"name": "a", "key": "SEG", "byte_size": 8, "offset": 4090}, "INVALID_ARGUMENT", "out_of_bounds"),
    ({"name": "a", "key": "SEG", "byte_size": 8, "kind": "gpu"}, "INVALID_ARGUMENT", "malformed"),
    ({"name": "a", "kind": "cuda", "handle": b"\x00" * 10, "device": 0, "byte_size": 8}, "INVALID_ARGUMENT", "malformed"),
    ({"name": "a", "kind": "cuda", "handle": b"\x00" * 64, "device": -1, "byte_size": 8}, "INVALID_ARGUMENT", "malformed"),
])
def test_bad_registrations_are_typed(server, segments, fields, code, why):
    shm = segments()
    fields = {k: (shm.name if v == "SEG" else v) for k, v in fields.items()}
    with server.connect() as conn:
        error = conn.error("shm_register", **fields)
        assert (error["name"], reason(error)) == (code, why), error
        assert conn.result("shm_status")["regions"] == []


def test_a_cuda_region_on_a_server_without_cuda_is_a_device_error(server):
    from trtserve import cuda

    if cuda.is_available():
        pytest.skip("this machine has a CUDA device (tests/gpu/test_cuda_ipc.py covers it)")
    with server.connect() as conn:
        error = conn.error("shm_register", name="g", kind="cuda", handle=b"\x00" * 64, device=0, byte_size=8)
        assert error["name"] == "DEVICE_ERROR" and "system shared memory instead" in error["message"]


def test_names_are_unique_per_connection_and_reusable_after_unregister(server, segments):
    shm = segments()
    with server.connect() as conn:
        register(conn, "r", shm)
        error = conn.error("shm_register", name="r", key=shm.name, byte_size=8)
        assert reason(error) == "exists"
        assert conn.result("shm_unregister", name="r") == {"unregistered": ["r"]}
        assert reason(conn.error("shm_unregister", name="r")) == "unknown_region"
        assert reason(conn.error("infer", model="identity", inputs={"input": ref("r")})) == "unknown_region"
        register(conn, "r", shm)
        register(conn, "s", shm)
        assert conn.result("shm_unregister") == {"unregistered": ["r", "s"]}  # no name: every region


# --------------------------------------------------------------------------- ownership


def test_two_connections_cannot_use_each_others_regions(server, segments):
    mine, theirs = segments(), segments()
    put(mine, X)
    put(theirs, X + 100)
    with server.connect() as a, server.connect() as b:
        register(a, "r", mine)
        # b sees nothing of a's region: not in inputs, outputs, status or unregister.
        assert reason(b.error("infer", model="identity", inputs={"input": ref("r")})) == "unknown_region"
        assert reason(b.error("infer", model="identity", inputs={"input": tensor(X)},
                              shm_outputs={"output": {"region": "r", "offset": 0, "byte_size": 32}})) == "unknown_region"
        assert b.result("shm_status")["regions"] == []
        assert reason(b.error("shm_status", name="r")) == "unknown_region"
        assert reason(b.error("shm_unregister", name="r")) == "unknown_region"
        assert b.result("shm_unregister") == {"unregistered": []}
        # The same name on b is b's own region: each connection reads its own object.
        register(b, "r", theirs)
        np.testing.assert_array_equal(array(a.result("infer", model="identity", inputs={"input": ref("r")})["outputs"]["output"]), X)
        np.testing.assert_array_equal(array(b.result("infer", model="identity", inputs={"input": ref("r")})["outputs"]["output"]), X + 100)
        assert [r["key"] for r in a.result("shm_status")["regions"]] == ["/" + mine.name]


def test_regions_are_released_when_the_connection_closes(server, segments):
    shm = segments()
    shm.close()  # only the server maps it now
    assert not mapped(shm.name)
    conn = server.connect()
    register(conn, "r", shm)
    conn.result("infer", model="identity", inputs={"input": ref("r")})  # views of it went to the model and back
    assert mapped(shm.name)
    conn.close()
    wait_for(lambda: not server.call(lambda: len(server.server.shm.tables)), what="the connection's table to go")
    wait_for(lambda: not mapped(shm.name), what="the mapping to go")


def test_regions_are_released_when_the_server_stops(server_factory, segments):
    shm = segments()
    shm.close()  # only the server maps it now
    handle = server_factory()
    conn = handle.connect()
    register(conn, "r", shm)
    assert mapped(shm.name)
    handle.stop()
    conn.close()
    wait_for(lambda: not mapped(shm.name), what="the mapping to go")


def test_limits_per_connection(server_factory, segments):
    handle = server_factory(shm_max_regions=2, shm_max_bytes=6000)
    shm = segments()
    with handle.connect() as conn, handle.connect() as other:
        register(conn, "a", shm, byte_size=4000)
        error = conn.error("shm_register", name="b", key=shm.name, byte_size=2001)
        assert error["name"] == "RESOURCE_EXHAUSTED" and error["details"]["max_bytes"] == 6000
        register(conn, "b", shm, byte_size=2000)
        error = conn.error("shm_register", name="c", key=shm.name, byte_size=1)
        assert error["name"] == "RESOURCE_EXHAUSTED" and error["details"]["max_regions"] == 2
        register(other, "c", shm, byte_size=4000)  # limits are per connection
        conn.result("shm_unregister", name="a")
        register(conn, "c", shm, byte_size=1)
        status = conn.result("shm_status")
        assert (status["mapped_bytes"], status["max_regions"], status["max_bytes"]) == (2001, 2, 6000)


def test_shared_memory_can_be_switched_off(server_factory, segments):
    handle = server_factory(shared_memory=False)
    shm = segments()
    with handle.connect() as conn:
        for op, fields in (("shm_register", {"name": "r", "key": shm.name, "byte_size": 8}), ("shm_status", {}),
                           ("shm_unregister", {})):
            assert conn.error(op, **fields)["name"] == "PERMISSION_DENIED"
        assert reason(conn.error("infer", model="identity", inputs={"input": ref("r")})) == "unknown_region"


# --------------------------------------------------------------------------- unregister while in use


def test_unregister_while_a_request_uses_the_region(server, segments, gates):
    shm = segments()
    put(shm, X)
    with server.connect() as conn:
        register(conn, "r", shm)
        held = conn.request("infer", model="gate", inputs={"x": ref("r")},
                            shm_outputs={"output": {"region": "r", "offset": 256, "byte_size": 32}})
        gates["gate"].wait_started(1)
        assert conn.result("shm_status", name="r")["regions"][0]["in_use"] == 1
        unregister = conn.request("shm_unregister", name="r")
        # Gone for new requests at once, with a reason that says why...
        error = conn.error("infer", model="identity", inputs={"input": ref("r")})
        assert (error["name"], reason(error)) == ("INVALID_INPUT", "unregistered")
        row = conn.result("shm_status")["regions"][0]
        assert (row["name"], row["in_use"], row["unregistering"]) == ("r", 1, True)
        gates["gate"].open()
        # ... while the request that held it finishes with its output written, and only
        # then does the unregister answer.
        answers = conn.recv_many(2)
        assert answers[held]["result"]["outputs"]["output"]["shm"] == {"region": "r", "offset": 256, "byte_size": 32}
        np.testing.assert_array_equal(np.frombuffer(shm.buf, np.float32, 8, 256).reshape(2, 4), X)
        assert answers[unregister]["result"] == {"unregistered": ["r"]}
        assert conn.result("shm_status")["regions"] == []
        register(conn, "r", shm)  # the name is free again


def test_a_connection_that_closes_while_its_unregister_waits(server, segments, gates, caplog):
    shm = segments()
    put(shm, X)
    conn = server.connect()
    register(conn, "r", shm)
    conn.request("infer", model="gate", inputs={"x": ref("r")})
    gates["gate"].wait_started(1)
    conn.request("shm_unregister", name="r")
    conn.abort()  # a reset: the unregister's answer and the held request's are dropped with the connection
    wait_for(lambda: not server.call(lambda: len(server.server.shm.tables)), what="the connection's table to go")
    gates["gate"].open()  # the held request finishes and lets go of a region nobody owns any more
    wait_for(lambda: server.call(lambda: server.server.tracker.in_flight == 0), what="the held request to end")
    assert_serving(server.host, server.port)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
