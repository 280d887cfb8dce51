"""1,000 load/unload cycles of a model whose backend.py holds module-level data (a 780 KiB
weight table, as a real one would): RSS reaches a plateau.  A module and its classes form
reference cycles that only the cyclic collector frees, and it rarely runs, so without the
release on unload (modelcode.py) each cycle's data piles up: 46 -> 87 MiB over 1,000
cycles of this model, still rising.  Bound: after ``WARMUP`` cycles, at most
``RSS_BOUND_MB`` more over the rest (measured: 0.1-1.5 MiB on a 2-core VM)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .conftest import array, tensor, write_model
from .ops_support import rss_mb, server_process, thread_count, wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CYCLES = 1000
WARMUP = 200
RSS_BOUND_MB = 4
WEIGHTED = """
import numpy as np
import trtserve

WEIGHTS = np.random.default_rng(0).standard_normal((100, 1000))  # 780 KiB, built at import


class Weighted(trtserve.Backend):
    def forward(self, items):
        for item in items:
            item["result"] = np.asarray(item["data"]) * WEIGHTS[0, 0]


trtserve.register("Weighted", Weighted)
"""


@pytest.fixture
def repository(tmp_path) -> Path:
    root = tmp_path / "repo"
    folder = write_model(root, "weighted", 'backend = "Weighted"\n')
    (folder / "backend.py").write_text(WEIGHTED)
    return root


def test_rss_plateaus_over_a_thousand_load_unload_cycles(repository, tmp_path):
    args = ("--model-control", "explicit", "--log-level", "WARNING")
    with server_process(repository, tmp_path / "server.log", *args) as proc, proc.connect() as conn:
        pid, samples = proc.proc.pid, {}
        x = np.ones(3, np.float32)
        scale = float(np.random.default_rng(0).standard_normal((100, 1000))[0, 0])
        for cycle in range(1, CYCLES + 1):
            conn.result("load", model="weighted")
            result = conn.result("infer", model="weighted", inputs={"x": tensor(x)})
            np.testing.assert_allclose(array(result["outputs"]["output"]), x * scale, rtol=1e-6)
            conn.result("unload", model="weighted")
            if cycle in (WARMUP, CYCLES // 2, CYCLES):
                samples[cycle] = rss_mb(pid)
                if cycle == WARMUP:
                    threads = thread_count(pid)
        wait_for(lambda: thread_count(pid) <= threads, 10, "threads back to the warmed-up count")
    grown = samples[CYCLES] - samples[WARMUP]
    print(f"RSS over load/unload cycles (MiB): {samples}")
    assert grown < RSS_BOUND_MB, f"RSS grew {grown:.1f} MiB from cycle {WARMUP} to {CYCLES}: {samples}"
