"""Shared memory through the client library (Client and AsyncClient) against a real server:
in-process, and ``trtserve serve`` as a second process.

Regions are registered on every pooled connection and again after a reconnect; inputs go
as references, outputs come back as numpy views of the client's own region; unregistering
releases both sides (an object the client created is removed from /dev/shm).
"""
from __future__ import annotations

import asyncio
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

from trtserve_client import AsyncClient, Client
from trtserve_client.errors import InvalidArgumentError, InvalidInputError, ResourceExhaustedError

from .ops_support import wait_for

pytestmark = pytest.mark.timeout(60)

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def exists(key: str) -> bool:
    return os.path.exists(f"/dev/shm/{key.lstrip('/')}")


def test_inputs_and_outputs_through_regions(server):
    with Client(server.host, server.port) as client:
        inp = client.register_system_shm("in", 4096)
        out = client.register_system_shm("out", 4096)
        result = client.infer("identity", {"input": inp.write(X)}, shm_outputs={"output": out})
        assert isinstance(result["output"], np.ndarray)
        np.testing.assert_array_equal(result["output"], X)
        assert np.shares_memory(result["output"], out.ndarray(1024, np.uint8))  # a view of the region, no copy
        # Filled in place, then referenced; an output slot at an offset; raw bytes.
        inp.ndarray((2, 4), np.float32, offset=64)[...] = X * 3
        result = client.infer("identity", {"input": inp.tensor((2, 4), np.float32, offset=64)},
                              shm_outputs={"output": out.slot(offset=512, byte_size=32)})
        np.testing.assert_array_equal(result["output"], X * 3)
        np.testing.assert_array_equal(out.ndarray((2, 4), np.float32, offset=512), X * 3)
        assert client.infer("blob", {"blob": inp.write(b"jpeg bytes", offset=2000)},
                            shm_outputs={"echoed": out.slot(100, 50)}) == {"echoed": b"jpeg bytes"}


def test_big_endian_input_is_written_in_wire_order(server):
    with Client(server.host, server.port) as client:
        inp = client.register_system_shm("in", 64)
        result = client.infer("identity", {"input": inp.write(X.astype(">f4"))})
        np.testing.assert_array_equal(result["output"], X)


def test_every_pooled_connection_holds_the_region_and_a_reconnect_registers_it_again(server):
    with Client(server.host, server.port, connections=3, strategy="round_robin") as client:
        inp = client.register_system_shm("in", 4096)
        ref = inp.write(X)
        assert server.call(lambda: sorted(len(t.regions) for t in server.server.shm.tables.values())) == [1, 1, 1]
        for _ in range(6):  # every connection in turn
            np.testing.assert_array_equal(client.infer("identity", {"input": ref})["output"], X)
        dropped = client._async.connections[0]
        client._run(_close_transport(dropped))
        wait_for(lambda: not dropped.connected, what="the connection to drop")
        for _ in range(6):  # the dropped one reconnects and registers the region before anything else
            np.testing.assert_array_equal(client.infer("identity", {"input": ref})["output"], X)
        assert dropped.connected
        assert client.shm_status()["regions"][0]["name"] == "in"


async def _close_transport(connection) -> None:
    connection._protocol.transport.close()


def test_unregister_releases_both_sides(server):
    with Client(server.host, server.port, connections=2) as client:
        inp = client.register_system_shm("in", 4096)
        ref = inp.write(X)
        key = inp.key
        assert exists(key)
        client.unregister_shm("in")
        assert not exists(key)  # created by the client: removed with the region
        assert server.call(lambda: sum(len(t.regions) for t in server.server.shm.tables.values())) == 0
        with pytest.raises(InvalidInputError) as excinfo:
            client.infer("identity", {"input": ref})
        assert excinfo.value.details["reason"] == "unknown_region"
        with pytest.raises(InvalidArgumentError):
            client.unregister_shm("in")


def test_an_existing_object_is_used_in_place_and_left_in_place(server):
    shm = shared_memory.SharedMemory(create=True, size=8192)
    try:
        np.frombuffer(shm.buf, np.float32, 8, 4096)[:] = X.ravel()
        with Client(server.host, server.port) as client:
            region = client.register_system_shm("tail", 4096, key=shm.name, offset=4096)
            np.testing.assert_array_equal(client.infer("identity", {"input": region.tensor((2, 4), np.float32)})["output"], X)
            client.unregister_shm(region)
        assert exists(shm.name)  # not the client's to remove
    finally:
        shm.close()
        shm.unlink()


def test_typed_errors_through_the_client(server_factory):
    handle = server_factory(shm_max_regions=1)
    with Client(handle.host, handle.port) as client:
        inp = client.register_system_shm("in", 64)
        bad = inp.tensor((2, 4), np.float32)
        bad["shm"]["byte_size"] = 16
        with pytest.raises(InvalidInputError) as excinfo:
            client.infer("identity", {"input": bad})
        assert excinfo.value.details["reason"] == "size_mismatch"
        with pytest.raises(ResourceExhaustedError):
            client.register_system_shm("more", 64)
        assert [r["name"] for r in client.shm_status()["regions"]] == ["in"]  # the refused one left nothing behind
        with pytest.raises(InvalidArgumentError):
            client.register_system_shm("in", 64)  # a name this client already uses
        with pytest.raises(InvalidArgumentError):
            inp.tensor((100,), np.float32)  # past the region: refused before sending
        with pytest.raises(InvalidArgumentError):
            client.infer("identity", {"input": inp.tensor((2, 4), np.float32)}, shm_outputs={"output": "nope"})


def test_async_client(server):
    async def main() -> None:
        async with AsyncClient(server.host, server.port, connections=2) as client:
            inp = await client.register_system_shm("in", 4096)
            out = await client.register_system_shm("out", 4096)
            results = await asyncio.gather(*(
                client.infer("identity", {"input": inp.write(X + i, offset=64 * i)}, shm_outputs={"output": out.slot(64 * i, 64)})
                for i in range(8)))
            for i, result in enumerate(results):
                np.testing.assert_array_equal(result["output"], X + i)
            await client.unregister_shm()
            assert (await client.shm_status())["regions"] == []

    asyncio.run(main())


def test_with_the_server_in_another_process(server_process):
    with Client(server_process.host, server_process.port) as client:
        inp = client.register_system_shm("in", 4096)
        out = client.register_system_shm("out", 4096)
        for i in range(20):
            result = client.infer("identity", {"input": inp.write(X * i)}, shm_outputs={"output": out})
            np.testing.assert_array_equal(result["output"], X * i)
        keys = [inp.key, out.key]
    assert not any(exists(key) for key in keys)  # closing the client removed the objects it created
    with Client(server_process.host, server_process.port) as client:
        assert client.shm_status()["regions"] == []  # a new connection starts with none
