"""How the load generator talks to a server: one small interface, several drivers.

A driver turns input values into a prepared request once (so encoding is not re-done per
request), sends prepared requests on one of several pipelined connections (``slot``
picks it), and answers metadata and statistics.  The measurement logic in runner.py only
sees this interface, which is how PyTriton is driven with the very same code
(bench/triton/driver.py).

``RawDriver`` sends requests encoded once on the client library's pipelined ``Connection``s
(no per-call encoding, no pool); ``ClientDriver`` uses the library's AsyncClient, as a
user's code does.  docs/performance.md says which is the default and why.  Either can put
the inputs in shared memory (``shared_memory="system"`` or ``"cuda"``: shared.py).
"""
from __future__ import annotations

from typing import Any

import asyncio

from trtserve_client.connection import Connection
from trtserve_client.wire import decode_tensors, encode_tensors

from . import shared


class Driver:
    """The interface runner.py drives.  ``slot`` spreads load over connections."""

    name = "driver"

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def prepare(self, values: dict[str, Any]) -> Any:
        """Encode input values (name -> ndarray or bytes) once, for many sends."""
        raise NotImplementedError

    async def prepare_all(self, values: list[dict[str, Any]]) -> list[Any]:
        """Every request's prepared inputs (drivers with shared memory register it here)."""
        return [self.prepare(v) for v in values]

    async def infer(self, slot: int, prepared: Any) -> None:
        """Send one request and wait for its answer; raise on any failure."""
        raise NotImplementedError

    async def metadata(self, model: str) -> dict[str, Any] | None:
        """``model_metadata``'s result (inputs with -1 dynamic dims), or None if unknown."""
        return None

    async def statistics(self, model: str) -> dict[str, Any] | None:
        """The statistics op's entry for ``model``, or None when the server has none."""
        return None

    async def server_info(self) -> dict[str, Any]:
        return {}


# --------------------------------------------------------------------------- raw wire


class RawDriver(Driver):
    """trtserve over its own wire format, ``connections`` pipelined sockets."""

    name = "raw"

    def __init__(self, host: str, port: int, model: str, version: int | None = None, connections: int = 4,
                 shared_memory: str | None = None) -> None:
        self.host, self.port, self.model, self.version = host, port, model, version
        self.connection_count = connections
        self.connections: list[Connection] = []
        self.shared_memory = shared_memory
        self.region: Any = None

    async def open(self) -> None:
        self.connections = [Connection(self.host, self.port) for _ in range(self.connection_count)]
        for connection in self.connections:
            await connection.connect()

    async def close(self) -> None:
        if self.region is not None:  # the server lets go first (device memory is freed after)
            await asyncio.gather(*(c.unregister_region(shared.REGION) for c in self.connections), return_exceptions=True)
            self.region.close()
            self.region = None
        for connection in self.connections:
            await connection.close()
        self.connections = []

    def prepare(self, values: dict[str, Any]) -> dict[str, Any]:
        return encode_tensors(values)

    async def prepare_all(self, values: list[dict[str, Any]]) -> list[Any]:
        if self.shared_memory is None:
            return await super().prepare_all(values)
        self.region = shared.new_region(self.shared_memory, shared.region_bytes(values, self.shared_memory))
        await asyncio.gather(*(c.register_region(self.region.registration()) for c in self.connections))
        return [encode_tensors(v) for v in shared.place(self.region, values)]

    async def infer(self, slot: int, prepared: dict[str, Any]) -> None:
        fields = {"model": self.model, "inputs": prepared}
        if self.version is not None:
            fields["version"] = self.version
        result = await self.connections[slot % len(self.connections)].request("infer", fields)
        decode_tensors(result["outputs"], "outputs")  # a real client decodes: so does the load

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        return await self.connections[0].request(op, fields)

    async def metadata(self, model: str) -> dict[str, Any] | None:
        return await self._call("model_metadata", model=model)

    async def statistics(self, model: str) -> dict[str, Any] | None:
        try:
            snapshot = await self._call("statistics", model=model)
        except Exception:  # the echo floor has no statistics: report none rather than fail
            return None
        return next((m for m in snapshot.get("models", ()) if m.get("name") == model), None)

    async def server_info(self) -> dict[str, Any]:
        try:
            return await self._call("server_metadata")
        except Exception:
            return {}


# --------------------------------------------------------------------------- client library


class ClientDriver(Driver):
    """trtserve through the client library's AsyncClient (its own pool of ``connections``)."""

    name = "library"

    def __init__(self, host: str, port: int, model: str, version: int | None = None, connections: int = 4,
                 shared_memory: str | None = None) -> None:
        self.host, self.port, self.model, self.version = host, port, model, version
        self.connection_count = connections
        self.shared_memory = shared_memory
        self.client: Any = None

    async def open(self) -> None:
        from trtserve_client.aio import AsyncClient  # only this driver needs the full library

        self.client = AsyncClient(self.host, self.port, connections=self.connection_count)
        await self.client.connect()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def prepare(self, values: dict[str, Any]) -> dict[str, Any]:
        return values  # the library encodes per call, as its users' code does

    async def prepare_all(self, values: list[dict[str, Any]]) -> list[Any]:
        if self.shared_memory is None:
            return await super().prepare_all(values)
        size = shared.region_bytes(values, self.shared_memory)
        register = self.client.register_cuda_shm if self.shared_memory == "cuda" else self.client.register_system_shm
        return shared.place(await register(shared.REGION, size), values)  # the client unregisters it on close

    async def infer(self, slot: int, prepared: dict[str, Any]) -> None:
        await self.client.infer(self.model, prepared, version=self.version)  # the pool picks the connection

    async def metadata(self, model: str) -> dict[str, Any] | None:
        return await self.client.model_metadata(model)

    async def statistics(self, model: str) -> dict[str, Any] | None:
        try:
            snapshot = await self.client.statistics(model)
        except Exception:
            return None
        return next((m for m in snapshot.get("models", ()) if m.get("name") == model), None)

    async def server_info(self) -> dict[str, Any]:
        try:
            return await self.client.server_metadata()
        except Exception:
            return {}
