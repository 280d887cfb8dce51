"""trtserve vs PyTriton on the same model, the same load generator, the same concurrencies.

Starts both servers (127.0.0.1, ephemeral ports), then for each concurrency measures
trtserve and PyTriton back to back (the order alternates from level to level so that
neither always runs first on a warming machine), with trtserve-bench's window/stability
logic, and prints one table with the ratios.  Both servers are stopped at the end.

Run it with the PyTriton environment, which also has trtserve installed (docs/performance.md):

    LD_LIBRARY_PATH=$(python3 -c 'import sysconfig;print(sysconfig.get_config_var("LIBDIR"))') \\
    .venv-triton/bin/python bench/triton/compare.py --concurrency 1,4,8,16,32,64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # driver.py beside this file

from driver import TritonGrpcDriver, TritonHttpDriver  # noqa: E402

from trtserve_bench import output  # noqa: E402
from trtserve_bench.drivers import RawDriver  # noqa: E402
from trtserve_bench.inputs import build_inputs  # noqa: E402
from trtserve_bench.runner import Settings, run_level  # noqa: E402
from trtserve_bench.serverproc import REPO_ROOT, ServerProcess  # noqa: E402

MODEL = "tensor_mlp"


def free_port() -> int:
    """A port free right now on 127.0.0.1 (Triton needs explicit ports; a tiny race is fine here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytriton_env() -> dict[str, str]:
    """PyTriton's Python backend stub links the system libpython3.X; when this interpreter is
    another build (pyenv), point the stub at this interpreter's libpython so the stub and the
    standard library it imports match (else: RLock has no _recursion_count)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    return env


def trtserve_command(explicit: str | None) -> list[str]:
    """The server under test: --trtserve, $TRTSERVE_BIN, `trtserve` on PATH, or this Python's module."""
    found = explicit or os.environ.get("TRTSERVE_BIN") or shutil.which("trtserve")
    return [found] if found else [sys.executable, "-m", "trtserve"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,4,8,16,32,64")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="how the load generator talks to PyTriton")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--window-ms", type=float, default=1000.0)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--warmup-ms", type=float, default=500.0)
    p.add_argument("--repository", default=str(REPO_ROOT / "model_repository"))
    p.add_argument("--trtserve", help="trtserve executable (default: $TRTSERVE_BIN or `trtserve` on PATH)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--csv", metavar="PATH")
    return p.parse_args(argv)


async def measure_both(args: argparse.Namespace, trt_port: int, grpc_port: int, http_port: int) -> list[dict[str, Any]]:
    settings = Settings(window_s=args.window_ms / 1e3, max_windows=args.max_windows, warmup_s=args.warmup_ms / 1e3)
    triton_driver = (
        TritonGrpcDriver(f"127.0.0.1:{grpc_port}", MODEL, args.connections)
        if args.protocol == "grpc"
        else TritonHttpDriver(f"127.0.0.1:{http_port}", MODEL, args.connections)
    )
    drivers = {"trtserve": RawDriver("127.0.0.1", trt_port, MODEL, connections=args.connections), "pytriton": triton_driver}
    requests = {}
    for name, driver in drivers.items():
        await driver.open()
        values = build_inputs(await driver.metadata(MODEL), {}, batch_size=1, seed=0)
        requests[name] = [driver.prepare(v) for v in values]
    progress = output.Progress()
    rows = []
    try:
        for index, concurrency in enumerate(int(c) for c in args.concurrency.split(",")):
            order = list(drivers) if index % 2 == 0 else list(reversed(drivers))
            for name in order:
                show = lambda label, n, row, name=name: progress.update(f"{name:>8} " + output.progress_line(label, n, settings.max_windows, row))  # noqa: E731
                row = await run_level(drivers[name], MODEL, requests[name], settings, concurrency=concurrency, progress=show)
                row["system"] = name
                progress.done(f"{name:>8} " + output.final_line(row))
                rows.append(row)
    finally:
        for driver in drivers.values():
            await driver.close()
    return rows


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per concurrency: both systems' numbers and trtserve / PyTriton ratios."""
    by_level: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_level.setdefault(row["concurrency"], {})[row["system"]] = row
    lines = []
    for concurrency, pair in sorted(by_level.items()):
        trt, tri = pair["trtserve"], pair["pytriton"]
        lines.append(
            {
                "concurrency": concurrency,
                "trtserve_rps": trt["throughput"], "trtserve_p50_ms": trt.get("p50_ms"), "trtserve_p99_ms": trt.get("p99_ms"),
                "pytriton_rps": tri["throughput"], "pytriton_p50_ms": tri.get("p50_ms"), "pytriton_p99_ms": tri.get("p99_ms"),
                "throughput_ratio": trt["throughput"] / tri["throughput"] if tri["throughput"] else None,
                "p99_ratio": trt["p99_ms"] / tri["p99_ms"] if tri.get("p99_ms") else None,
                "trtserve_batch": trt.get("server_avg_batch"), "pytriton_batch": tri.get("server_avg_batch"),
                "client_cpu_max": max(trt.get("client_cpu", 0), tri.get("client_cpu", 0)),
            }
        )
    return lines


def render(lines: list[dict[str, Any]]) -> str:
    head = f"{'conc':>5} | {'trtserve/s':>10} {'p50':>7} {'p99':>7} {'batch':>5} | {'pytriton/s':>10} {'p50':>7} {'p99':>7} {'batch':>5} | {'thr x':>6} {'p99 x':>6} {'cpu':>4}"
    out = [head, "-" * len(head)]
    for line in lines:
        out.append(
            f"{line['concurrency']:>5} | {line['trtserve_rps']:10.1f} {line['trtserve_p50_ms']:7.3f} {line['trtserve_p99_ms']:7.3f} {line['trtserve_batch'] or 0:5.2f} | "
            f"{line['pytriton_rps']:10.1f} {line['pytriton_p50_ms']:7.3f} {line['pytriton_p99_ms']:7.3f} {line['pytriton_batch'] or 0:5.2f} | "
            f"{line['throughput_ratio']:6.2f} {line['p99_ratio']:6.2f} {line['client_cpu_max'] * 100:3.0f}%"
        )
    out.append("thr x = trtserve / PyTriton throughput (target >= 3 at c=32); p99 x = trtserve / PyTriton p99 (target < 1 everywhere)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    grpc_port, http_port = free_port(), free_port()
    pytriton = ServerProcess(
        [sys.executable, str(Path(__file__).with_name("serve_pytriton.py")), "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        startup_timeout=120,
        env=pytriton_env(),
    )
    trtserve = ServerProcess([*trtserve_command(args.trtserve), "serve", "--repository", args.repository, "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"])
    with pytriton, trtserve:
        import uvloop  # the trtserve client's usual loop; grpc.aio runs on it too

        rows = uvloop.run(measure_both(args, trtserve.port, grpc_port, http_port))
    lines = comparison(rows)
    print(render(lines))
    if args.json:
        document = {"config": vars(args), "environment": _environment(), "levels": rows, "comparison": lines}
        output.write_file(args.json, json.dumps(document, indent=2, default=str) + "\n")
    if args.csv:
        output.write_file(args.csv, output.csv_text([{**r, "label": f"{r['system']} {r['label']}"} for r in rows]))
    return 0


def _environment() -> dict[str, Any]:
    from importlib.metadata import version

    from trtserve_bench.cli import environment

    env = environment({})
    env.update({name: version(name) for name in ("nvidia-pytriton", "tritonclient", "onnxruntime")})
    return env


if __name__ == "__main__":
    sys.exit(main())
