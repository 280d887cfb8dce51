"""Overlap on a simulated GPU: does a node keep the device busy?  CPU only.

A node of ``FakeGpu`` (trtserve_bench/fakegpu.py: a forward that holds the GIL for
``stage_us`` to stage a batch, then runs it for ``device_us`` on a device process of its
own) configured as ResNet-18 is served on a GPU (``instance_num = 2, max = 8,
batching_timeout = 1``, overlap on), driven by one event-loop thread with 64 requests in
flight (``PipeDriver``, as the server drives a model).  Reported per case: req/s and its
ratio to the device's batch-8 rate, mean batch, the device's idle fraction (time it had
nothing to run) and the fraction of batches launched while the instance's previous batch
was still on the device.

Target (``--enforce-targets``): with one device and ``stage_us`` well under ``device_us``
(300 against 700, the H100's ratio for ResNet-18 from CUDA graphs), overlap keeps the
device idle at most 5 % of the time.  ``overlap_off`` is there for comparison: two
instances sharing one FIFO device hide each other's staging, so it does nearly as well.
``two_streams`` lets the two instances run at once (a GPU running both streams): the host
is then the limit, and req/s measures the node's host cost per batch.  ``light_staging``
(100 us): reported, no target.

Measured on a 2-vCPU VM, 2026-12-08, best of 2 (ratio to the device's batch-8 rate, device
idle): one_device 0.93, 1.8 %; overlap_off 0.91, 2.4 %; two_streams 0.81 of two devices,
12 %; light_staging 0.84, 10 % (the device waits more with less staging, with the runtime
core before the current one too: not explained yet).  With bench/trtserve_bench/fakegpu.py
adapted to ``init(config, kwargs)``, that core (5ccb3df) measured the same within 3 %.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import trtserve
from trtserve_bench.fakegpu import Devices, FakeGpu
from trtserve_bench.inproc import PipeDriver
from trtserve_bench.runner import Settings, measure

pytestmark = pytest.mark.timeout(300)

trtserve.register("FakeGpu", FakeGpu)

CONCURRENCY = 64
MAX = 8
CASES = {
    "one_device": dict(stage_us=300.0, device_us=700.0, overlap=True, streams=1),
    "overlap_off": dict(stage_us=300.0, device_us=700.0, overlap=False, streams=1),
    "two_streams": dict(stage_us=300.0, device_us=700.0, overlap=True, streams=2),
    "light_staging": dict(stage_us=100.0, device_us=700.0, overlap=True, streams=1),
}


def overlap_level(case: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """One measurement: a fresh pipe and devices, a warm-up level, then the measured one;
    the device counters cover the measured windows only."""
    devices = Devices(case["streams"])
    config = {"backend": "FakeGpu", "instance_num": 2, "max": MAX, "batching_timeout": 1,
              "stage_us": case["stage_us"], "device_us": case["device_us"], "fake_overlap": case["overlap"]}
    rng = np.random.default_rng(0)
    values = [{"input": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(16)]
    models = trtserve.pipe(config, devices=devices)
    try:
        warm = Settings(window_s=0.3, max_windows=1, warmup_s=0.2, stability=1000)
        measure(lambda: PipeDriver(models), "fake", values, warm, concurrency=CONCURRENCY)
        backends = [inst.backend for inst in models.pipeline.nodes[0]._instances]
        for backend in backends:
            backend.overlapped = backend.batches = 0
        measured = Settings(window_s=settings.window_s, max_windows=3, warmup_s=0.3, stability=1000)
        device: dict[str, float] = {}

        def probe() -> None:  # the device counters over the measured windows
            time.sleep(measured.warmup_s + 0.05)
            devices.reset()
            time.sleep(measured.window_s * 3 * 0.9)
            device.update(devices.snapshot())

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        row = measure(lambda: PipeDriver(models), "fake", values, measured, concurrency=CONCURRENCY)
        prober.join()
    finally:
        models.close()
        devices.close()
    batches = sum(b.batches for b in backends)
    device_rate = case["streams"] * MAX * 1e6 / case["device_us"]
    return {"rps": row["throughput"], "ratio_to_device": row["throughput"] / device_rate, "errors": row["errors"],
            "mean_batch": row.get("server_avg_batch"), "p50_ms": row["p50_ms"],
            "overlapped": sum(b.overlapped for b in backends) / max(batches, 1), **device}


@pytest.mark.parametrize("case", list(CASES))
def test_overlap_keeps_the_device_busy(benchmark, target, settings, repeats, case):
    spec = CASES[case]
    rows = benchmark.pedantic(lambda: [overlap_level(spec, settings) for _ in range(repeats)], rounds=1, iterations=1)
    best = max(rows, key=lambda r: r["rps"])
    info = benchmark.extra_info
    info.update(case=case, **spec, **{k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()})
    info["rps_runs"] = [round(r["rps"]) for r in rows]
    if case == "one_device":
        target("device_idle", best["device_idle"], "<=", 0.05)
    assert all(r["errors"] == 0 for r in rows)
