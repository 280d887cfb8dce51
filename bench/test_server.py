"""trtserve over TCP against its floors, each pair measured in the same test.

* Identity, one client in flight: p50/p99 vs the echo server (same framing, same client).
  Target: trtserve p50 <= 2x echo p50.
* Identity, many requests pipelined over 4 connections: throughput vs echo with the same
  client.  Target: >= 0.5x echo.  The example identity is ``inline`` (its forward runs on
  the event loop); the same model on an instance thread is measured beside it and
  reported without a target: that hand-off is what a model with real compute pays.
* tensor_mlp (batched) through the server at high concurrency vs in-process ``pipe()`` at
  the same concurrency.  Target: >= 0.8x pipe() throughput.
* 600 KB tensors (one [1,3,224,224] float32 image), 16 in flight on one connection: the
  echo server vs the bare-socket echo (trtserve_bench/bare.py, the transport's floor).
  Target: >= 0.6x.  The same tensors through trtserve's Identity are reported beside them.

Both servers are child processes (bench/conftest.py) so the client and the server do not
share a GIL, as in production; the load generator is trtserve-bench's raw pipelined driver.
"""
from __future__ import annotations

import numpy as np
import pytest

import trtserve
from trtserve_bench import bare
from trtserve_bench.drivers import RawDriver
from trtserve_bench.inproc import pipe_statistics, threaded_level
from trtserve_bench.output import best, summary
from trtserve_bench.runner import alternate, measure

pytestmark = pytest.mark.timeout(280)

ROW = {"input": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)}
CONNECTIONS = 4


def over_wire(server, model: str, concurrency: int, settings, values=None) -> dict:
    values = values or [ROW]
    return measure(lambda: RawDriver(server.host, server.port, model, connections=CONNECTIONS), model, values, settings, concurrency=concurrency)


def test_identity_latency_vs_echo(benchmark, target, trtserve_server, echo_server, settings, repeats):
    trt_rows, echo_rows = benchmark.pedantic(
        alternate,
        args=(repeats, lambda: over_wire(trtserve_server, "identity", 1, settings), lambda: over_wire(echo_server, "identity", 1, settings)),
        rounds=1,
        iterations=1,
    )
    trt, echo = best(trt_rows, "p50_ms", lowest=True), best(echo_rows, "p50_ms", lowest=True)
    benchmark.extra_info.update(trtserve=summary(trt), echo=summary(echo), p50_ms=trt["p50_ms"], p99_ms=trt["p99_ms"], rps=round(trt["throughput"], 1))
    benchmark.extra_info["p99_ratio_to_echo"] = round(trt["p99_ms"] / echo["p99_ms"], 4)
    target("p50_ratio_to_echo", trt["p50_ms"] / echo["p50_ms"], "<=", 2.0)
    assert trt["errors"] == 0 and echo["errors"] == 0


def test_identity_pipelined_vs_echo(benchmark, target, trtserve_server, threaded_identity_server, echo_server, settings, repeats):
    concurrency = 64
    trt_rows, threaded_rows, echo_rows = benchmark.pedantic(
        alternate,
        args=(repeats, lambda: over_wire(trtserve_server, "identity", concurrency, settings),
              lambda: over_wire(threaded_identity_server, "identity", concurrency, settings),
              lambda: over_wire(echo_server, "identity", concurrency, settings)),
        rounds=1,
        iterations=1,
    )
    trt, threaded, echo = best(trt_rows), best(threaded_rows), best(echo_rows)
    benchmark.extra_info.update(concurrency=concurrency, connections=CONNECTIONS, trtserve=summary(trt), echo=summary(echo),
                                threaded=summary(threaded), rps=round(trt["throughput"], 1))
    benchmark.extra_info["threaded_ratio_to_echo"] = round(threaded["throughput"] / echo["throughput"], 4)
    target("throughput_ratio_to_echo", trt["throughput"] / echo["throughput"], ">=", 0.5)
    assert trt["errors"] == 0 and threaded["errors"] == 0 and echo["errors"] == 0


@pytest.fixture(scope="module")
def mlp_pipe(repository):
    models = trtserve.pipe(repository / "tensor_mlp" / "config.toml")
    yield models
    models.close()


def in_process(models, concurrency: int, settings) -> dict:
    x = ROW["input"]
    return threaded_level(lambda _: lambda: models({"data": x}), concurrency, settings, statistics=lambda: pipe_statistics(models))


def test_batched_model_server_vs_pipe(benchmark, target, trtserve_server, mlp_pipe, settings, repeats):
    concurrency = 32
    values = [{"x": ROW["input"]}]
    server_rows, pipe_rows = benchmark.pedantic(
        alternate,
        args=(repeats, lambda: over_wire(trtserve_server, "tensor_mlp", concurrency, settings, values), lambda: in_process(mlp_pipe, concurrency, settings)),
        rounds=1,
        iterations=1,
    )
    server, pipe = best(server_rows), best(pipe_rows)
    benchmark.extra_info.update(concurrency=concurrency, server=summary(server), pipe=summary(pipe), rps=round(server["throughput"], 1),
                                p50_ms=server["p50_ms"], p99_ms=server["p99_ms"])
    target("throughput_ratio_to_pipe", server["throughput"] / pipe["throughput"], ">=", 0.8)
    assert server["errors"] == 0


BIG = {"input": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}


def test_big_tensors_echo_vs_bare_floor(benchmark, target, trtserve_server, echo_server, bare_server, settings, repeats):
    concurrency, seconds = 16, settings.window_s * 3

    def framed(server):
        return measure(lambda: RawDriver(server.host, server.port, "identity", connections=1), "identity", [BIG], settings,
                       concurrency=concurrency)

    echo_rows, trt_rows, bare_rows = benchmark.pedantic(
        alternate,
        args=(repeats, lambda: framed(echo_server), lambda: framed(trtserve_server),
              lambda: bare.load(bare_server.host, bare_server.port, BIG["input"].nbytes, concurrency, seconds)),
        rounds=1,
        iterations=1,
    )
    echo, trt, floor = best(echo_rows), best(trt_rows), best(bare_rows)
    benchmark.extra_info.update(concurrency=concurrency, request_bytes=BIG["input"].nbytes, echo=summary(echo),
                                trtserve=summary(trt), bare=floor, rps=round(echo["throughput"], 1))
    benchmark.extra_info["trtserve_ratio_to_echo"] = round(trt["throughput"] / echo["throughput"], 4)
    target("echo_ratio_to_bare", echo["throughput"] / floor["throughput"], ">=", 0.6)
    assert echo["errors"] == 0 and trt["errors"] == 0
