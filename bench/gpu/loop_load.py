"""ResNet-18 load without a thread per request: one event loop in-process, or the server.

run_all.py's thread rows put one Python thread per request in flight, and with 64 of them
every GIL hand-off of the two instance threads waits behind clients (bench/gpu/timeline.py
measured 100-150 us per hand-off).  A server has one event-loop thread instead.  These
drivers measure the same model the way it is served:

* ``loop_rows``: runner.py's closed loop over ``PipeDriver`` (trtserve_bench/inproc.py),
  one event-loop thread submitting to the pipe, answers back through the server's doorbell;
* ``process_rows``: ``trtserve serve`` on a repository (or the echo server) in a child
  process, driven by several ``trtserve-bench`` processes at once, as perf_analyzer users
  run several clients;
* ``bare_rows``: the bare-socket echo (trtserve_bench/bare.py) with the same client
  processes: the floor of the transport itself.

All use trtserve-bench's windows; a row says whether it was stable.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "clients"), str(ROOT / "bench")]

from trtserve_bench.inproc import PipeDriver  # noqa: E402
from trtserve_bench.runner import Settings, measure  # noqa: E402
from trtserve_bench.serverproc import ServerProcess, echo_argv, trtserve_argv  # noqa: E402

MODEL = "resnet18"
TENSOR_WARMUP = '\n[[warmup]]\n[warmup.inputs.input]\ndtype = "float32"\nshape = [1, 3, 224, 224]\nfill = "random"\n'
TENSOR_WARMUP_DICT = {"inputs": {"input": {"dtype": "float32", "shape": [1, 3, 224, 224], "fill": "random"}}}


def settings_for(seconds: float) -> Settings:
    """About ``seconds`` of measurement per row: three windows, more only if unstable."""
    return Settings(window_s=max(0.25, seconds / 3), max_windows=6, warmup_s=0.3)


def _row(measured: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """run_all.py's row shape, plus the runner's stability verdict and batch size."""
    row = {"per_s": measured["throughput"], "p50_ms": measured["p50_ms"], "p99_ms": measured["p99_ms"],
           "stable": measured["stable"], "errors": measured["errors"], "mean_batch": measured.get("server_avg_batch")}
    row.update(extra)
    return row


def loop_rows(models: Any, samples: list[Any], concurrencies: list[int], seconds: float, **extra: Any) -> list[dict[str, Any]]:
    values = [{"input": x} for x in samples]
    return [_row(measure(lambda: PipeDriver(models), MODEL, values, settings_for(seconds), concurrency=c), concurrency=c, **extra)
            for c in concurrencies]


def write_repository(folder: Path, model_path: Path, config: dict[str, Any], extra: str = TENSOR_WARMUP) -> Path:
    """``folder/resnet18/config.toml`` + ``1/model.pt``: the model as a repository serves it,
    with ``extra`` TOML (by default a [[warmup]] sample: every batch size and instance is
    warm before the server reports READY)."""
    model_dir = folder / MODEL
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, model_dir / "1" / "model.pt")
    (model_dir / "config.toml").write_text(toml_table(config) + "\n" + extra)
    return folder


def toml_table(config: dict[str, Any]) -> str:
    """One node's settings as TOML lines; its ``model`` becomes the repository's model.pt."""
    settings = {key: value for key, value in config.items() if key != "model"}
    lines = [f"{key} = {_toml(value)}" for key, value in settings.items()]
    if "model" in config:
        lines.append('model = "model.pt"')
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _bench_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "clients"), str(ROOT / "bench"),
                                                        os.environ.get("PYTHONPATH", "")]))


TENSOR_INPUT = ("--shape", "1,3,224,224", "--dtype", "float32")


def process_rows(repository: Path | None, processes: int, concurrency: int, seconds: float,
                 input_args: tuple[str, ...] = TENSOR_INPUT, server_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """``processes`` trtserve-bench clients at once, each ``concurrency`` requests in flight on
    one connection, for three windows each (no stability retries, so they stay aligned);
    against ``trtserve serve`` on ``repository``, or the echo floor when it is None.
    ``input_args``: what each request carries (trtserve-bench's --shape/--dtype or --input-data);
    ``server_args``: flags both servers take (``--io-threads N``)."""
    argv = echo_argv() + list(server_args) if repository is None else trtserve_argv(repository, ["--log-level", "WARNING", *server_args])
    window_ms = str(max(250.0, seconds * 1000 / 3))

    def client(port: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "trtserve_bench.cli", "-m", MODEL, "--port", str(port), "--concurrency",
                str(concurrency), "--connections", "1", *input_args, "--window-ms", window_ms,
                "--max-windows", "3", "--stability", "1000", "--warmup-ms", "500", "--quiet", "--json", str(out)]

    results = _run_clients(argv, processes, client, lambda out: json.loads(out.read_text())["results"][0])
    return dict(_merged(results, processes, concurrency), mean_batch=results[0].get("server_avg_batch"),
                client_cpu=[r.get("client_cpu") for r in results])


def bare_rows(processes: int, concurrency: int, seconds: float, size: int) -> dict[str, Any]:
    """The transport's floor (trtserve_bench/bare.py): plain sockets, ``size``-byte frames,
    the same client processes and concurrency as process_rows."""
    argv = [sys.executable, "-m", "trtserve_bench.bare", "serve", "--host", "127.0.0.1", "--port", "0"]

    def client(port: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "trtserve_bench.bare", "load", "--port", str(port), "--size", str(size),
                "--concurrency", str(concurrency), "--seconds", str(seconds), "--json", str(out)]

    return dict(_merged(_run_clients(argv, processes, client, lambda out: json.loads(out.read_text())), processes,
                        concurrency), request_bytes=size)


def _run_clients(server_argv: list[str], processes: int, command, read) -> list[dict[str, Any]]:
    env = _bench_env()
    with ServerProcess(server_argv, startup_timeout=120, env=env) as server, tempfile.TemporaryDirectory() as folder:
        clients = []
        for index in range(processes):
            out = Path(folder) / f"client{index}.json"
            proc = subprocess.Popen(command(server.port, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            clients.append((proc, out))
        results = []
        for proc, out in clients:
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"client failed (exit {proc.returncode}): {err[-2000:]}")
            results.append(read(out))
    return results


def _merged(results: list[dict[str, Any]], processes: int, concurrency: int) -> dict[str, Any]:
    return {"per_s": sum(r["throughput"] for r in results), "p50_ms": max(r["p50_ms"] for r in results),
            "p99_ms": max(r["p99_ms"] for r in results), "stable": all(r["stable"] for r in results),
            "errors": sum(r["errors"] for r in results), "concurrency": processes * concurrency, "processes": processes}
