"""The memory budget for request bytes: one server-wide limit, with a share per connection.

Every frame is admitted at its 4-byte header, before any of its bytes are buffered
(``FrameDecoder(admit=...)``): its size counts against the connection's ``held`` and the
server's ``total`` from then until its request is answered (or the connection goes).
A frame is admitted at once when both stay within their limits.  Otherwise:

* a frame larger than the per-connection share or the whole budget can never be admitted:
  RESOURCE_EXHAUSTED, and the connection closes (waiting cannot help);
* a frame of at most ``SMALL`` bytes on a connection that holds nothing is admitted anyway,
  so a client's next small request never waits behind other clients' large ones (this can
  pass the budget by ``SMALL`` bytes per connection);
* otherwise the connection stops being read until room appears: answers going out free
  room, and waiting connections are resumed **those holding the least first**, so the
  connections holding the most are the ones that stay unread.

Frames stalled half-way hold their room until the receive-rate check (reaper.py) closes
their connection.  The budget is the one piece of connection state shared by the server's
I/O loops (shard.py): its counts change under ``lock``, and a waiting connection is resumed
on its own loop (``call_soon``, thread-safe).
"""
from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ResourceExhaustedError

SMALL = 64 * 1024  # the decoder's scratch buffer: what a connection holding nothing may always read
SHARE_OF_MEMORY = 4  # default budget: a quarter of the machine's (or the container's) memory
SHARE_OF_BUDGET = 8  # default per-connection share: an eighth of the budget, at least one frame
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory() -> int:
    """Physical memory, or the container's memory limit when that is lower (cgroup v2 or v1)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 reports a huge number instead
            total = min(total, int(text))
    return total


def default_limits(max_frame: int, max_buffered: int | None, per_connection: int | None) -> tuple[int, int]:
    """(budget, per-connection share): each given value checked, each missing one sized."""
    for name, value in (("max_buffered", max_buffered), ("max_buffered_per_connection", per_connection)):
        if value is not None and (type(value) is not int or value < 1):
            raise ConfigError(f"{name} must be a positive number of bytes, got {value!r}", key=name, value=repr(value))
    limit = max_buffered if max_buffered is not None else machine_memory() // SHARE_OF_MEMORY
    share = per_connection if per_connection is not None else min(limit, max(max_frame, limit // SHARE_OF_BUDGET))
    if share > limit:
        raise ConfigError(
            f"max_buffered_per_connection ({share} bytes) exceeds max_buffered ({limit} bytes); a connection's "
            "share is part of the server's budget: lower it or raise --max-buffered",
            key="max_buffered_per_connection",
            value=share,
        )
    return limit, share


class ByteBudget:
    """The server-wide count; connections resumed in turn when room appears."""

    def __init__(self, limit: int, per_connection: int) -> None:
        self.limit = limit
        self.per_connection = per_connection
        self.total = 0
        self.waiting: set[Account] = set()
        self.smallest_wait = 0  # the least any waiting frame needs (room below it wakes nobody)
        self.lock = threading.Lock()

    def account(self, resume: Callable[[], Any], call_soon: Callable[..., Any] | None = None) -> Account:
        """``resume`` runs through ``call_soon`` (the connection's loop's
        ``call_soon_threadsafe``): a resume must not run inside another connection's callback,
        nor on another loop's thread."""
        return Account(self, resume, call_soon or _now)

    def wake(self) -> None:
        """Room was freed: resume the waiting connections it fits, those holding least first.
        Called with ``lock`` held."""
        room = self.limit - self.total
        smallest = None
        for account in sorted(self.waiting, key=_held):
            wanted = account.wanted
            fits_own = account.held + wanted <= self.per_connection
            if fits_own and (wanted <= room or (account.held == 0 and wanted <= SMALL)):
                room -= wanted
                self.waiting.discard(account)
                account.wanted = 0
                account.call_soon(account.resume)
            elif smallest is None or wanted < smallest:
                smallest = wanted
        self.smallest_wait = smallest or 0


def _held(account: Account) -> int:
    return account.held


def _now(fn: Callable[[], Any]) -> None:
    fn()


class Account:
    """One connection's part of the budget: what it holds, and each frame's size until its
    request is answered.  ``admit`` is its decoder's callback; ``resume`` is called when a
    frame it waits to admit fits (then the connection retries ``admit``).  The connection
    pops ``sizes`` (admitted frames, in order) as it handles each request, keeps a pending
    request's size in ``kept`` and ``release``s it once answered (per request: plain deque
    and dict operations, no method calls)."""

    __slots__ = ("budget", "resume", "call_soon", "held", "wanted", "sizes", "kept")

    def __init__(self, budget: ByteBudget, resume: Callable[[], Any], call_soon: Callable[..., Any]) -> None:
        self.budget = budget
        self.resume = resume
        self.call_soon = call_soon
        self.held = 0
        self.wanted = 0  # > 0 while waiting for room for a frame of this size
        self.sizes: collections.deque[int] = collections.deque()  # admitted frames not yet handled, in order
        self.kept: dict[Any, int] = {}  # request id -> its frame's size, while in flight

    def admit(self, nbytes: int) -> bool:
        budget = self.budget
        with budget.lock:
            held = self.held + nbytes
            if held <= budget.per_connection and budget.total + nbytes <= budget.limit:
                self.held = held
                budget.total += nbytes
                self.sizes.append(nbytes)
                return True
            return self._admit_over(nbytes)

    def _admit_over(self, nbytes: int) -> bool:
        budget = self.budget
        if nbytes > budget.per_connection or nbytes > budget.limit:
            which, limit = (("--max-buffered", budget.limit) if nbytes > budget.limit
                            else ("--max-buffered-per-connection", budget.per_connection))
            raise ResourceExhaustedError(
                f"a frame of {nbytes} bytes can never fit in the server's request memory ({which} {limit} bytes); "
                "send smaller requests, or raise the server's limit",
                frame=nbytes, limit=limit,
            )
        if self.held == 0 and nbytes <= SMALL:  # a client's next small request never waits
            self.held = nbytes
            budget.total += nbytes
            self.sizes.append(nbytes)
            return True
        self.wanted = nbytes
        budget.waiting.add(self)
        if budget.smallest_wait == 0 or nbytes < budget.smallest_wait:
            budget.smallest_wait = nbytes
        return False

    def release(self, nbytes: int) -> None:
        budget = self.budget
        with budget.lock:
            self.held -= nbytes
            budget.total -= nbytes
            if budget.waiting and (self.wanted or budget.limit - budget.total >= budget.smallest_wait):
                budget.wake()

    def close(self) -> None:
        """The connection is gone: everything it held is free."""
        budget = self.budget
        with budget.lock:
            budget.waiting.discard(self)
            self.wanted = 0
            held, self.held = self.held, 0
            budget.total -= held
            self.sizes.clear()
            self.kept.clear()
            if budget.waiting and held:
                budget.wake()
