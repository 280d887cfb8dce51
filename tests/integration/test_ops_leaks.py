"""Leaks: 200 load/unload cycles (and 200 reloads) through the server's operations leave the
server subprocess's RSS and thread count where they were after a warm-up.

The model re-executes its ``backend.py`` on every load, starts 2 instance threads and a timer
thread, and runs a warmup sample, so a cycle exercises everything a load builds and an
unload (or a reload's retirement) must release.  Each cycle also answers one request, whose
correctness is checked.

Bounds: RSS is measured after ``WARMUP`` cycles (by then allocator pools, imported modules
and the control executor's threads exist) and again after ``CYCLES``; it may grow less than
``RSS_BOUND_MB`` = 4 MiB.  Measured on the 2-core CI machine: 0.7-0.8 MiB over the 180
cycles, and 1.5-1.7 MiB after 3,000 (a plateau: allocator noise, not a leak).  Keeping every
closed pipeline referenced (a leak of the objects alone, threads joined) costs ~40 KiB per
cycle, 7 MiB over the run, which this bound catches; a leak that keeps instance threads or
their buffers costs far more.  The thread count must come back exactly to the warmed-up
value: every instance, timer and retirement thread is joined or ends.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import array, tensor, write_model
from .ops_support import OPS_BACKENDS, assert_healthy, log_problems, rss_mb, server_process, thread_count, wait_for, write_identity

pytestmark = pytest.mark.timeout(120)

WARMUP = 20
CYCLES = 200
RSS_BOUND_MB = 4  # see the module docstring
MODEL = "cycled"
CONFIG = """backend = "OpsTagged"
tag = 3
instance_num = 2
max = 4

[[warmup]]
count = 1
[warmup.inputs.x]
dtype = "float64"
shape = [1, 3]
"""


@pytest.fixture
def repository(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    write_identity(root)
    folder = write_model(root, MODEL, CONFIG, backend_py=OPS_BACKENDS)
    (folder / "1" / "model.txt").write_text("7")
    return root


def infer_once(conn, i: int) -> None:
    x = np.array([[i, -i, 0.5]], np.float64)
    result = conn.result("infer", model=MODEL, inputs={"x": tensor(x)})
    np.testing.assert_array_equal(array(result["outputs"]["y"]), x + 3007)


def settled(pid: int, threads: int | None = None) -> tuple[float, int]:
    """RSS and thread count once retiring threads have ended (the count stops falling)."""
    if threads is not None:
        wait_for(lambda: thread_count(pid) <= threads, 10, f"thread count back to {threads} (now {thread_count(pid)})")
    else:
        time.sleep(0.05)
    return rss_mb(pid), thread_count(pid)


@pytest.mark.parametrize("mode", ["load_unload", "reload"])
def test_model_cycles_do_not_leak(repository, tmp_path, mode):
    """``load_unload``: load, infer, unload, 200 times.  ``reload``: the model stays loaded and
    each cycle is a load (a hot reload: build beside, swap, retire the old one) plus an infer."""
    with server_process(repository, tmp_path / "server.log", "--model-control", "explicit", "--load-model", "*", "--log-level", "WARNING") as proc, \
            proc.connect() as conn:
        pid = proc.proc.pid
        if mode == "load_unload":
            assert conn.result("unload", model=MODEL) == {"name": MODEL, "state": "UNLOADED"}

        def cycle(i: int) -> None:
            assert conn.result("load", model=MODEL) == {"name": MODEL, "version": 1, "state": "READY"}
            infer_once(conn, i)
            if mode == "load_unload":
                assert conn.result("unload", model=MODEL)["state"] == "UNLOADED"

        for i in range(WARMUP):
            cycle(i)
        rss_warm, threads_warm = settled(pid)
        started = time.monotonic()
        for i in range(WARMUP, CYCLES):
            cycle(i)
        elapsed = time.monotonic() - started
        rss_end, threads_end = settled(pid, threads_warm)
        grown = rss_end - rss_warm
        print(f"{mode}: {CYCLES - WARMUP} cycles in {elapsed:.1f} s; RSS {rss_warm:.1f} -> {rss_end:.1f} MiB; "
              f"threads {threads_warm} -> {threads_end}")
        assert threads_end == threads_warm, f"threads {threads_warm} after the warm-up, {threads_end} after {CYCLES} cycles"
        assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MiB over {CYCLES - WARMUP} cycles (bound {RSS_BOUND_MB} MiB)"
        stats = conn.result("statistics", model=MODEL)["models"] if mode == "reload" else None
        if stats is not None:  # the served version is the last one built: one request (warm-up is not traffic)
            assert stats[0]["success_count"] == 1, stats
        assert_healthy(proc.host, proc.port)
    assert not log_problems(proc.log()), log_problems(proc.log())
