"""Hostile clients against the server's memory: the request-memory budget (server/budget.py)
and the msgpack limits (clients/trtserve_client/limits.py), each attack of
docs/operations.md's table run against a ``trtserve serve`` subprocess on 127.0.0.1, with
the bounds asserted: RSS under the configured budget plus ``MARGIN_MB``, and a normal client served
within hostile_support's p99 bound while the attack runs."""
from __future__ import annotations

import time

import numpy as np
import pytest

from .conftest import RawConn
from .hostile_support import MIB, assert_normal_client_served, attack, baseline_p99
from .ops_support import log_problems, rss_mb, server_process, wait_for

pytestmark = pytest.mark.timeout(120)

BUDGET = 128 * MIB
MARGIN_MB = 64  # interpreter, allocator slack and the frames' Python objects


def test_stalled_large_frames_stay_within_the_budget(repository, tmp_path):
    """30 connections each send 60 MiB of a 60 MiB + 1 byte frame, then stall (no token):
    two frames fit the 128 MiB budget, the rest wait unread; the stalled ones are closed by
    the receive-rate check and the next admitted.  RSS stays under the budget plus a margin."""
    args = ("--max-buffered", str(BUDGET), "--receive-timeout", "2", "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc:
        pid = proc.proc.pid
        unloaded = baseline_p99(proc.host, proc.port)
        base = rss_mb(pid)
        with attack("stall-frames", proc.port, 30, 60 * MIB, 3) as stall:
            sent = stall.ready["sent"]
            assert len(sent) == 30 and sent.count(60 * MIB) >= 2  # the budget's worth got in
            assert sum(s < 16 * MIB for s in sent) >= 20  # the others were not read past the kernel's buffers
            assert_normal_client_served(proc.host, proc.port, unloaded)
            peak = rss_mb(pid)
            give_up = time.monotonic() + 8
            while "arriving too slowly" not in proc.log() or time.monotonic() < give_up - 4:
                peak = max(peak, rss_mb(pid))  # while stalled frames are reaped and others admitted
                assert time.monotonic() < give_up, "no stalled frame was closed"
                time.sleep(0.1)
            attacked = assert_normal_client_served(proc.host, proc.port, unloaded)
            end = stall.finish()
        assert end["closed"] >= 2
        assert peak < base + BUDGET / MIB + MARGIN_MB, f"RSS {peak:.0f} MiB from {base:.0f} MiB"
        print(f"stalled frames: RSS {base:.0f} -> peak {peak:.0f} MiB (budget {BUDGET // MIB} MiB); normal client p99 "
              f"{unloaded:.2f} ms unloaded, {attacked:.2f} ms attacked; {end['closed']} stalled connections closed")
    assert not log_problems(proc.log())


@pytest.mark.parametrize("io_threads", [1, 2])
def test_a_frame_waiting_for_room_goes_on_when_room_appears(repository, tmp_path, io_threads):
    """The budget is full of a stalled frame: a normal client's 3 MiB request waits unread
    (not refused), then is served once the stalled connection is closed.  With two I/O
    loops the two connections are on different loops: one budget, resumed across them."""
    args = ("--max-buffered", str(8 * MIB), "--receive-timeout", "1", "--log-level", "WARNING",
            "--io-threads", str(io_threads))
    with server_process(repository, tmp_path / "server.log", *args) as proc:
        with attack("stall-frames", proc.port, 1, 7 * MIB, 4) as stall:
            assert stall.ready["sent"] == [7 * MIB]
            blob = np.random.default_rng(0).bytes(3 * MIB)
            with RawConn(proc.host, proc.port, timeout=20) as conn:
                started = time.monotonic()
                result = conn.result("infer", model="blob", inputs={"blob": blob})
                waited = time.monotonic() - started
            assert bytes(result["outputs"]["echoed"]) == blob
            assert 0.5 < waited < 10, waited  # it waited for the stalled frame's close
            assert stall.finish()["closed"] == 1


def test_a_frame_that_can_never_fit_is_resource_exhausted(repository, tmp_path):
    args = ("--max-buffered-per-connection", str(MIB), "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc, proc.connect() as conn:
        conn.request("infer", model="blob", inputs={"blob": bytes(2 * MIB)})
        message = conn.recv()
        assert message["id"] is None and message["error"]["name"] == "RESOURCE_EXHAUSTED", message
        assert "--max-buffered-per-connection 1048576" in message["error"]["message"]
        conn.assert_closed()
        with proc.connect() as other:  # a request that fits is served as before
            assert other.result("infer", model="blob", inputs={"blob": bytes(MIB // 2)})


@pytest.mark.parametrize("kind", ["flat", "nested"])
def test_a_frame_of_nils_is_refused_cheaply(repository, tmp_path, kind):
    """One 64 MiB frame holding 67 million nils in an unknown field (or 1,000 arrays of
    60,000), which unpacked would stop the event loop most of a second and take 600 MB, is
    refused before anything is built."""
    with server_process(repository, tmp_path / "server.log", "--log-level", "WARNING") as proc:
        pid = proc.proc.pid
        unloaded = baseline_p99(proc.host, proc.port)
        base = rss_mb(pid)
        with attack("nil-frame", proc.port, kind, 64 * MIB - 64) as bomb:
            answer = bomb.ready["answer"]
            assert answer["id"] is None and answer["error"]["name"] == "PROTOCOL_ERROR", answer
            assert "more than 65536 msgpack values" in answer["error"]["message"]
            assert bomb.ready["seconds"] < 2.0  # mostly the 64 MiB crossing the socket
            attacked = assert_normal_client_served(proc.host, proc.port, unloaded)
            bomb.finish()
        grown = rss_mb(pid) - base
        assert grown < 64 + MARGIN_MB  # the frame's own buffer, nothing built from it
        print(f"{kind} nil frame: refused {bomb.ready['seconds']:.3f} s after sending began; RSS +{grown:.0f} MiB; "
              f"normal client p99 {unloaded:.2f} / {attacked:.2f} ms")
        wait_for(lambda: proc.proc.poll() is None, 1, "server alive")
