"""Hostile clients against the server's connections (server/reaper.py, the eviction in
protocol.py, server/ratelog.py): idle floods, trickling senders, peers that never read
their answers, and login floods, each against a ``trtserve serve`` subprocess on
127.0.0.1, with a normal client served within hostile_support's p99 bound meanwhile."""
from __future__ import annotations

import socket
import time

import pytest

from .conftest import RawConn
from .hostile_support import MIB, assert_normal_client_served, attack, baseline_p99
from .ops_support import assert_cli_refuses, log_problems, rss_mb, server_process, socket_count, wait_for

pytestmark = pytest.mark.timeout(120)


def test_an_idle_flood_cannot_lock_out_a_normal_client(repository, tmp_path):
    """Idle connections by the hundred cannot lock clients out: a new connection at the
    limit closes the one idle the longest (400 idle connections against 64 slots)."""
    args = ("--max-connections", "64", "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc:
        unloaded = baseline_p99(proc.host, proc.port)
        with attack("idle", proc.port, 400) as flood:
            assert flood.ready["opened"] == 400  # accepted: each new one evicted an older idle one
            for _ in range(20):  # 20 fresh connections in a row, each served at once
                with RawConn(proc.host, proc.port) as conn:
                    assert conn.result("live") == {"live": True}
            attacked = assert_normal_client_served(proc.host, proc.port, unloaded)
            closed = flood.finish()["closed"]
            assert closed >= 400 - 64
        print(f"idle flood: 400 idle connections, 64 slots, {closed} closed for newcomers; normal client p99 "
              f"{unloaded:.2f} / {attacked:.2f} ms")
        assert 1 <= proc.log().count("closing idle connection") <= 10  # 336 evictions, logged at a bounded rate


def test_trickling_senders_are_closed(repository, tmp_path):
    """200 connections sending a frame at 1 byte/s: each is answered PROTOCOL_ERROR and
    closed after a --receive-timeout window."""
    args = ("--receive-timeout", "1", "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc:
        unloaded = baseline_p99(proc.host, proc.port)
        sockets = socket_count(proc.proc.pid)
        with attack("trickle", proc.port, 200) as trickle:
            assert trickle.ready["connections"] == 200
            started = time.monotonic()
            attacked = assert_normal_client_served(proc.host, proc.port, unloaded)
            wait_for(lambda: socket_count(proc.proc.pid) <= sockets, 8, "the trickling connections closed")
            print(f"trickle: 200 connections closed within {time.monotonic() - started:.1f} s (--receive-timeout 1); "
                  f"normal client p99 {unloaded:.2f} / {attacked:.2f} ms")
            end = trickle.finish()
        assert end["closed"] == 200 and end["bytes_each"] <= 6
    assert not log_problems(proc.log())


def test_peers_that_never_read_their_answers_are_cut(repository, tmp_path):
    """20 half-closed peers that never read their 4 MiB answers are aborted after
    --write-timeout, their descriptors closed, and later waves of them reuse the memory the
    earlier ones held: RSS shows reuse, not release.  Three waves, the last two compared:
    glibc serves the first wave's 4 MiB buffers from mmap (released on free) or from the heap
    (kept), depending on its adaptive mmap threshold, so only from the second wave on is
    what it keeps settled."""
    args = ("--write-timeout", "1", "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc:
        pid = proc.proc.pid
        unloaded = baseline_p99(proc.host, proc.port)
        sockets, after = socket_count(pid), []
        for _ in range(3):
            with attack("no-read", proc.port, 20, 4 * MIB) as readers:
                assert readers.ready["connections"] == 20
                time.sleep(0.3)  # the server has read the 80 MiB and written what the peers' buffers take
                started = time.monotonic()
                attacked = assert_normal_client_served(proc.host, proc.port, unloaded)
                wait_for(lambda: socket_count(pid) <= sockets, 10, "the non-reading peers' sockets closed")
                print(f"non-readers: closed {time.monotonic() - started + 0.3:.1f} s after their requests "
                      f"(--write-timeout 1); normal client p99 {unloaded:.2f} / {attacked:.2f} ms")
                readers.finish()
            after.append(rss_mb(pid))
        assert "unread for" in proc.log()
        assert after[2] < after[1] + 16, f"RSS after each wave: {after} MiB"
        print(f"non-readers: RSS after each wave {', '.join(f'{mib:.0f}' for mib in after)} MiB")


def test_idle_connections_are_closed_but_busy_ones_are_not(repository, tmp_path, gates):
    args = ("--idle-timeout", "1", "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc:
        with proc.connect() as idle, proc.connect() as busy:
            assert idle.result("live") == {"live": True}
            held = busy.request("infer", model="gate", inputs={"x": b"held"})
            gates["gate"].wait_started(1)
            started = time.monotonic()
            idle.assert_closed()  # a clean close, no error frame: the client reconnects when it needs to
            assert 0.9 < time.monotonic() - started < 4
            time.sleep(1.5)
            gates["gate"].open()
            assert busy.recv()["id"] == held  # in flight all along: never idle
            assert busy.result("live") == {"live": True}


def test_failed_logins_are_logged_at_a_bounded_rate(repository, tmp_path):
    """2,000 failed logins in a row log at most 10 lines per 10 s (then one line with the
    count of the rest)."""
    token = tmp_path / "token"
    token.write_text("s" * 32)
    token.chmod(0o600)
    with server_process(repository, tmp_path / "server.log", "--token-file", str(token)) as proc:
        with attack("bad-logins", proc.port, 2000) as logins:
            assert logins.ready["refused"] == 2000
            logins.finish()
        with socket.create_connection((proc.host, proc.port)) as sock:  # the server still serves
            sock.settimeout(5)
        lines = [line for line in proc.log().splitlines() if "wrong access token" in line]
        assert 1 <= len(lines) <= 10, len(lines)
        print(f"bad logins: 2000 refused, {len(lines)} log lines")


def test_long_names_and_unknown_models_reveal_nothing_of_the_disk(repository, tmp_path):
    with server_process(repository, tmp_path / "server.log", "--model-control", "explicit", "--load-model", "*", "--log-level", "WARNING") as proc, \
            proc.connect() as conn:
        for name in ("x" * 300, "\u00e9" * 200, "../identity", ".hidden", "a/b", "ghost"):
            error = conn.error("load", model=name)
            assert error["name"] == "MODEL_NOT_FOUND", error
            message = error["message"]
            assert str(repository) not in message and "identity" not in message.replace(name, ""), message
        assert conn.error("infer", model="x" * 300, inputs={"x": b""})["name"] == "MODEL_NOT_FOUND"
    assert not log_problems(proc.log())


@pytest.mark.parametrize("args, message", [
    (["--max-buffered", "0"], "--max-buffered: expected a positive integer, got 0"),
    (["--max-buffered-per-connection", "1e6"], "expected a positive integer, got '1e6'"),
    (["--max-buffered", "1000", "--max-buffered-per-connection", "2000"], "exceeds max_buffered (1000 bytes)"),
    (["--idle-timeout", "-1"], "--idle-timeout: expected a number of seconds >= 0"),
    (["--receive-timeout", "nan"], "--receive-timeout: expected a number of seconds >= 0, got 'nan'"),
    (["--write-timeout", "inf"], "write_timeout_s must be a finite number of seconds >= 0"),
    (["--min-receive-rate", "-5"], "--min-receive-rate: expected a whole number >= 0, got -5"),
])
def test_bad_memory_and_reaping_flags_are_refused(repository, tmp_path, args, message):
    assert_cli_refuses(repository, tmp_path, args, message)
