"""Helpers shared by the operations suites (test_ops_*.py): process probes, file edits that
poll mode is sure to see, and a subprocess server whose log can be checked for crashes.

Everything here observes real processes: RSS and thread counts come from
``/proc/<pid>/status`` (Linux, where CI runs), never from mocks.
"""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .conftest import IDENTITY_CONFIG, ServerProcess, array, tensor, trtserve_command, write_model

OPS_BACKENDS = Path(__file__).with_name("ops_backends.py")

# What an unhandled error looks like in a server's stderr: a logged traceback, asyncio's
# report of a failed callback or task, or a thread that died.
LOG_PROBLEMS = ("Traceback", "Unhandled", "Task exception was never retrieved", "Exception in callback",
                "Exception in thread", "exception was never retrieved")


# --------------------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def rss_mb(pid: int) -> float:
    """Resident set size in MiB (VmRSS)."""
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def socket_count(pid: int) -> int:
    """Open sockets of a process: the listener plus one per client connection it holds."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            continue  # closed while we listed
    return count


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition", interval: float = 0.005):
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > give_up:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def log_problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(p in line for p in LOG_PROBLEMS)]


def assert_cli_refuses(repository: Path, cwd: Path, args: list[str], message: str) -> None:
    """``trtserve serve`` with ``args`` exits 2 before listening, ``message`` on stderr."""
    done = subprocess.run(trtserve_command() + ["serve", "--repository", str(repository), "--port", "0", *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stdout == ""


@contextmanager
def server_process(repository: Path, log_path: Path, *args: str) -> Iterator[ServerProcess]:
    """``trtserve serve`` on 127.0.0.1 port 0; terminated (then killed) on exit."""
    proc = ServerProcess(repository, *args, log_path=log_path)
    try:
        yield proc.start()
    finally:
        proc.close()


# --------------------------------------------------------------------------- files


def replace_file(path: Path, text: str) -> None:
    """Replace a file atomically and make sure poll mode sees a change.

    Atomic (write a hidden ``.*.tmp`` sibling, which the poller ignores, then rename) so a
    poll never reads half a file.  The new mtime is set explicitly to at least one second
    after the old one: a same-size rewrite within the filesystem's timestamp granularity
    would otherwise look unchanged.
    """
    old = path.stat().st_mtime_ns if path.exists() else 0
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    stamp = max(time.time_ns(), old + 1_000_000_000)
    os.utime(tmp, ns=(stamp, stamp))
    os.replace(tmp, path)


def write_identity(root: Path) -> None:
    write_model(root, "identity", IDENTITY_CONFIG)


def assert_correct_infer(conn) -> None:
    """A correct answer from the identity model on ``conn`` (a RawConn)."""
    data = np.arange(8, dtype=np.float32).reshape(2, 4) * 3
    result = conn.result("infer", model="identity", inputs={"input": tensor(data)})
    np.testing.assert_array_equal(array(result["outputs"]["output"]), data)


def assert_healthy(host: str, port: int) -> None:
    """live, ready, and a correct infer, all on a fresh connection."""
    from .conftest import RawConn

    with RawConn(host, port) as conn:
        assert conn.result("live") == {"live": True}
        assert conn.result("ready") == {"ready": True}
        assert_correct_infer(conn)
