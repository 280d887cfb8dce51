"""trtserve's network server: asyncio on uvloop, raw TCP, length-prefixed msgpack frames.

``Server(repository, host, port)`` is the entry point; see docs/server.md.
"""
from .app import DEFAULT_GRACE_S, DEFAULT_MAX_IN_FLIGHT, Server

__all__ = ["DEFAULT_GRACE_S", "DEFAULT_MAX_IN_FLIGHT", "Server"]
