"""Helpers of the hostile-client suite (test_hostile_*.py): attacks run as a process of their
own (hostile_clients.py), a normal client's latency measured beside them, and a server
subprocess whose port is known before its models have loaded.

The bound every attack test asserts for the normal client: all its requests succeed, and
its p99 stays within ``P99_FACTOR`` times its p99 measured on the same server just before
the attack.  ``P99_FLOOR_MS`` keeps a sub-millisecond baseline from turning one scheduler
hiccup of a 2-core machine into a failure: below it, p99 is timer noise.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .conftest import HOST, RawConn, array, tensor, trtserve_command

HOSTILE_CLIENTS = Path(__file__).with_name("hostile_clients.py")
P99_FACTOR = 3.0
P99_FLOOR_MS = 2.0
MIB = 1 << 20


# --------------------------------------------------------------------------- attacks


class Attack:
    """An attack process: ``ready`` is its first report; ``finish()`` ends it and returns
    its last report."""

    def __init__(self, proc: subprocess.Popen, ready: dict[str, Any]) -> None:
        self.proc = proc
        self.ready = ready

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        self.proc.wait(timeout)
        return json.loads(line) if line else {}


@contextmanager
def attack(name: str, port: int, *args: Any, timeout: float = 60.0) -> Iterator[Attack]:
    """Run ``hostile_clients.py name`` against 127.0.0.1:``port`` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, str(HOSTILE_CLIENTS), name, HOST, str(port), *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = _readline(proc, timeout)
        yield Attack(proc, json.loads(line))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"the attack gave no report within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the attack exited with {proc.wait(10)} before it was in place")
    return line


# --------------------------------------------------------------------------- the normal client


def latencies_ms(conn: RawConn, n: int = 300, model: str = "identity") -> list[float]:
    """``n`` infer round trips, one at a time; every answer checked; sorted milliseconds."""
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        result = conn.result("infer", model=model, inputs={"input": tensor(data)})
        times.append((time.perf_counter() - started) * 1e3)
        np.testing.assert_array_equal(array(result["outputs"]["output"]), data)
    return sorted(times)


def p99(times: list[float]) -> float:
    return times[min(len(times) - 1, int(len(times) * 0.99))]


def baseline_p99(host: str, port: int) -> float:
    with RawConn(host, port) as conn:
        latencies_ms(conn, 100)  # warm up the connection and the model
        return p99(latencies_ms(conn))


def assert_normal_client_served(host: str, port: int, unloaded_p99: float, n: int = 300, rounds: int = 3) -> float:
    """A fresh client's requests all succeed, and the p99 of one of up to ``rounds`` rounds
    of ``n`` is within the bound; that p99.  The attack runs through every round, so an
    attack that slows the server fails them all; a neighbour's burst on a shared machine
    spoils one round, not three."""
    bound = P99_FACTOR * max(unloaded_p99, P99_FLOOR_MS)
    measured = []
    with RawConn(host, port) as conn:
        for _ in range(rounds):
            measured.append(p99(latencies_ms(conn, n)))
            if measured[-1] <= bound:
                return measured[-1]
    raise AssertionError(f"normal client p99 {', '.join(f'{m:.2f}' for m in measured)} ms, over {bound:.2f} ms "
                         f"(unloaded p99 {unloaded_p99:.2f} ms) in every round")


# --------------------------------------------------------------------------- a server known early


class EarlyServer:
    """``trtserve serve`` whose port is read from its log's ``accepting connections`` line,
    written before any model loads (its stdout line waits for the models)."""

    def __init__(self, repository: Path, log_path: Path, *args: str) -> None:
        argv = trtserve_command() + ["serve", "--repository", str(repository), "--host", HOST, "--port", "0", *args]
        self.log_path = log_path
        self.started = time.monotonic()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        self.host, self.port = HOST, 0

    def wait_accepting(self, timeout: float = 30.0) -> float:
        """Seconds from the start until the server accepted connections (read from its log)."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            match = re.search(r"accepting connections on [\d.]+:(\d+)", self.log())
            if match:
                self.port = int(match.group(1))
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(f"trtserve exited with {self.proc.returncode}; log:\n{self.log()}")
            time.sleep(0.02)
        raise TimeoutError(f"no 'accepting connections' line within {timeout} s; log:\n{self.log()}")

    def listening_line(self, timeout: float = 30.0) -> str:
        """The stdout line, printed once the start-up models have loaded or failed."""
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"no listening line within {timeout} s")
        return self.proc.stdout.readline().decode().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connect(self, timeout: float = 10.0) -> RawConn:
        return RawConn(self.host, self.port, timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


@contextmanager
def early_server(repository: Path, log_path: Path, *args: str) -> Iterator[EarlyServer]:
    server = EarlyServer(repository, log_path, *args)
    try:
        yield server
    finally:
        server.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
