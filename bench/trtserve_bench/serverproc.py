"""Start a server as a child process, wait for its ``listening on HOST:PORT`` line, stop it.

Used by the bench fixtures and the PyTriton comparison.  Output goes to a log file, never
to a pipe: a pipe nobody drains would block a chatty server mid-benchmark.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

LISTENING = re.compile(r"listening on (\S+):(\d+)")
BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent


class ServerProcess:
    """A running child server; use as a context manager so it is always stopped."""

    def __init__(self, argv: Sequence[str], startup_timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.startup_timeout = startup_timeout
        self.env = env
        self.log = tempfile.NamedTemporaryFile(prefix="trtserve-bench-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_text())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{' '.join(self.argv)} did not report 'listening on HOST:PORT':\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT first (a clean shutdown), then SIGKILL if it will not go.

        Signals go to the child's whole process group (it was started in a new session), so
        helpers it spawned (PyTriton's tritonserver and its Python stubs) stop with it.
        """
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            self._signal(signal.SIGKILL)  # stragglers of the group, if the leader left them behind
        self.log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        self.stop()
        try:
            os.unlink(self.log.name)
        except FileNotFoundError:
            pass

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def trtserve_argv(repository: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """``trtserve serve`` on an ephemeral 127.0.0.1 port, from this interpreter's environment."""
    script = Path(sys.executable).parent / "trtserve"  # the installed console script
    command = [str(script)] if script.exists() else [sys.executable, "-m", "trtserve.cli"]
    return [*command, "serve", "--repository", str(repository), "--host", "127.0.0.1", "--port", "0", *extra]


def echo_argv() -> list[str]:
    return [sys.executable, str(BENCH_DIR / "echo_server.py"), "--host", "127.0.0.1", "--port", "0"]
