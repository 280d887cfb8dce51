"""``trtserve-bench``: measure a trtserve model the way perf_analyzer measures a Triton one.

    trtserve-bench -m tensor_mlp --port 8765 --concurrency 1,2,4,8,16,32,64 --csv out.csv
    trtserve-bench -m tensor_mlp --port 8765 --rate 500,1000 --arrival poisson
    trtserve-bench -m classifier --spawn-server model_repository --input-data images/ --json out.json --plot out.png
    trtserve-bench -m resnet18 --port 8765 --shape 1,3,224,224 --shared-memory system   # inputs by reference
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

from . import output
from trtserve_client.errors import TrtserveError, UnknownOperationError

from .drivers import ClientDriver, Driver, RawDriver
from .inputs import build_inputs
from .logic import parse_shape_option
from .runner import Settings, run_sync, settings_dict, sweep
from .shared import KINDS as SHARED_MEMORY_KINDS
from .serverproc import ServerProcess, trtserve_argv

DEFAULT_CONCURRENCY = "1,2,4,8,16,32,64"


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas, e.g. 1,2,4")
    return values


def float_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive request rates separated by commas, e.g. 100,500")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trtserve-bench", description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", required=True, help="model name")
    p.add_argument("--model-version", type=int, default=None, help="model version (default: the server's latest)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="server port (or use --spawn-server)")
    p.add_argument("--spawn-server", metavar="REPOSITORY", help="start `trtserve serve` on this repository for the run, then stop it")
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", type=int_list, help=f"closed-loop levels, requests in flight (default {DEFAULT_CONCURRENCY})")
    load.add_argument("--rate", type=float_list, help="open-loop levels, requests per second")
    load.add_argument("--arrival", choices=("constant", "poisson"), default="constant", help="send schedule for --rate")
    load.add_argument("--seed", type=int, default=0, help="seed of the poisson schedule and random inputs")
    load.add_argument("--max-inflight", type=int, default=4096, help="--rate: most requests in flight before sends stall")
    load.add_argument("--connections", type=int, default=4, help="pipelined connections the load is spread over")
    load.add_argument("--client", choices=("raw", "library"), default="raw", help="raw: the bench's own pipelined connection; library: trtserve_client.AsyncClient")
    window = p.add_argument_group("measurement")
    window.add_argument("--window-ms", type=float, default=1000.0, help="measurement window length")
    window.add_argument("--max-windows", type=int, default=10, help="windows per level before giving up on stability")
    window.add_argument("--stability", type=float, default=10.0, help="percent: the last 3 windows' throughputs within this of their mean")
    window.add_argument("--warmup-ms", type=float, default=500.0, help="load before the first window, not measured")
    data = p.add_argument_group("inputs")
    data.add_argument("--shape", action="append", default=[], help="[NAME:]D1,D2,... for dynamic dims (repeatable)")
    data.add_argument("--batch-size", type=int, default=1, help="rows per request where the batch dim is dynamic")
    data.add_argument("--dtype", default="float32", help="dtype when the model declares no inputs")
    data.add_argument("--input-data", metavar="DIR", help="send each file of DIR (JPEGs, say) as the bytes input")
    data.add_argument("--shared-memory", choices=SHARED_MEMORY_KINDS, default=None,
                      help="put the input tensors in a shared-memory region (system: POSIX; cuda: device memory, CUDA IPC) "
                           "and send references to them; the server must run on this host")
    out = p.add_argument_group("output")
    out.add_argument("--csv", metavar="PATH")
    out.add_argument("--json", metavar="PATH")
    out.add_argument("--plot", metavar="PATH.png", help="throughput vs latency (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def make_driver(args: argparse.Namespace, port: int) -> Driver:
    kind = RawDriver if args.client == "raw" else ClientDriver
    return kind(args.host, port, args.model, args.model_version, connections=args.connections, shared_memory=args.shared_memory)


def environment(server: dict[str, Any]) -> dict[str, Any]:
    """Where the numbers were taken: every report carries it."""
    import msgpack
    import numpy

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": numpy.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "uvloop": _version_of("uvloop"),
        "server": server,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


async def run(args: argparse.Namespace, port: int) -> int:
    driver = make_driver(args, port)
    await driver.open()
    try:
        metadata = await _metadata(driver, args.model)
        shapes = dict(parse_shape_option(s) for s in args.shape)
        values = build_inputs(metadata, shapes, args.batch_size, args.dtype, args.input_data, seed=args.seed)
        requests = await driver.prepare_all(values)
        settings = Settings(
            window_s=args.window_ms / 1000.0,
            max_windows=args.max_windows,
            stability=args.stability / 100.0,
            warmup_s=args.warmup_ms / 1000.0,
            max_inflight=args.max_inflight,
            arrival=args.arrival,
            seed=args.seed,
        )
        progress = output.Progress(enabled=not args.quiet)
        show = lambda label, n, row: progress.update(output.progress_line(label, n, settings.max_windows, row))  # noqa: E731
        done = lambda row: progress.done(output.final_line(row))  # noqa: E731
        concurrencies = args.concurrency or (None if args.rate else int_list(DEFAULT_CONCURRENCY))
        rows = await sweep(driver, args.model, requests, settings, concurrencies, args.rate, show, done)
        env = environment(await driver.server_info())
    finally:
        await driver.close()
    write_outputs(args, rows, settings_dict(settings), env)
    return 0


async def _metadata(driver: Driver, model: str) -> dict[str, Any] | None:
    try:
        return await driver.metadata(model)
    except UnknownOperationError:  # the echo floor has no metadata: --shape/--dtype decide
        return None


def write_outputs(args: argparse.Namespace, rows: list[dict[str, Any]], settings: dict[str, Any], env: dict[str, Any]) -> None:
    print(output.table(rows))
    config = {"model": args.model, "client": args.client, "connections": args.connections,
              "shared_memory": args.shared_memory, **settings}
    if args.csv:
        output.write_file(args.csv, output.csv_text(rows))
    if args.json:
        output.write_file(args.json, output.json_text(rows, config, env))
    if args.plot:
        output.plot_png(rows, args.plot, title=f"{args.model} ({args.client} client)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if (args.port is None) == (args.spawn_server is None):
        parser().error("give exactly one of --port or --spawn-server")
    if args.plot:  # fail before a long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser().error("--plot needs matplotlib, which is not installed: pip install 'trtserve[bench]'")
    try:
        if args.spawn_server:
            with ServerProcess(trtserve_argv(args.spawn_server)) as server:
                return _run_loop(run(args, server.port))
        return _run_loop(run(args, args.port))
    except (ValueError, RuntimeError, OSError, TrtserveError) as exc:
        print(f"trtserve-bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run_loop(coro: Any) -> int:
    return run_sync(coro)


if __name__ == "__main__":
    sys.exit(main())
