"""Consistency under concurrency: 64 clients, the example models, every answer checked.

32 threads use the sync Client and 32 asyncio tasks use AsyncClient, half of each with a
client of their own and half sharing one pooled client (so requests from different callers
interleave on the same connections).  They mix identity, tensor_mlp and classifier
requests, one at a time and pipelined.  Every response must equal the direct computation
(numpy / onnxruntime / OpenCV, no trtserve) for its own input, and every request id must
come back exactly once, on the client and in the server's counters.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from trtserve_client import AsyncClient, Client

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2] / "model_repository"
THREADS = 32
TASKS = 32
PER_WORKER = 30  # 64 x 30 = 1920 requests
PIPELINE = 6  # requests an async worker keeps in flight at once in its pipelined phases
IMAGES = 24
SIZE = 64  # classifier/config.toml resizes to 64 x 64
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # batched and single-row kernels may round differently
TIME_BUDGET_S = 30.0


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(REPO / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


class Plan:
    """Every request of the run, by id: the model, the inputs and the expected outputs."""

    def __init__(self, count: int) -> None:
        rng = np.random.default_rng(7)
        self.jpegs = [self._jpeg(rng) for _ in range(IMAGES)]
        self._classifier, self._mlp = _session("classifier"), _session("tensor_mlp")
        probs = [self._probs(jpeg) for jpeg in self.jpegs]
        self.requests = [self._request(rid, probs) for rid in range(count)]

    @staticmethod
    def _jpeg(rng: np.random.Generator) -> bytes:
        h, w = rng.integers(32, 128, size=2)
        ok, encoded = cv2.imencode(".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert ok
        return encoded.tobytes()

    def _probs(self, jpeg: bytes) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(cv2.resize(bgr, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        return self._classifier.run(None, {"image": rgb[np.newaxis]})[0][0]

    def _request(self, rid: int, probs: list[np.ndarray]) -> tuple[str, Any, dict[str, Any]]:
        kind = rid % 3
        if kind == 0:  # the id itself travels and comes back: a direct lost/duplicate check
            x = np.array([rid, rid * 7 + 1, -rid], dtype=np.int64)
            return "identity", x, {"output": x}
        if kind == 1:  # 1 to 3 rows: requests of several rows share batches with others
            x = np.random.default_rng(rid).standard_normal((1 + rid % 3, 16)).astype(np.float32)
            return "tensor_mlp", x, {"y": self._mlp.run(None, {"x": x})[0]}
        image = rid % IMAGES
        return "classifier", self.jpegs[image], {"probs": probs[image]}

    def check(self, rid: int, outputs: dict[str, Any]) -> None:
        model, _, expected = self.requests[rid]
        assert set(outputs) == set(expected), (rid, model, list(outputs))
        for name, want in expected.items():
            got = outputs[name]
            assert got.shape == want.shape and got.dtype == want.dtype, (rid, model, got.shape, got.dtype)
            if model == "identity":
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_allclose(got, want, **TOLERANCE, err_msg=f"request {rid} ({model})")


class Tally:
    """Which request ids came back, from every worker (thread-safe)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def record(self, plan: Plan, rid: int, outputs: dict[str, Any]) -> None:
        plan.check(rid, outputs)
        with self._lock:
            self.ids.append(rid)

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)


def worker_ids(worker: int) -> list[int]:
    return list(range(worker * PER_WORKER, (worker + 1) * PER_WORKER))


def sync_worker(client: Client, plan: Plan, tally: Tally, worker: int, start: threading.Event) -> None:
    start.wait()
    try:
        for rid in worker_ids(worker):
            model, inputs, _ = plan.requests[rid]
            tally.record(plan, rid, client.infer(model, inputs))
    except BaseException as exc:  # reported by the test thread, which owns the assertions
        tally.fail(exc)


async def async_worker(client: AsyncClient, plan: Plan, tally: Tally, worker: int) -> None:
    """Alternates one-at-a-time phases with pipelined phases of PIPELINE requests."""

    async def one(rid: int) -> None:
        model, inputs, _ = plan.requests[rid]
        tally.record(plan, rid, await client.infer(model, inputs))

    ids = worker_ids(worker)
    try:
        for phase, start in enumerate(range(0, len(ids), PIPELINE)):
            chunk = ids[start : start + PIPELINE]
            if phase % 2:
                await asyncio.gather(*(one(rid) for rid in chunk))
            else:
                for rid in chunk:
                    await one(rid)
    except BaseException as exc:
        tally.fail(exc)


async def run_async_workers(host: str, port: int, plan: Plan, tally: Tally, first_worker: int) -> None:
    own = [AsyncClient(host, port, timeout=60) for _ in range(TASKS // 2)]
    shared = AsyncClient(host, port, connections=4, timeout=60)
    clients = own + [shared] * (TASKS - len(own))
    try:
        await asyncio.gather(*(async_worker(c, plan, tally, first_worker + i) for i, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in own + [shared]))


@pytest.fixture(scope="module")
def plan() -> Plan:
    return Plan((THREADS + TASKS) * PER_WORKER)


def test_64_concurrent_clients_get_exactly_their_own_answers(server_factory, plan):
    server = server_factory(REPO)
    tally = Tally()
    own = [Client(server.host, server.port, timeout=60) for _ in range(THREADS // 2)]
    shared = Client(server.host, server.port, connections=4, timeout=60)
    clients = own + [shared] * (THREADS - len(own))
    start = threading.Event()
    threads = [
        threading.Thread(target=sync_worker, args=(c, plan, tally, i, start), name=f"consistency-{i}")
        for i, c in enumerate(clients)
    ]
    try:
        for thread in threads:
            thread.start()
        began = time.monotonic()
        start.set()
        asyncio.run(run_async_workers(server.host, server.port, plan, tally, first_worker=THREADS))
        for thread in threads:
            thread.join(TIME_BUDGET_S)
        elapsed = time.monotonic() - began
        statistics = shared.statistics()
    finally:
        for client in own + [shared]:
            client.close()

    assert not tally.errors, tally.errors[:3]
    assert not any(t.is_alive() for t in threads)
    assert elapsed < TIME_BUDGET_S, f"{len(plan.requests)} requests took {elapsed:.1f} s"
    counts = Counter(tally.ids)
    assert len(counts) == len(plan.requests) and set(counts) == set(range(len(plan.requests)))  # none lost
    assert max(counts.values()) == 1  # none duplicated
    sent = Counter(model for model, _, _ in plan.requests)
    served = {row["name"]: row["success_count"] for row in statistics["models"]}
    assert {model: served[model] for model in sent} == dict(sent)  # the server ran each exactly once
