"""Fixtures for the load benchmarks: servers as child processes, measurement settings, targets.

    pytest bench/ --benchmark-json=/tmp/bench.json     # every suite; raw results where you say
    python -m trtserve_bench.summarize /tmp/bench.json --csv bench.csv > bench.md   # the summary
    pytest bench/ --enforce-targets                    # fail tests whose ratio misses its target

Load tests measure with trtserve-bench's own windows; pytest-benchmark's timing of such a
test is only its wall time, and the numbers that matter (RPS, percentiles, ratios, target
verdicts) are in each benchmark's ``extra_info``.  The raw JSON also holds every timing
round (megabytes); bench/results/ keeps only the summaries.  Every comparison is measured
in the same test, the two sides alternating ``--bench-repeats`` times, best of each kept:
on a shared machine the best run is the one least disturbed by neighbours.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trtserve_bench.runner import Settings
from trtserve_bench.serverproc import REPO_ROOT, ServerProcess, echo_argv, trtserve_argv

REPOSITORY = REPO_ROOT / "model_repository"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trtserve-bench")
    group.addoption("--bench-window-ms", type=float, default=500.0, help="measurement window (default 500 ms)")
    group.addoption("--bench-max-windows", type=int, default=8, help="windows per level before giving up on stability")
    group.addoption("--bench-repeats", type=int, default=2, help="alternating repeats of each side of a comparison")
    group.addoption("--enforce-targets", action="store_true", help="fail a test whose measured ratio misses its target")


@pytest.fixture(scope="session")
def settings(request: pytest.FixtureRequest) -> Settings:
    opt = request.config.getoption
    return Settings(window_s=opt("--bench-window-ms") / 1e3, max_windows=opt("--bench-max-windows"), warmup_s=0.3)


@pytest.fixture(scope="session")
def repeats(request: pytest.FixtureRequest) -> int:
    return max(1, request.config.getoption("--bench-repeats"))


@pytest.fixture(scope="session")
def repository() -> Path:
    return REPOSITORY


@pytest.fixture(scope="session")
def trtserve_server():
    """`trtserve serve` on the example repository, 127.0.0.1, an ephemeral port; always stopped."""
    with ServerProcess(trtserve_argv(REPOSITORY, ["--log-level", "WARNING"])) as server:
        yield server


@pytest.fixture(scope="session")
def threaded_identity_server(tmp_path_factory):
    """The example identity with ``inline = false``: the same model on an instance thread,
    as every model that computes for longer runs (the hand-off's price, reported)."""
    root = tmp_path_factory.mktemp("threaded") / "repository"
    (root / "identity").mkdir(parents=True)
    config = (REPOSITORY / "identity" / "config.toml").read_text()
    assert "inline = true" in config, "the example identity is expected to be inline"
    (root / "identity" / "config.toml").write_text(config.replace("inline = true", "inline = false"))
    with ServerProcess(trtserve_argv(root, ["--log-level", "WARNING"])) as server:
        yield server


@pytest.fixture(scope="session")
def echo_server():
    """bench/echo_server.py: the same framing and nothing else (the floor)."""
    with ServerProcess(echo_argv()) as server:
        yield server


@pytest.fixture(scope="session")
def bare_server():
    """trtserve_bench/bare.py: plain sockets, no msgpack, no asyncio (the transport's floor)."""
    import sys

    with ServerProcess([sys.executable, "-m", "trtserve_bench.bare", "serve", "--host", "127.0.0.1", "--port", "0"]) as server:
        yield server


@pytest.fixture
def target(benchmark: Any, request: pytest.FixtureRequest) -> Callable[..., bool]:
    """``target(name, value, "<=", threshold)``: record a ratio and its verdict in extra_info."""
    ops = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
    enforce = request.config.getoption("--enforce-targets")

    def check(name: str, value: float, op: str, threshold: float) -> bool:
        met = bool(ops[op](value, threshold))
        benchmark.extra_info.setdefault("targets", {})[name] = {"value": round(value, 4), "target": f"{op} {threshold}", "met": met}
        if enforce:
            assert met, f"{name} = {value:.3f}, target {op} {threshold}"
        return met

    return check
