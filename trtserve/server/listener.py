"""Listening sockets, the accept loop, and event loops on threads of their own.

The server accepts on its main event loop and hands each accepted socket to one of its
I/O loops (shard.py), so that connections are spread evenly and deterministically: the
kernel's SO_REUSEPORT hashing can put four clients on one loop of four, and a listening
socket watched by several loops lets the first loop to wake take a whole burst.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from typing import Any
from collections.abc import Callable, Coroutine

log = logging.getLogger("trtserve.server")

BACKLOG = 1024  # as asyncio's create_server: the kernel caps it at net.core.somaxconn
ACCEPT_RETRY_S = 0.1  # after EMFILE and the like: let connections close before accepting again


def bind(host: str | None, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening, non-blocking sockets for every address ``host`` resolves to, as
    ``loop.create_server`` binds them (SO_REUSEADDR, IPv6 sockets IPv6-only).  Raises
    OSError naming the address when one cannot be bound."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: "
                                         f"{(exc.strerror or str(exc)).lower()}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Accept on the current loop; hand every connection to ``hand_off(sock)``."""

    def __init__(self, sockets: list[socket.socket], hand_off: Callable[[socket.socket], None]) -> None:
        self.sockets = sockets
        self._hand_off = hand_off
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._accept_forever(loop, sock)) for sock in self.sockets]

    def close(self) -> None:
        """Stop accepting; each listening socket closes once its accept loop has ended
        (``wait_closed``).  Connections already accepted stay."""
        for task in self._tasks:
            task.cancel()
        if not self._tasks:
            for sock in self.sockets:
                sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept_forever(self, loop: asyncio.AbstractEventLoop, listening: socket.socket) -> None:
        try:
            await self._accept_each(loop, listening)
        finally:
            listening.close()  # after the loop stopped watching it (the cancelled accept's callbacks ran first)

    async def _accept_each(self, loop: asyncio.AbstractEventLoop, listening: socket.socket) -> None:
        while True:
            try:
                sock, _ = await loop.sock_accept(listening)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # the peer went away between the wake-up and accept
            except OSError as exc:  # out of file descriptors or memory: wait for some to close
                log.error("accepting a connection failed: %s; retrying in %.1f s", exc, ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            sock.setblocking(False)
            try:
                self._hand_off(sock)
            except Exception:  # a bug in handing off must not stop accepting
                log.exception("could not hand a connection to an I/O loop")
                sock.close()


class LoopThread:
    """An event loop made by ``new_loop`` (e.g. ``uvloop.new_event_loop``), running on a
    daemon thread of its own until ``stop``."""

    def __init__(self, new_loop: Callable[[], asyncio.AbstractEventLoop], name: str) -> None:
        self.loop = new_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout_s: float) -> None:
        """Stop the loop, wait for its thread, close it.  A loop whose callbacks hang past
        ``timeout_s`` is left to die with the process."""
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return  # already closed
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()
