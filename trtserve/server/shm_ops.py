"""The shared-memory operations (``shm_register``, ``shm_unregister``, ``shm_status``) and
the region table of each connection (shm.py).

A connection's table exists from its first registration until the connection closes (the
tracker calls ``connection_closed``) or the server stops.  With shared memory disabled
(``Server(shared_memory=False)``, ``--no-shared-memory``) every operation is refused with
PERMISSION_DENIED and no table is ever made.
"""
from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError, PermissionDeniedError
from .reply import Reply
from .shm import Region, RegionTable, ShmLimits, SystemRegion, object_key, region_error, region_name

KINDS = ("system", "cuda")


def _int_field(message: dict[str, Any], field: str, minimum: int, default: int | None = None) -> int:
    value = message.get(field, default)
    if type(value) is int and value >= minimum:
        return value
    raise region_error(
        InvalidArgumentError, f"field {field!r} must be an integer >= {minimum}, got {value!r:.80}", "malformed",
        field=field, value=repr(value)[:80])


class SharedMemory:
    """Every connection's regions, keyed by the connection (server/protocol.py's object)."""

    def __init__(self, limits: ShmLimits | None) -> None:
        self.limits = limits  # None: shared memory is disabled on this server
        self.tables: dict[Any, RegionTable] = {}

    def lookup(self, conn: Any) -> RegionTable | None:
        """The connection's table, if it ever registered a region (the infer hot path)."""
        return self.tables.get(conn)

    def _table(self, conn: Any, op: str) -> RegionTable:
        if self.limits is None:
            raise PermissionDeniedError(
                f"{op}: shared memory is disabled on this server (--no-shared-memory); send tensors in the request",
                operation=op)
        table = self.tables.get(conn)
        if table is None:
            table = self.tables[conn] = RegionTable(self.limits)
        return table

    def connection_closed(self, conn: Any) -> None:
        table = self.tables.pop(conn, None)
        if table is not None:
            table.close()

    def close(self) -> None:
        for table in self.tables.values():
            table.close()
        self.tables.clear()

    # -- operations --------------------------------------------------------------------
    def register(self, message: dict[str, Any], conn: Any) -> dict[str, Any]:
        table = self._table(conn, "shm_register")
        name = region_name(message.get("name"))
        kind = message.get("kind", "system")
        if kind not in KINDS:
            raise region_error(InvalidArgumentError, f"field 'kind' must be one of {list(KINDS)}, got {kind!r:.80}",
                               "malformed", field="kind", value=repr(kind)[:80])
        byte_size = _int_field(message, "byte_size", 1)
        offset = _int_field(message, "offset", 0, default=0)
        region: Region
        if kind == "system":
            key = object_key(message.get("key"))
            table.admit(name, byte_size)
            region = SystemRegion(name, key, offset, byte_size)
        else:
            handle, device = message.get("handle"), _int_field(message, "device", 0)
            if type(handle) is not bytes or len(handle) != 64:
                raise region_error(
                    InvalidArgumentError, "field 'handle' must be the 64 bytes of a cudaIpcMemHandle_t (msgpack bin), "
                    f"got {type(handle).__name__} of {len(handle) if isinstance(handle, (bytes, str)) else '?'} "
                    "bytes", "malformed", field="handle")
            table.admit(name, byte_size)
            from .cuda_ipc import CudaRegion  # only a CUDA registration loads cuda-python

            region = CudaRegion(name, handle, device, offset, byte_size)
        table.add(region)
        return region.row()

    def unregister(self, message: dict[str, Any], conn: Any) -> dict[str, Any] | Reply:
        """Answered at once, or (a region still in use) once the requests using it are done."""
        table = self._table(conn, "shm_unregister")
        name = message.get("name")
        reply = Reply()
        table.unregister(None if name is None else region_name(name), reply)
        return reply.value if reply.done else reply

    def status(self, message: dict[str, Any], conn: Any) -> dict[str, Any]:
        table = self._table(conn, "shm_status")
        name = message.get("name")
        rows = table.status(None if name is None else region_name(name))
        return {"regions": rows, "max_regions": table.limits.max_regions, "max_bytes": table.limits.max_bytes,
                "mapped_bytes": table.mapped_bytes}
