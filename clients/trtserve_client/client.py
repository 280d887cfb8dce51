"""Client: the blocking client, a thin wrapper over :class:`AsyncClient`.

    with Client("127.0.0.1", 8001) as client:
        outputs = client.infer("tensor_mlp", np.zeros((1, 16), np.float32))

There is no second implementation of the protocol here: each method submits the
AsyncClient coroutine of the same name to a private event loop running on its own daemon
thread (``asyncio.run_coroutine_threadsafe``) and waits for it.  So the client is
thread-safe, and requests from many threads pipeline over the same pooled connections.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .aio import AsyncClient
from .errors import ConnectionFailedError

T = TypeVar("T")
_CLOSE_WAIT_S = 5.0  # closing sockets is quick; never hang interpreter exit on it


def _blocking(coroutine_function: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """The AsyncClient method of the same name, run to completion on the client's loop."""

    @functools.wraps(coroutine_function)
    def method(self: Client, *args: Any, **kwargs: Any) -> T:
        return self._run(coroutine_function(self._async, *args, **kwargs))

    return method


class Client:
    """Blocking, thread-safe client; takes AsyncClient's arguments (host, port, connections,
    strategy, timeout, connect_timeout, max_frame, token, ssl, tls, ca_file, server_hostname,
    endpoints, retries, down_s).  Use as a context manager or call close()."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._async = AsyncClient(*args, **kwargs)  # validates arguments before a thread starts
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trtserve-client-loop", daemon=True)
        self._thread.start()
        # Runs on close() or when the client is garbage-collected / at interpreter exit.
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._thread, self._async)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if not self._finalizer.alive:
            coroutine.close()  # never awaited: silence the warning
            raise ConnectionFailedError("this Client is closed; create a new one", address=self.address)
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: stop waiting on the loop too
            raise

    @property
    def address(self) -> str:
        """``host:port``, or the endpoints joined with commas."""
        return ",".join(self._async.endpoints)

    @property
    def endpoints(self) -> list[str]:
        return self._async.endpoints

    def outstanding(self) -> dict[str, int]:
        """Requests in flight per endpoint."""
        return self._async.outstanding()

    @property
    def in_flight(self) -> int:
        return self._async.in_flight

    connect = _blocking(AsyncClient.connect)
    request = _blocking(AsyncClient.request)
    live = _blocking(AsyncClient.live)
    ready = _blocking(AsyncClient.ready)
    server_metadata = _blocking(AsyncClient.server_metadata)
    model_metadata = _blocking(AsyncClient.model_metadata)
    model_config = _blocking(AsyncClient.model_config)
    repository_index = _blocking(AsyncClient.repository_index)
    statistics = _blocking(AsyncClient.statistics)
    load = _blocking(AsyncClient.load)
    unload = _blocking(AsyncClient.unload)
    infer = _blocking(AsyncClient.infer)
    register_system_shm = _blocking(AsyncClient.register_system_shm)
    register_cuda_shm = _blocking(AsyncClient.register_cuda_shm)
    unregister_shm = _blocking(AsyncClient.unregister_shm)
    shm_status = _blocking(AsyncClient.shm_status)

    def close(self) -> None:
        """Close the connections and stop the loop thread.  Idempotent."""
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._finalizer.alive else "closed"
        where = f"{self._async.host!r}, {self._async.port}" if len(self.endpoints) == 1 else f"endpoints={self.endpoints!r}"
        return f"Client({where}, connections={len(self._async.connections)}, {state})"


# help(Client) and IDEs show AsyncClient's parameters, which __init__ passes through.
Client.__init__.__signature__ = inspect.signature(AsyncClient.__init__)  # type: ignore[attr-defined]


def _shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread, client: AsyncClient) -> None:
    # Holds no reference to the Client itself, so weakref.finalize can run it at collection.
    if threading.current_thread() is thread:  # collected on the loop thread: cannot block here
        loop.create_task(client.close()).add_done_callback(lambda _: loop.stop())
        return
    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(_CLOSE_WAIT_S)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass  # sockets are closed by the OS when the process goes; do not hang on them
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CLOSE_WAIT_S)
    if not loop.is_running():
        loop.close()
