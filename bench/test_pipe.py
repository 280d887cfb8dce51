"""In-process ``trtserve.pipe()`` vs calling onnxruntime directly, in the same test.

Targets:
* at concurrency >= 2 * instance_num * max, pipe() reaches >= 85% of direct onnxruntime's
  throughput (rows/s) at batch ``max``;
* at concurrency 1, pipe()'s p50 <= direct batch-1 p50 + 0.2 ms.

Three models, each a node as configured, fed one row per call:

* ``wide_mlp``: tensor_mlp's config (1 instance, max 8) with two 2048-wide hidden layers,
  built on the fly (~0.8 ms per batch of 8): compute dominates, as in real models.  The
  target is measured here.
* ``classifier``: the example CNN of model_repository/classifier (its ``model`` node: 2
  instances, max 8; HWC uint8 64x64 images, ~1.3 ms per batch of 8).  Reported, no
  target: on a 2-core machine its two onnxruntime instances take both cores, so the
  direct side (2 threads, nothing else to run) is bound to win by the callers' Python.
* ``tensor_mlp``: the 16 -> 4 example MLP.  A batch of 8 costs onnxruntime ~5 us, so its
  ratio only measures the scheduler's per-request cost (~35 us of Python under one GIL);
  reported, no target (docs/performance.md explains why no Python scheduler can reach it).

Direct onnxruntime runs the backend's session options (1 intra-op and 1 inter-op thread)
with the node's parallelism: ``instance_num`` threads, a session each, calling
``session.run`` at batch ``max`` back to back.  The difference is the scheduler: queueing,
batching, thread hand-offs.
"""
from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import trtserve
from trtserve_bench.inproc import pipe_statistics, threaded_level
from trtserve_bench.models import wide_mlp_folder
from trtserve_bench.output import best, summary

pytestmark = pytest.mark.timeout(300)

WIDE_HIDDEN = 2048


@dataclass
class Subject:
    """A node to measure: its config (model path absolute), a row maker, and whether the
    85 % target applies to it."""

    name: str
    config: dict[str, Any]
    row: Callable[[np.random.Generator], np.ndarray]  # one request's data
    batched: bool  # the row already has its batch dimension
    targeted: bool

    @property
    def model_path(self) -> str:
        return self.config["model"]

    def node(self, key: str, default: int = 1) -> int:
        return int(self.config.get(key, default))


def node_config(folder: Path, node: str | None = None) -> dict[str, Any]:
    with open(folder / "config.toml", "rb") as fh:
        config = tomllib.load(fh)
    config = dict(config[node]) if node else config
    config.pop("next", None)
    config["model"] = str(folder / "1" / config["model"])
    return config


def mlp_row(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((1, 16)).astype(np.float32)


def image_row(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # what the preprocess node hands on


@pytest.fixture(scope="module", params=["wide_mlp", "classifier", "tensor_mlp"])
def subject(request, repository, tmp_path_factory) -> Subject:
    if request.param == "classifier":
        return Subject("classifier", node_config(repository / "classifier", "model"), image_row, False, False)
    if request.param == "wide_mlp":
        folder = wide_mlp_folder(repository, tmp_path_factory.mktemp("models"), WIDE_HIDDEN)
        return Subject("wide_mlp", node_config(folder), mlp_row, True, True)
    return Subject("tensor_mlp", node_config(repository / "tensor_mlp"), mlp_row, True, False)


@pytest.fixture(scope="module")
def subject_pipe(subject):
    models = trtserve.pipe(subject.config)
    yield models
    models.close()


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the OnnxRuntime backend's defaults
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions(subject):
    return [session(subject.model_path) for _ in range(subject.node("instance_num"))]


def direct_level(subject: Subject, sessions: list, batch: int, settings) -> dict:
    """One thread per instance, each calling its own session.run on ``batch`` rows back to
    back; throughput in rows/s."""
    rng = np.random.default_rng(0)
    rows = [subject.row(rng) for _ in range(batch)]
    x = np.concatenate(rows) if subject.batched else np.stack(rows)
    name = sessions[0].get_inputs()[0].name

    def make_call(index: int):
        run = sessions[index].run
        return lambda: run(None, {name: x})

    row = threaded_level(make_call, len(sessions), settings, label=f"ort b={batch} x{len(sessions)}")
    row["rows_per_s"] = row["throughput"] * batch
    return row


def pipe_level(subject: Subject, models, concurrency: int, settings) -> dict:
    """``concurrency`` threads, each sending one row per call; throughput = rows/s."""
    rng = np.random.default_rng(1)

    def make_call(index: int):
        x = subject.row(rng)
        return lambda: models({"data": x})

    row = threaded_level(make_call, concurrency, settings, statistics=lambda: pipe_statistics(models), label=f"pipe c={concurrency}")
    row["rows_per_s"] = row["throughput"]
    return row


@pytest.mark.parametrize("concurrency", [1, 8, 32])
def test_pipe_vs_direct_onnxruntime(benchmark, target, subject, subject_pipe, sessions, settings, repeats, concurrency):
    batch_max = subject.node("max")
    saturating = 2 * subject.node("instance_num") * batch_max
    if concurrency == 1:
        # Latency: one caller, one session, batch 1.
        direct_sessions, direct_batch = sessions[:1], 1
    else:
        direct_sessions, direct_batch = sessions, batch_max

    def run():
        pipes, directs = [], []
        for _ in range(repeats):  # alternate, so drift on a shared machine hits both sides
            pipes.append(pipe_level(subject, subject_pipe, concurrency, settings))
            directs.append(direct_level(subject, direct_sessions, direct_batch, settings))
        return pipes, directs

    pipes, directs = benchmark.pedantic(run, rounds=1, iterations=1)
    info = benchmark.extra_info
    if concurrency == 1:
        pipe, direct = best(pipes, "p50_ms", lowest=True), best(directs, "p50_ms", lowest=True)
        info.update(pipe=summary(pipe), direct_batch1=summary(direct))
        target("p50_overhead_ms", pipe["p50_ms"] - direct["p50_ms"], "<=", 0.2)
    else:
        pipe, direct = best(pipes, "rows_per_s"), best(directs, "rows_per_s")
        info.update(pipe=summary(pipe), direct_batch_max=summary(direct), direct_rows_per_s=round(direct["rows_per_s"], 1),
                    direct_threads=len(direct_sessions))
        ratio = pipe["rows_per_s"] / direct["rows_per_s"]
        if concurrency >= saturating and subject.targeted:
            target("throughput_ratio_vs_direct_batch_max", ratio, ">=", 0.85)
        else:
            info["throughput_ratio_vs_direct_batch_max"] = round(ratio, 4)
    info.update(model=subject.name, concurrency=concurrency, rps=round(pipe["throughput"], 1), p50_ms=pipe["p50_ms"], p99_ms=pipe["p99_ms"])
    assert pipe["errors"] == 0 and pipe["count"] > 0
