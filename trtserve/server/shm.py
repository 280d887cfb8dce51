"""Shared-memory regions registered by one connection: the table, its limits, system regions.

A client on the same host registers a region under a name of its choosing: a slice of a
POSIX shared-memory object (``SystemRegion``, here) or of a CUDA allocation it exported
(cuda_ipc.py).  Its infer requests then point at bytes of the region instead of carrying
them (shm_io.py).  Each connection has a table of its own: no other connection can see,
use or unregister its regions, and the table is dropped when the connection closes.

Memory safety does not rest on bookkeeping.  Nothing is ever unmapped explicitly: every
view the server hands out (a numpy array of a mapping, a DeviceArray of an IPC pointer)
keeps its mapping alive, and a mapping goes away when the last reference to it does, so a
model thread still reading or writing a region of a connection that just closed can never
touch unmapped memory.  The bookkeeping (``in_use``) is for the protocol:
``shm_unregister`` of a region that requests still use takes it away from new requests at
once and answers when those requests have left their models (docs/PROTOCOL.md 6.12).

Every refusal names the region, the problem and the fix, and carries ``details.reason``
(one of ``REASONS``), so a program can branch on it.
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, ResourceExhaustedError, TrtserveError
from .reply import Reply

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory objects (shm_open's namespace)
DEFAULT_MAX_REGIONS = 64  # per connection
DEFAULT_MAX_BYTES = 16 << 30  # per connection: mapped bytes, system and CUDA together
# A system region's object is looked up (os.stat) at most this often.  The stat releases the
# GIL, and on a busy server every release can hand the GIL to a model thread for a while:
# once per request it cost ResNet-18 through the server about 15 % of its throughput.
ALIVE_CHECK_S = 0.002
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}\Z")
_KEY = re.compile(r"/?[A-Za-z0-9_.\-]{1,250}\Z")  # one path component under /dev/shm
REASONS = ("unknown_region", "unregistered", "out_of_bounds", "size_mismatch", "vanished", "wrong_device",
           "bad_handle", "wrong_kind", "too_small", "malformed", "exists", "not_found", "permission")


def region_error(cls: type[TrtserveError], message: str, reason: str, **details: Any) -> TrtserveError:
    """A typed refusal about a region; ``reason`` is one of REASONS."""
    return cls(message, reason=reason, **details)


@dataclass(frozen=True)
class ShmLimits:
    """What one connection may register: regions, and bytes mapped (unregistering ones count
    until the requests that use them are done)."""

    max_regions: int = DEFAULT_MAX_REGIONS
    max_bytes: int = DEFAULT_MAX_BYTES


class Region:
    """A registered region: ``byte_size`` bytes that references address from 0."""

    kind = "region"

    def __init__(self, name: str, byte_size: int) -> None:
        self.name = name
        self.byte_size = byte_size
        self.in_use = 0  # requests between their parsing and their item leaving the model
        self.retiring = False  # unregistered while in use: released when in_use reaches 0
        self.waiters: list[Reply] = []  # shm_unregister answers waiting for that

    def check_span(self, offset: int, byte_size: int, where: str, cls: type[TrtserveError]) -> None:
        """Bytes [offset, offset + byte_size) must lie inside the region."""
        if offset + byte_size > self.byte_size:
            raise region_error(
                cls, f"{where}: bytes [{offset}, {offset + byte_size}) lie past the end of {self.kind} region "
                f"{self.name!r} ({self.byte_size} bytes); point inside it or register a larger region",
                "out_of_bounds", where=where, region=self.name, offset=offset, byte_size=byte_size,
                region_bytes=self.byte_size)

    def check_alive(self, where: str, cls: type[TrtserveError]) -> None:
        """Raise when the memory behind the region is gone (system regions: see there)."""

    # What shm_io asks of a region; every span was checked with check_span and check_alive.
    def tensor(self, offset: int, shape: list[int], dtype: np.dtype) -> Any:
        """An input tensor in place: a read-only numpy view, or a DeviceArray."""
        raise NotImplementedError

    def raw(self, offset: int, byte_size: int, where: str) -> bytes:
        """A raw-bytes input (a copy, as raw bytes always are for backends)."""
        raise NotImplementedError

    def write_host(self, offset: int, data: memoryview) -> None:
        """Copy host bytes into the region; complete when this returns."""
        raise NotImplementedError

    def write_device(self, offset: int, array: Any) -> None:
        """Copy a DeviceArray into the region; complete when this returns."""
        raise NotImplementedError

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "byte_size": self.byte_size, "in_use": self.in_use,
                "unregistering": self.retiring}


class SystemRegion(Region):
    """``byte_size`` bytes at ``offset`` of the POSIX shared-memory object ``key``, mapped
    read-write.  Inputs are handed to models as read-only views."""

    kind = "system"

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        super().__init__(name, byte_size)
        self.key = key if key.startswith("/") else "/" + key
        self.offset = offset
        self.path = os.path.join(SHM_DIR, self.key[1:])
        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page-aligned
        self._skip = offset - start
        fd = self._open()
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise region_error(InvalidArgumentError, f"{self.path} is not a shared-memory object (not a regular "
                                   "file)", "not_found", field="key", key=self.key)
            self._identity = (info.st_dev, info.st_ino)
            self._check_size(info.st_size, "shm_register", InvalidArgumentError)
            self._checked = time.monotonic()
            mapping = mmap.mmap(fd, self._skip + byte_size, offset=start)
        finally:
            os.close(fd)
        # Views of this memoryview keep the mapping alive; it is unmapped with the last of them.
        self._view = memoryview(mapping)[self._skip : self._skip + byte_size]
        self._readonly = self._view.toreadonly()  # what input tensors are made from

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise region_error(
                InvalidArgumentError, f"no shared-memory object {self.key!r} on the server's host ({self.path} does "
                "not exist); create it first (shm_open, multiprocessing.shared_memory) and register its name",
                "not_found", field="key", key=self.key) from None
        except PermissionError:
            raise region_error(
                InvalidArgumentError, f"the server may not open shared-memory object {self.key!r} read-write; "
                "create it as the user the server runs as (or give that user read-write access)",
                "permission", field="key", key=self.key) from None
        except OSError as exc:
            raise region_error(InvalidArgumentError, f"cannot open shared-memory object {self.key!r}: "
                               f"{exc.strerror or exc}", "not_found", field="key", key=self.key) from None

    def _check_size(self, size: int, where: str, cls: type[TrtserveError]) -> None:
        if self.offset + self.byte_size > size:
            raise region_error(
                cls, f"{where}: shared-memory object {self.key!r} holds {size} bytes, fewer than region "
                f"{self.name!r} needs (offset {self.offset} + byte_size {self.byte_size}); register a region "
                "that fits, and never shrink an object while it is registered", "out_of_bounds" if where ==
                "shm_register" else "vanished", region=self.name, key=self.key, object_bytes=size)

    def check_alive(self, where: str, cls: type[TrtserveError]) -> None:
        """The object must still be under its name in /dev/shm, the same object, as large as
        it was: an object that was unlinked or replaced no longer reaches the client, and
        touching pages past a shrunk object's end would crash the server (SIGBUS).  Looked
        up at most every ALIVE_CHECK_S (requests in between rely on the last look)."""
        now = time.monotonic()
        if now - self._checked < ALIVE_CHECK_S:
            return
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except OSError:
            info = None
        if info is None or (info.st_dev, info.st_ino) != self._identity:
            raise region_error(
                cls, f"{where}: shared-memory object {self.key!r} of region {self.name!r} vanished from {SHM_DIR} "
                "(unlinked or replaced since it was registered); unregister the region, and keep the object "
                "until it is unregistered", "vanished", where=where, region=self.name, key=self.key)
        self._check_size(info.st_size, where, cls)
        self._checked = now

    def tensor(self, offset: int, shape: list[int], dtype: np.dtype) -> np.ndarray:
        return np.ndarray(shape, dtype, self._readonly, offset)  # read-only, as its buffer is

    def raw(self, offset: int, byte_size: int, where: str) -> bytes:
        return self._view[offset : offset + byte_size].tobytes()

    def write_host(self, offset: int, data: memoryview) -> None:
        self._view[offset : offset + data.nbytes] = data

    def write_device(self, offset: int, array: Any) -> None:
        from .. import cuda  # a device result: the GPU path, where cuda is loaded already

        cuda.to_host(array, out=np.frombuffer(self._view, np.uint8, array.nbytes, offset))

    def row(self) -> dict[str, Any]:
        return dict(super().row(), key=self.key, offset=self.offset)


def region_name(value: Any, field: str = "name") -> str:
    if type(value) is not str or not _NAME.match(value):
        raise region_error(
            InvalidArgumentError, f"field {field!r} must name a region: 1-128 letters, digits or _ . : -, got "
            f"{value!r:.80}", "malformed", field=field, value=repr(value)[:80])
    return value


def object_key(value: Any) -> str:
    if type(value) is not str or not _KEY.match(value) or value.strip("/") in (".", ".."):
        raise region_error(
            InvalidArgumentError, "field 'key' must be the name of a POSIX shared-memory object, e.g. "
            f"'/trtserve-input' (one path component, letters, digits or _ . -), got {value!r:.80}",
            "malformed", field="key", value=repr(value)[:80])
    return value


class RegionTable:
    """One connection's regions (loop thread only)."""

    def __init__(self, limits: ShmLimits) -> None:
        self.limits = limits
        self.regions: dict[str, Region] = {}
        self.retiring: list[Region] = []

    @property
    def mapped_bytes(self) -> int:
        return sum(r.byte_size for r in self.regions.values()) + sum(r.byte_size for r in self.retiring)

    def admit(self, name: str, byte_size: int) -> None:
        """Refuse a registration before anything is mapped: a taken name, or over a limit."""
        if name in self.regions:
            raise region_error(
                InvalidArgumentError, f"this connection already has a region named {name!r}; unregister it first "
                "or pick another name", "exists", field="name", region=name)
        count = len(self.regions) + len(self.retiring)
        if count >= self.limits.max_regions or self.mapped_bytes + byte_size > self.limits.max_bytes:
            raise ResourceExhaustedError(
                f"registering {name!r} ({byte_size} bytes) would exceed this connection's shared-memory limits: "
                f"{count} of {self.limits.max_regions} regions, {self.mapped_bytes} of {self.limits.max_bytes} "
                "bytes mapped; unregister regions first, or start the server with a larger --shm-max-regions / "
                "--shm-max-bytes", region=name, regions=count, max_regions=self.limits.max_regions,
                mapped_bytes=self.mapped_bytes, max_bytes=self.limits.max_bytes)

    def add(self, region: Region) -> None:
        self.regions[region.name] = region

    def get(self, name: Any, where: str, cls: type[TrtserveError]) -> Region:
        region = self.regions.get(name) if type(name) is str else None
        if region is not None:
            return region
        if any(r.name == name for r in self.retiring):
            raise region_error(
                cls, f"{where}: region {name!r} was unregistered (requests in flight still use it until they "
                "finish); register the memory again to use it", "unregistered", where=where, region=name)
        raise region_error(
            cls, f"{where}: this connection has no region named {name!r}; regions are per connection: register "
            f"it on this connection first (registered: {sorted(self.regions)[:16]})", "unknown_region",
            where=where, region=name if type(name) is str else repr(name)[:80])

    def acquire(self, region: Region) -> None:
        region.in_use += 1

    def release(self, region: Region) -> None:
        region.in_use -= 1
        if region.retiring and region.in_use == 0 and region in self.retiring:  # (not after close())
            self._retire(region)

    def unregister(self, name: str | None, reply: Reply) -> list[str]:
        """Take regions (one, or all) away from new requests; ``reply`` is answered when the
        last of them is no longer used by requests in flight (at once when none is)."""
        if name is None:
            taken = list(self.regions.values())
        else:
            taken = [self.get(name, "shm_unregister", InvalidArgumentError)]
        names = [r.name for r in taken]
        busy = [r for r in taken if r.in_use]
        for region in taken:
            del self.regions[region.name]
        if not busy:
            reply.set_result({"unregistered": names})
            return names
        pending = _Countdown(len(busy), reply, names)
        for region in busy:
            region.retiring = True
            region.waiters.append(pending)  # type: ignore[arg-type]
            self.retiring.append(region)
        return names

    def _retire(self, region: Region) -> None:
        self.retiring.remove(region)
        waiters, region.waiters = region.waiters, []
        for waiter in waiters:
            waiter.tick()  # type: ignore[attr-defined]

    def status(self, name: str | None) -> list[dict[str, Any]]:
        if name is not None:
            return [self.get(name, "shm_status", InvalidArgumentError).row()]
        return [r.row() for r in sorted([*self.regions.values(), *self.retiring], key=lambda r: r.name)]

    def close(self) -> None:
        """The connection is gone: forget every region (views still held keep their memory)."""
        self.regions.clear()
        self.retiring.clear()


class _Countdown:
    """Answers one shm_unregister once each of its busy regions has been released."""

    def __init__(self, count: int, reply: Reply, names: list[str]) -> None:
        self.count, self.reply, self.names = count, reply, names

    def tick(self) -> None:
        self.count -= 1
        if self.count == 0 and not self.reply.done:  # done: its connection went away
            self.reply.set_result({"unregistered": self.names})
