"""Several servers behind one client: pick the least loaded, skip the ones that fail.

Persistent pipelined connections defeat per-connection (L4) load balancing: one client's
connection stays on one server however busy it is.  So a client given several endpoints
balances per request itself: each request goes to the endpoint with the fewest requests
outstanding (ties rotate), skipping an endpoint whose connection failed recently.  A
failed endpoint is skipped for ``down_s`` seconds, doubling on each further failure up to
``MAX_DOWN_S``; then one request probes it, and once it answers it is used as before.
When every endpoint is down, the one that comes back first is tried anyway.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .connection import Connection
from .errors import InvalidArgumentError

DEFAULT_DOWN_S = 0.5  # first back-off after a failure
MAX_DOWN_S = 5.0  # longest back-off: a restarted server is used again within this


def parse_endpoints(endpoints: Iterable[Any]) -> list[tuple[str, int]]:
    """``["host:port", ("host", port), "[::1]:8001"]`` -> [(host, port)]; typed errors otherwise."""
    parsed = []
    for endpoint in endpoints if not isinstance(endpoints, (str, bytes)) else [endpoints]:
        if isinstance(endpoint, str):
            host, sep, port_text = endpoint.rpartition(":")
            if not sep or not host or not port_text.isdigit():
                raise InvalidArgumentError(f"endpoint {endpoint!r} must be 'host:port' (or a (host, port) tuple)",
                                           field="endpoints", value=endpoint)
            host, port = host.strip("[]"), int(port_text)
        elif isinstance(endpoint, tuple) and len(endpoint) == 2 and isinstance(endpoint[0], str):
            host, port = endpoint
        else:
            raise InvalidArgumentError(f"endpoint {endpoint!r} must be 'host:port' or a (host, port) tuple",
                                       field="endpoints", value=repr(endpoint))
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidArgumentError(f"endpoint {endpoint!r}: port must be in 1..65535", field="endpoints",
                                       value=repr(endpoint))
        parsed.append((host, port))
    if not parsed:
        raise InvalidArgumentError("endpoints must name at least one 'host:port'", field="endpoints")
    if len(set(parsed)) != len(parsed):
        raise InvalidArgumentError(f"endpoints {parsed} name the same server twice", field="endpoints")
    return parsed


class Endpoint:
    """One server: its pool of pipelined connections and its health."""

    def __init__(self, host: str, port: int, connections: int, **connection_options: Any) -> None:
        self.host, self.port = host, port
        self.pool = [Connection(host, port, **connection_options) for _ in range(connections)]
        self.down_until = 0.0  # time.monotonic(); 0 = up
        self.failures = 0  # consecutive; sets the back-off
        self._turn = itertools.count()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.pool)

    def connection(self, strategy: str) -> Connection:
        start = next(self._turn) % len(self.pool)
        if strategy == "round_robin":
            return self.pool[start]
        rotated = self.pool[start:] + self.pool[:start]  # rotation spreads ties evenly
        return min(rotated, key=lambda c: c.in_flight)

    def failed(self, down_s: float) -> None:
        self.failures += 1
        self.down_until = time.monotonic() + min(down_s * 2 ** (self.failures - 1), MAX_DOWN_S)

    def answered(self) -> None:
        if self.failures:
            self.failures, self.down_until = 0, 0.0


class Endpoints:
    """The endpoint set and the choice of one per request (least outstanding requests)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.all = list(endpoints)
        self._turn = itertools.count()

    def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        """The endpoint for the next request, not one of ``exclude``; None when none is left."""
        candidates = [e for e in self.all if e not in exclude]
        if len(candidates) > 1:
            start = next(self._turn) % len(candidates)
            candidates = candidates[start:] + candidates[:start]
        if not candidates:
            return None
        now = time.monotonic()
        up = [e for e in candidates if e.down_until <= now]
        if not up:  # every one is down: the first to come back is the best bet
            return min(candidates, key=lambda e: e.down_until)
        return min(up, key=lambda e: e.in_flight)
