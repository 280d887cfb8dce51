"""Fixtures for tests against a real server on 127.0.0.1 (port 0), in-process or as a subprocess.

* ``repository``: a model repository folder.  By default a fresh test repository (see
  ``build_test_repository``); override per test with
  ``@pytest.mark.parametrize("repository", [path_or_callable], indirect=True)`` where a
  callable gets ``tmp_path`` and returns the folder, or redefine the fixture in a module.
* ``server`` / ``server_factory``: ``Server`` on a background thread with its own uvloop
  loop; the handle has ``host``, ``port``, ``server``, ``address`` and ``connect()``.
* ``server_process`` / ``process_factory``: the ``trtserve serve`` console script on port 0.
* ``RawConn``: a blocking socket speaking frames, for protocol-level tests.
* ``gates``: control of the ``Gate`` test backend (hold work until a file appears).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvloop
from trtserve_client.frames import FrameDecoder, pack
from trtserve_client.wire import decode_tensor, encode_tensor

from trtserve.server import Server

HOST = "127.0.0.1"
SUPPORT_BACKENDS = Path(__file__).with_name("support_backends.py")
GATE_MODELS = ("gate", "gate_wide")


# --------------------------------------------------------------------------- repository


def write_model(root: Path, name: str, config: str, versions: tuple[int, ...] = (1,), backend_py: Path | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(config)
    for version in versions:
        (folder / str(version)).mkdir()
    if backend_py is not None:
        shutil.copy(backend_py, folder / "backend.py")
    return folder


# The identity model's config: float32 input [-1, 4] -> output, max 8 (ops_support.py uses it too).
IDENTITY_CONFIG = """backend = "Identity"
max = 8
[[input]]
name = "input"
dtype = "float32"
shape = [-1, 4]
[[output]]
name = "output"
dtype = "float32"
shape = [-1, 4]
"""


def build_test_repository(root: Path) -> Path:
    """Small models whose behaviour tests know exactly.

    identity  float32 input [-1, 4] -> output (versions 1 and 2 on disk; 2 served), max 8
    echo      Identity with no declared tensors (any single input, output "output")
    pair      two declared inputs a: float32 [-1], b: int64 [-1]; outputs a, b
    blob      raw bytes in ("blob"), bytes out ("echoed")
    gate      Gate backend, 1 instance, max_queue_size 1 (QUEUE_FULL, deadlines)
    gate_wide Gate backend, 4 instances, unbounded queue (disconnects, shutdown)
    flaky     Flaky backend: b"raise" fails, b"skip" gives no result, b"text" an unsendable result
    broken    names a backend that does not exist: UNAVAILABLE with the reason
    """
    root.mkdir(parents=True, exist_ok=True)
    write_model(root, "identity", IDENTITY_CONFIG, versions=(1, 2))
    write_model(root, "echo", 'backend = "Identity"\n')
    write_model(root, "pair", """backend = "Identity"
[[input]]
name = "a"
dtype = "float32"
shape = [-1]
[[input]]
name = "b"
dtype = "int64"
shape = [-1]
[[output]]
name = "a"
dtype = "float32"
[[output]]
name = "b"
dtype = "int64"
""")
    write_model(root, "blob", """backend = "Identity"
[[input]]
name = "blob"
dtype = "bytes"
shape = [-1]
[[output]]
name = "echoed"
dtype = "bytes"
shape = [-1]
""")
    gates = root / "_gates"  # no config.toml: not a model
    write_model(root, "gate", f"""backend = "Gate"
gate_dir = "{gates / 'gate'}"
max_queue_size = 1
""", backend_py=SUPPORT_BACKENDS)
    write_model(root, "gate_wide", f"""backend = "Gate"
gate_dir = "{gates / 'gate_wide'}"
instance_num = 4
""", backend_py=SUPPORT_BACKENDS)
    write_model(root, "flaky", 'backend = "Flaky"\n', backend_py=SUPPORT_BACKENDS)
    write_model(root, "broken", 'backend = "NoSuchBackend"\n')
    return root


class GateControl:
    """The files a Gate model watches and writes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "open").touch()

    def started(self) -> list[int]:
        """Batch sizes of every forward that has started so far."""
        return [int(p.read_text() or 0) for p in self.folder.glob("started-*")]

    def wait_started(self, items: int, timeout: float = 10.0) -> None:
        """Wait until forwards holding at least ``items`` items in total have started."""
        give_up = time.monotonic() + timeout
        while sum(self.started()) < items:
            if time.monotonic() > give_up:
                raise AssertionError(f"{self.folder.name}: {self.started()} started, waited for {items} items")
            time.sleep(0.005)


@pytest.fixture
def repository(request, tmp_path) -> Path:
    param = getattr(request, "param", None)
    if param is None:
        return build_test_repository(tmp_path / "repo")
    return Path(param(tmp_path) if callable(param) else param)


@pytest.fixture
def gates(repository):
    """Gate controls by model name; every gate opens at teardown so no work is left held."""
    controls = {name: GateControl(repository / "_gates" / name) for name in GATE_MODELS}
    yield controls
    for control in controls.values():
        control.open()


# --------------------------------------------------------------------------- raw frames


def tensor(array: Any) -> dict[str, Any]:
    return encode_tensor(np.asarray(array))


def array(obj: dict[str, Any]) -> np.ndarray:
    return decode_tensor(obj)


class RawConn:
    """A blocking client socket speaking frames; every read has a timeout."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(1 << 30)
        self.frames: deque[dict[str, Any]] = deque()
        self.ids = itertools.count(1)

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(pack(message))

    def request(self, op: str, **fields: Any) -> int:
        """Send one request without waiting; returns its id."""
        req_id = fields.pop("id", None) or next(self.ids)
        self.send({"v": 2, "id": req_id, "op": op, **fields})
        return req_id

    def recv(self) -> dict[str, Any]:
        while not self.frames:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("the server closed the connection")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    def recv_many(self, n: int) -> dict[int, dict[str, Any]]:
        """``n`` responses, by id (they may arrive in any order)."""
        out = {}
        for _ in range(n):
            message = self.recv()
            out[message["id"]] = message
        return out

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        req_id = self.request(op, **fields)
        message = self.recv()
        assert message["id"] == req_id, message
        return message

    def result(self, op: str, **fields: Any) -> dict[str, Any]:
        message = self.call(op, **fields)
        assert "error" not in message, message["error"]
        return message["result"]

    def error(self, op: str, **fields: Any) -> dict[str, Any]:
        message = self.call(op, **fields)
        assert "error" in message, message
        return message["error"]

    def assert_closed(self) -> None:
        """The server closes this connection (after any frames already sent)."""
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                return
            self.frames.extend(self.decoder.feed(data))

    def abort(self) -> None:
        """Close with a reset (SO_LINGER 0), as a crashed or aborting client does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def assert_serving(host: str, port: int) -> None:
    """A fresh client gets a correct answer: the server survived whatever came before."""
    with RawConn(host, port) as conn:
        data = np.arange(8, dtype=np.float32).reshape(2, 4)
        result = conn.result("infer", model="identity", inputs={"input": tensor(data)})
        np.testing.assert_array_equal(array(result["outputs"]["output"]), data)


# --------------------------------------------------------------------------- in-process


class ServerThread:
    """A ``Server`` running on its own thread and uvloop loop."""

    def __init__(self, repository: Path, **options: Any) -> None:
        self.server = Server(repository, host=HOST, port=0, **options)
        self.loop = uvloop.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server-loop", daemon=True)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the in-process server did not start")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn()`` on the server's loop thread (to read server state safely)."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self, grace_s: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self.loop).result(grace_s + 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def connect(self, timeout: float = 10.0) -> RawConn:
        return RawConn(self.host, self.port, timeout)


@pytest.fixture
def server_factory(repository):
    """``start(repository=None, **Server options)`` -> a started ServerThread, stopped after."""
    started: list[ServerThread] = []

    def start(repo: Path | None = None, **options: Any) -> ServerThread:
        handle = ServerThread(repo or repository, **options).start()
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def server(server_factory) -> ServerThread:
    return server_factory(model_control="explicit", load_models=["*"])


# --------------------------------------------------------------------------- subprocess


def trtserve_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m trtserve``."""
    script = Path(sys.executable).with_name("trtserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "trtserve"]


class ServerProcess:
    """``trtserve serve`` in a subprocess; ``host``/``port`` parsed from its listening line."""

    def __init__(self, repository: Path, *args: str, log_path: Path, command: list[str] | None = None) -> None:
        self.argv = (command or trtserve_command()) + ["serve", "--repository", str(repository), "--host", HOST, "--port", "0", *args]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.host, self.port = HOST, 0

    def start(self, timeout: float = 30.0) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        line = self._read_line(timeout)
        prefix = "trtserve listening on "
        if not line.startswith(prefix):
            self.kill()
            raise RuntimeError(f"unexpected first line {line!r}; log:\n{self.log()}")
        host, _, port = line[len(prefix):].rpartition(":")
        self.host, self.port = host, int(port)
        return self

    def _read_line(self, timeout: float) -> str:
        buf = b""
        give_up = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = give_up - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.kill()
                    raise TimeoutError(f"no listening line within {timeout} s; log:\n{self.log()}")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    code = self.proc.wait(5)
                    raise RuntimeError(f"trtserve exited with {code} before listening; log:\n{self.log()}")
                buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def connect(self, timeout: float = 10.0) -> RawConn:
        return RawConn(self.host, self.port, timeout)


@pytest.fixture
def process_factory(repository, tmp_path):
    """``start(*extra args, repository=None, command=None)`` -> a started ServerProcess, killed after."""
    started: list[ServerProcess] = []

    def start(*args: str, repository_path: Path | None = None, command: list[str] | None = None) -> ServerProcess:
        log_path = tmp_path / f"trtserve-{len(started)}.log"
        proc = ServerProcess(repository_path or repository, *args, log_path=log_path, command=command)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.close()


@pytest.fixture
def server_process(process_factory) -> ServerProcess:
    return process_factory("--model-control", "explicit", "--load-model", "*", "--log-level", "WARNING")
