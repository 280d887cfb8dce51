"""Inputs through system shared memory against in-process ``pipe()``: a model with 600 KB inputs.

``image_cnn`` is an ONNX model built here: ``image float32 [N, 3, 224, 224]`` (602,112 bytes
a row, one ResNet input) -> Conv 8x8 stride 4, 8 channels -> Relu -> global average pool ->
Gemm -> ``logits float32 [N, 10]``: 0.3-0.6 ms of ONNX Runtime per row on one core, batched
up to 8 on one instance.

* **server, shared memory**: ``trtserve serve`` in a child process; trtserve-bench's raw
  driver with ``--shared-memory system`` (the 16 inputs are written into one region once;
  each request carries a reference), 16 in flight on one connection;
* **server, inline**: the same with the 600 KB in every request (reported beside it);
* **in-process**: the same configuration through ``trtserve.pipe()`` at the same concurrency,
  driven from one event loop (PipeDriver) and from 16 threads; the better of the two is the
  reference.

Target: server over shared memory >= 0.8x in-process.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import trtserve
from trtserve_bench.drivers import RawDriver
from trtserve_bench.inproc import PipeDriver, pipe_statistics, threaded_level
from trtserve_bench.output import best, summary
from trtserve_bench.runner import alternate, measure
from trtserve_bench.serverproc import ServerProcess, trtserve_argv

pytestmark = pytest.mark.timeout(280)

MODEL = "image_cnn"
CONCURRENCY = 16
CONFIG = 'backend = "OnnxRuntime"\nmodel = "model.onnx"\ninstance_num = 1\nmax = 8\nbatching_timeout = 1\n'
VALUES = [{"image": np.random.default_rng(i).standard_normal((1, 3, 224, 224)).astype(np.float32)} for i in range(16)]


def image_cnn() -> onnx.ModelProto:
    rng = np.random.RandomState(0)
    conv = (rng.standard_normal((8, 3, 8, 8)) * np.sqrt(2 / 192)).astype(np.float32)
    dense = (rng.standard_normal((8, 10)) * np.sqrt(2 / 8)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["image", "conv"], ["c"], kernel_shape=[8, 8], strides=[4, 4]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "dense"], ["logits"])]
    graph = helper.make_graph(
        nodes, MODEL, [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(conv, "conv"), numpy_helper.from_array(dense, "dense")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def image_repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("shm") / "repository"
    (root / MODEL / "1").mkdir(parents=True)
    (root / MODEL / "config.toml").write_text(CONFIG)
    onnx.save(image_cnn(), str(root / MODEL / "1" / "model.onnx"))
    return root


@pytest.fixture(scope="module")
def image_server(image_repository):
    with ServerProcess(trtserve_argv(image_repository, ["--log-level", "WARNING"])) as server:
        yield server


@pytest.fixture(scope="module")
def image_pipe(image_repository):
    models = trtserve.pipe(image_repository / MODEL / "config.toml")
    yield models
    models.close()


def over_wire(server, settings, shared_memory: str | None) -> dict:
    return measure(lambda: RawDriver(server.host, server.port, MODEL, connections=1, shared_memory=shared_memory),
                   MODEL, VALUES, settings, concurrency=CONCURRENCY)


def in_process(models, settings) -> dict:
    loop = measure(lambda: PipeDriver(models), MODEL, VALUES, settings, concurrency=CONCURRENCY)
    xs = [v["image"] for v in VALUES]
    threads = threaded_level(lambda i: lambda: models({"data": xs[i % len(xs)]}), CONCURRENCY, settings,
                             statistics=lambda: pipe_statistics(models))
    return max(loop, threads, key=lambda r: r["throughput"])


def test_shared_memory_inputs_vs_pipe(benchmark, target, image_server, image_pipe, settings, repeats):
    shm_rows, inline_rows, pipe_rows = benchmark.pedantic(
        alternate,
        args=(repeats, lambda: over_wire(image_server, settings, "system"), lambda: over_wire(image_server, settings, None),
              lambda: in_process(image_pipe, settings)),
        rounds=1,
        iterations=1,
    )
    shm, inline, pipe = best(shm_rows), best(inline_rows), best(pipe_rows)
    benchmark.extra_info.update(concurrency=CONCURRENCY, request_bytes=VALUES[0]["image"].nbytes, server_shm=summary(shm),
                                server_inline=summary(inline), pipe=summary(pipe), rps=round(shm["throughput"], 1),
                                p50_ms=shm["p50_ms"], p99_ms=shm["p99_ms"])
    benchmark.extra_info["inline_ratio_to_pipe"] = round(inline["throughput"] / pipe["throughput"], 4)
    target("shm_ratio_to_pipe", shm["throughput"] / pipe["throughput"], ">=", 0.8)
    assert shm["errors"] == 0 and inline["errors"] == 0
