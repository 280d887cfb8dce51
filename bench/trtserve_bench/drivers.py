"""How the load generator talks to a server: one small interface, several drivers.

A driver turns input values into a prepared request once (so encoding is not re-done per
request), sends prepared requests on one of several pipelined connections (``slot``
picks it), and answers metadata and statistics.  The measurement logic in runner.py only
sees this interface, which is how PyTriton is driven with the very same code
(bench/triton/driver.py).

``RawDriver`` owns a minimal pipelined msgpack connection over wire.py's framing: an
asyncio Protocol, many requests in flight, responses matched by id.  ``ClientDriver`` uses
the client library's AsyncClient.  docs/performance.md says which is the default and why.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Any

from trtserve_client.errors import ConnectionFailedError, error_from_wire
from trtserve_client.wire import PROTOCOL_VERSION, FrameDecoder, decode_tensors, encode_tensors, pack


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


class WireConnection(asyncio.Protocol):
    """One pipelined connection: write frames as requests come, match answers by id."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._outgoing: list[bytes] = []

    @classmethod
    async def open(cls, host: str, port: int) -> "WireConnection":
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(cls, host, port)
        except OSError as exc:
            raise ConnectionFailedError(f"cannot connect to {host}:{port}: {exc}", host=host, port=port) from None
        return protocol

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP sockets by default

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            future = self.pending.pop(message.get("id"), None)
            if future is not None and not future.done():
                future.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = ConnectionFailedError(f"connection closed by the server ({exc or 'EOF'})")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self.lost)
        self.pending.clear()
        self._writable.set()

    def pause_writing(self) -> None:  # the kernel buffer is full: stop adding to it
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- requests ----------------------------------------------------------------------
    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` (an ``id`` is added) and return the server's answer frame."""
        if self.lost is not None:
            raise self.lost
        request_id = next(self.ids)
        message["id"] = request_id
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        if len(self.pending) == 1 and not self._outgoing:
            self.transport.write(pack(message))  # alone in flight: nothing to coalesce with
        else:
            if not self._outgoing:
                asyncio.get_running_loop().call_soon(self._flush)
            self._outgoing.append(pack(message))
        if not self._writable.is_set():
            await self._writable.wait()
        try:
            return await future
        finally:
            self.pending.pop(request_id, None)  # cancelled: forget it so late answers are dropped

    def _flush(self) -> None:
        """Write every frame queued during this loop iteration with one syscall.

        With many requests in flight, one send() per request is most of the client's CPU
        time (measured with py-spy: docs/performance.md); coalescing costs one loop turn.
        """
        frames, self._outgoing = self._outgoing, []
        if self.lost is None and self.transport is not None:
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def result_of(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply's ``result``, or the typed error it carries raised."""
    if "error" in reply:
        raise error_from_wire(reply["error"])
    return reply["result"]


class RawDriver(Driver):
    """trtserve over its own wire format, ``connections`` pipelined sockets."""

    name = "raw"

    def __init__(self, host: str, port: int, model: str, version: int | None = None, connections: int = 4) -> None:
        self.host, self.port, self.model, self.version = host, port, model, version
        self.connection_count = connections
        self.connections: list[WireConnection] = []

    async def open(self) -> None:
        self.connections = [await WireConnection.open(self.host, self.port) for _ in range(self.connection_count)]

    async def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.connections = []

    def prepare(self, values: dict[str, Any]) -> dict[str, Any]:
        return encode_tensors(values)

    async def infer(self, slot: int, prepared: dict[str, Any]) -> None:
        message = {"v": PROTOCOL_VERSION, "op": "infer", "model": self.model, "inputs": prepared}
        if self.version is not None:
            message["version"] = self.version
        result = result_of(await self.connections[slot % len(self.connections)].request(message))
        decode_tensors(result["outputs"], "outputs")  # a real client decodes: so does the load

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        return result_of(await self.connections[0].request({"v": PROTOCOL_VERSION, "op": op, **fields}))

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

    def __init__(self, host: str, port: int, model: str, version: int | None = None, connections: int = 4) -> None:
        self.host, self.port, self.model, self.version = host, port, model, version
        self.connection_count = connections
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
