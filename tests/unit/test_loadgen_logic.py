"""The load generator's pure logic: percentiles, stability, pacing, saturation, writers."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtserve_bench import logic, output, summarize
from trtserve_bench.drivers import Driver
from trtserve_bench.inputs import build_inputs
from trtserve_bench.runner import Settings, run_level

# --------------------------------------------------------------------------- percentiles


@pytest.mark.parametrize("q", [0, 1, 50, 90, 95, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy(q, n):
    values = sorted(np.random.default_rng(n).exponential(1.0, size=n).tolist())
    assert logic.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-15)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_matches_numpy_property(values, q):
    values.sort()
    assert logic.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError):
        logic.percentile([], 50)
    with pytest.raises(ValueError):
        logic.percentile([1.0], 101)


def test_latency_summary_in_milliseconds():
    summary = logic.latency_summary([3_000_000, 1_000_000, 2_000_000])  # ns, unsorted
    assert summary["count"] == 3
    assert summary["p50_ms"] == pytest.approx(2.0)
    assert summary["mean_ms"] == pytest.approx(2.0)
    assert summary["min_ms"] == pytest.approx(1.0) and summary["max_ms"] == pytest.approx(3.0)
    assert summary["p99_ms"] == pytest.approx(float(np.percentile([1, 2, 3], 99)))
    assert logic.latency_summary([]) == {"count": 0}


# --------------------------------------------------------------------------- stability


def test_stability_needs_three_windows():
    assert not logic.is_stable([100.0, 100.0])
    assert logic.is_stable([100.0, 100.0, 100.0])


def test_stability_within_ten_percent_of_the_mean():
    assert logic.is_stable([95.0, 100.0, 105.0])  # each within 10% of 100
    assert not logic.is_stable([85.0, 100.0, 115.0])  # 85 is 15% under the mean
    assert logic.is_stable([91.0, 100.0, 109.0], tolerance=0.10)
    assert not logic.is_stable([95.0, 100.0, 105.0], tolerance=0.02)


def test_stability_looks_only_at_the_last_windows():
    assert logic.is_stable([10.0, 500.0, 100.0, 101.0, 99.0])
    assert not logic.is_stable([100.0, 101.0, 99.0, 10.0])


def test_zero_throughput_is_never_stable():
    assert not logic.is_stable([0.0, 0.0, 0.0])


def test_should_stop_at_max_windows_even_if_unstable():
    assert not logic.should_stop([10.0, 100.0], max_windows=5)
    assert logic.should_stop([10.0, 100.0, 1000.0, 1.0, 50.0], max_windows=5)
    assert logic.should_stop([100.0, 100.0, 100.0], max_windows=5)


# --------------------------------------------------------------------------- pacing


def test_constant_schedule_is_evenly_spaced():
    offsets = logic.schedule(200.0, 1000, "constant")
    assert offsets[0] == 0.0
    assert np.allclose(np.diff(offsets), 1 / 200.0)
    assert offsets[-1] == pytest.approx(999 / 200.0)


def test_poisson_schedule_statistics():
    rate, n = 500.0, 20000
    gaps = np.diff(logic.schedule(rate, n, "poisson", seed=7))
    assert gaps.min() >= 0
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)  # exponential mean 1/rate
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV = 1
    # Counts per 100 ms bin are Poisson(50): variance equals the mean.
    counts = np.bincount((np.cumsum(gaps) // 0.1).astype(int))[:-1]
    assert counts.mean() == pytest.approx(50, rel=0.05)
    assert counts.var() == pytest.approx(counts.mean(), rel=0.25)


def test_poisson_schedule_is_reproducible_by_seed():
    assert logic.schedule(100.0, 50, "poisson", seed=1) == logic.schedule(100.0, 50, "poisson", seed=1)
    assert logic.schedule(100.0, 50, "poisson", seed=1) != logic.schedule(100.0, 50, "poisson", seed=2)


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_schedule_rejects_bad_rates(rate):
    with pytest.raises(ValueError):
        logic.schedule(rate, 1)


def test_schedule_rejects_unknown_arrival():
    with pytest.raises(ValueError, match="poisson"):
        logic.schedule(10.0, 1, "bursty")


# --------------------------------------------------------------------------- saturation


def test_cpu_saturation_flag():
    assert logic.cpu_saturated(0.9, 1.0)
    assert logic.cpu_saturated(1.95, 2.0)
    assert not logic.cpu_saturated(0.89, 1.0)
    assert not logic.cpu_saturated(1.0, 0.0)
    assert logic.cpu_fraction(0.5, 2.0) == 0.25
    assert logic.cpu_saturated(0.5, 1.0, threshold=0.5)


# --------------------------------------------------------------------------- server statistics


def test_server_breakdown_is_a_per_request_delta():
    before = {"success_count": 100, "failure_count": 0, "queue_ns": 1_000_000, "compute_ns": 5_000_000, "batch_sizes": {"1": 10, "8": 5}}
    after = {"success_count": 300, "failure_count": 0, "queue_ns": 3_000_000, "compute_ns": 25_000_000, "batch_sizes": {"1": 10, "8": 30, "4": 2}}
    breakdown = logic.server_breakdown(before, after)
    assert breakdown["server_requests"] == 200
    assert breakdown["server_queue_us"] == pytest.approx(10.0)  # 2 ms over 200 requests
    assert breakdown["server_compute_us"] == pytest.approx(100.0)
    assert breakdown["server_avg_batch"] == pytest.approx((8 * 25 + 4 * 2) / 27)


def test_server_breakdown_without_statistics_is_empty():
    assert logic.server_breakdown(None, {"success_count": 1}) == {}
    assert logic.server_breakdown({"success_count": 5}, {"success_count": 5}) == {}


def test_model_entry_finds_the_model():
    snapshot = {"models": [{"name": "a"}, {"name": "b", "success_count": 3}]}
    assert logic.model_entry(snapshot, "b") == {"name": "b", "success_count": 3}
    assert logic.model_entry(snapshot, "c") is None
    assert logic.model_entry(None, "a") is None


# --------------------------------------------------------------------------- shapes and inputs


def test_parse_shape_option():
    assert logic.parse_shape_option("x:1,16") == ("x", (1, 16))
    assert logic.parse_shape_option("4,16") == (None, (4, 16))
    with pytest.raises(ValueError):
        logic.parse_shape_option("x:a,b")
    with pytest.raises(ValueError):
        logic.parse_shape_option("x:")


def test_resolve_shape_fills_the_batch_dim_and_demands_the_rest():
    assert logic.resolve_shape("x", [-1, 16]) == (1, 16)
    assert logic.resolve_shape("x", [-1, 16], batch_size=8) == (8, 16)
    assert logic.resolve_shape("x", [-1, -1], override=(2, 5)) == (2, 5)
    with pytest.raises(ValueError, match="--shape x:1,N"):
        logic.resolve_shape("x", [-1, -1])
    with pytest.raises(ValueError, match="conflicts"):
        logic.resolve_shape("x", [-1, 16], override=(1, 15))


def test_build_inputs_from_metadata():
    metadata = {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 16]}]}
    pool = build_inputs(metadata, {}, batch_size=4, pool=3)
    assert len(pool) == 3
    assert pool[0]["x"].shape == (4, 16) and pool[0]["x"].dtype == np.float32


def test_build_inputs_without_metadata_needs_a_shape():
    with pytest.raises(ValueError, match="--shape"):
        build_inputs(None, {})
    pool = build_inputs(None, {None: (2, 3)}, dtype="int32", pool=1)
    assert pool[0]["input"].shape == (2, 3) and pool[0]["input"].dtype == np.int32


def test_build_inputs_bytes_input_needs_files(tmp_path):
    metadata = {"inputs": [{"name": "image", "dtype": "bytes", "shape": [-1]}]}
    with pytest.raises(ValueError, match="--input-data"):
        build_inputs(metadata, {})
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8a")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8b")
    (tmp_path / ".hidden").write_bytes(b"x")
    assert build_inputs(metadata, {}, data_dir=tmp_path) == [{"image": b"\xff\xd8a"}, {"image": b"\xff\xd8b"}]


# --------------------------------------------------------------------------- writers

ROWS = [
    {"label": "c=1", "concurrency": 1, "throughput": 1234.56789, "p50_ms": 0.5, "p99_ms": 1.25, "count": 100, "stable": True, "errors": 0},
    {"label": "r=100", "target_rate": 100.0, "throughput": 99.0, "count": 0, "stable": False, "errors": 2, "extra": "ignored"},
]


def test_csv_writer():
    rows = list(csv.DictReader(io.StringIO(output.csv_text(ROWS))))
    assert list(rows[0]) == list(output.COLUMNS)
    assert rows[0]["throughput"] == "1234.5679"
    assert rows[0]["concurrency"] == "1" and rows[0]["target_rate"] == ""
    assert rows[1]["target_rate"] == "100.0000" and rows[1]["stable"] == "False"
    assert "extra" not in rows[1]


def test_json_writer_keeps_config_environment_and_every_key():
    document = json.loads(output.json_text(ROWS, {"window_s": 1.0}, {"cpu_count": 2}))
    assert document["config"] == {"window_s": 1.0}
    assert document["environment"] == {"cpu_count": 2}
    assert document["results"][1]["extra"] == "ignored"


def test_write_file_creates_folders(tmp_path):
    target = tmp_path / "deep" / "out.csv"
    output.write_file(target, output.csv_text(ROWS))
    assert target.read_text().startswith("label,")


def test_progress_line_and_table_flag_saturation():
    line = output.progress_line("c=8", 2, 10, {"throughput": 10.0, "count": 5, "p50_ms": 1.0, "p99_ms": 2.0, "client_cpu": 0.5})
    assert "c=8" in line and "w 2/10" in line and "p99" in line and "50%" in line
    text = output.table([{"label": "c=1", "throughput": 1.0, "client_cpu": 0.95, "client_saturated": True, "errors": 0}])
    assert "may be the bottleneck" in text


def test_summarize_lists_numbers_and_target_verdicts():
    document = {"benchmarks": [{"name": "test_x", "extra_info": {"rps": 10.5, "targets": {"ratio": {"value": 0.4, "target": ">= 0.5", "met": False}}}}]}
    text = summarize.table(document)
    assert "| test_x | rps=10.5 | ratio = 0.400 (target >= 0.5: MISSED) |" in text


def test_summarize_writes_one_csv_row_per_benchmark_without_the_raw_rounds(tmp_path, capsys):
    import csv
    import json

    document = {
        "datetime": "2026-01-01T00:00:00", "commit_info": {"id": "abcdef0123"},
        "benchmarks": [
            {"name": "test_x", "stats": {"data": [0.1] * 1000},
             "extra_info": {"rps": 10.5, "targets": {"ratio": {"value": 0.4, "target": ">= 0.5", "met": False}}}},
            {"name": "test_y", "stats": {"data": [0.2] * 1000}, "extra_info": {"p50_ms": 1.25}},
        ],
    }
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(document))
    assert summarize.main([str(raw), "--csv", str(tmp_path / "summary.csv")]) == 0
    assert "commit abcdef0" in capsys.readouterr().out
    with open(tmp_path / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["benchmark"] for r in rows] == ["test_x", "test_y"]
    assert rows[0]["rps"] == "10.5" and rows[0]["ratio"] == "0.4" and rows[0]["ratio_met"] == "False"
    assert rows[1]["p50_ms"] == "1.25" and rows[1]["rps"] == ""


# --------------------------------------------------------------------------- the engine, on a fake driver


class FakeDriver(Driver):
    """Answers after ``delay`` seconds; counts what it was asked; statistics like trtserve's."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.sent = 0

    def prepare(self, values):
        return values

    async def infer(self, slot, prepared):
        self.sent += 1
        await asyncio.sleep(self.delay)

    async def statistics(self, model):
        return {"name": model, "success_count": self.sent, "failure_count": 0, "queue_ns": self.sent * 1000, "compute_ns": self.sent * 2000}


FAST = Settings(window_s=0.1, max_windows=4, warmup_s=0.02, stability=0.5)


def test_closed_loop_level_reports_merged_windows():
    row = asyncio.run(run_level(FakeDriver(delay=0.001), "m", [{}], FAST, concurrency=4))
    assert row["label"] == "c=4" and row["concurrency"] == 4
    assert row["count"] > 0 and row["throughput"] > 0 and row["errors"] == 0
    assert 3 <= row["windows"] <= 4
    assert row["server_queue_us"] == pytest.approx(1.0) and row["server_compute_us"] == pytest.approx(2.0)
    assert 0 <= row["client_cpu"] and row["client_saturated"] in (True, False)


def test_open_loop_level_paces_to_the_rate():
    row = asyncio.run(run_level(FakeDriver(), "m", [{}], FAST, rate=200.0))
    assert row["label"] == "r=200" and row["target_rate"] == 200.0
    assert statistics.fmean([row["send_rate"], row["throughput"]]) == pytest.approx(200.0, rel=0.25)


def test_every_request_failing_stops_with_the_reason():
    class Broken(FakeDriver):
        async def infer(self, slot, prepared):
            raise KeyError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        asyncio.run(run_level(Broken(), "m", [{}], FAST, concurrency=2))


def test_pipe_driver_drives_a_real_pipe_from_the_event_loop():
    """Every answer is the pipe's own for its input: Identity echoes, statistics add up."""
    import trtserve
    from trtserve_bench.inproc import PipeDriver

    class Checking(PipeDriver):
        async def infer(self, slot, prepared):
            item = {"data": prepared}
            future = asyncio.get_running_loop().create_future()
            self.models.pipeline.submit(item, lambda _item, error: self.bell.post(future.set_result, error))
            assert await future is None and item["result"] is prepared

    values = [{"x": np.full((1, 3), i, np.float32)} for i in range(5)]
    with trtserve.pipe({"backend": "Identity", "max": 4}) as models:
        plain = asyncio.run(run_level_with(PipeDriver(models), values, concurrency=8))
        checked = asyncio.run(run_level_with(Checking(models), values, concurrency=8))
        totals = models.pipeline.stats.snapshot()
    assert plain["errors"] == 0 and plain["count"] > 0 and checked["errors"] == 0 and checked["count"] > 0
    assert plain["server_avg_batch"] >= 1 and totals["failure_count"] == 0
    assert totals["success_count"] >= plain["count"] + checked["count"]


def test_pipe_driver_raises_the_pipes_error():
    import trtserve
    from trtserve_bench.inproc import PipeDriver

    with trtserve.pipe({"backend": "Identity", "max": 2}) as models:  # 3 rows never fit a batch of 2
        with pytest.raises(RuntimeError, match="INVALID_INPUT|max"):
            asyncio.run(run_level_with(PipeDriver(models), [{"x": np.zeros((3, 2), np.float32)}], concurrency=2))


async def run_level_with(driver, values, concurrency):
    await driver.open()
    try:
        return await run_level(driver, "m", [driver.prepare(v) for v in values], FAST, concurrency=concurrency)
    finally:
        await driver.close()


def test_level_needs_exactly_one_load_kind():
    with pytest.raises(ValueError):
        asyncio.run(run_level(FakeDriver(), "m", [{}], FAST))


def test_plot_cli_draws_a_comparison_with_one_series_per_system(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra, also in the test extra) is not installed")
    from trtserve_bench import plot

    rows = [{"system": system, "label": f"c={c}", "count": 10, "throughput": t, "p50_ms": p, "p99_ms": 2 * p}
            for system, points in (("trtserve", [(1, 4000, 0.2), (8, 8000, 1.0)]), ("pytriton", [(1, 200, 4.0), (8, 1600, 5.0)]))
            for c, t, p in points]
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"levels": rows}))
    assert plot.main([str(run), str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run.write_text(json.dumps({"results": []}))
    with pytest.raises(SystemExit):  # no rows: a usage error that names both layouts
        plot.main([str(run), str(tmp_path / "empty.png")])
