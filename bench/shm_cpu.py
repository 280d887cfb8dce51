"""bench/test_shm.py's comparison with CPU time per request, source trees alternating.

    python bench/shm_cpu.py --tree before=/path/to/other/checkout --tree after=. --rounds 6

Each round, for each tree: ``trtserve serve`` run from that tree serves test_shm's model and
configuration, and a client process run from that tree drives it with test_shm's load (the
raw driver, inputs in one system shared-memory region, 16 in flight on one connection).
Then the reference: ``pipe()`` (the first tree) driven from one event loop and from 16
threads, the better of the two, as test_shm takes it.  Every level runs in a process of
its own, so each side imports only its own tree.

CPU per request is the user + system time of the client process, and of the server
process (its event-loop thread also alone), over the level, divided by the requests
answered in it; for ``pipe()`` the whole process.  On a shared machine the throughput of
one run says little, the ratio within a round a little more; CPU per request moves least.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(stat_path: str) -> float:
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- one level (child process)


def level(kind: str, target: list[str]) -> dict[str, Any]:
    """``shm HOST PORT SERVER_PID``, ``pipe CONFIG`` or ``threads CONFIG``, with the tree on PYTHONPATH."""
    import test_shm as shm_bench  # the tree's own bench/test_shm.py
    from trtserve_bench.runner import Settings, run_level, run_sync

    settings = Settings(window_s=0.5, max_windows=8, warmup_s=0.3)

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner, self.count = inner, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def infer(self, slot: int, prepared: Any) -> None:
            await self.inner.infer(slot, prepared)
            self.count += 1

    def measured(make: Any, pid: int | None) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            driver = Counting(make())
            await driver.open()
            try:
                requests = await driver.prepare_all(shm_bench.VALUES)
                driver.count = 0
                server = [f"/proc/{pid}/stat", f"/proc/{pid}/task/{pid}/stat"] if pid else []
                before = [_own_cpu(), *map(_cpu_of, server)]
                row = await run_level(driver, shm_bench.MODEL, requests, settings, concurrency=shm_bench.CONCURRENCY)
                spent = [b - a for a, b in zip(before, [_own_cpu(), *map(_cpu_of, server)])]
            finally:
                await driver.close()
            per = [s / driver.count * 1e6 for s in spent]
            return {"rps": row["throughput"], "client_us": per[0], "server_us": per[1] if pid else 0.0,
                    "loop_us": per[2] if pid else 0.0, "batch": row.get("server_avg_batch")}

        return run_sync(run())

    if kind == "shm":
        from trtserve_bench.drivers import RawDriver

        host, port, pid = target[0], int(target[1]), int(target[2])
        return measured(lambda: RawDriver(host, port, shm_bench.MODEL, connections=1, shared_memory="system"), pid)
    import trtserve
    from trtserve_bench.inproc import PipeDriver, pipe_statistics, threaded_level

    models = trtserve.pipe(target[0])
    try:
        if kind == "pipe":
            return measured(lambda: PipeDriver(models), None)
        xs = [v["image"] for v in shm_bench.VALUES]
        row = threaded_level(lambda i: lambda: models({"data": xs[i % len(xs)]}), shm_bench.CONCURRENCY, settings,
                             statistics=lambda: pipe_statistics(models))
        return {"rps": row["throughput"]}
    finally:
        models.close()


# --------------------------------------------------------------------------- the rounds (parent)


def _env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(str(tree / p) for p in (".", "clients", "bench")))


def _run_level(tree: Path, *args: Any) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--level", *map(str, args)], env=_env(tree), capture_output=True,
                         text=True, timeout=180)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"level {args[0]} from {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout (twice or more)")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.tree)}

    sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "clients")]
    import onnx
    import test_shm as shm_bench
    from trtserve_bench.serverproc import ServerProcess, trtserve_argv

    root = Path(tempfile.mkdtemp(prefix="shm-cpu-")) / "repository"
    (root / shm_bench.MODEL / "1").mkdir(parents=True)
    config = root / shm_bench.MODEL / "config.toml"
    config.write_text(shm_bench.CONFIG)
    onnx.save(shm_bench.image_cnn(), str(root / shm_bench.MODEL / "1" / "model.onnx"))
    servers = {}
    try:
        for name, tree in trees.items():
            servers[name] = ServerProcess(trtserve_argv(root, ["--log-level", "WARNING"]), env=_env(tree)).start()
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        reference: list[float] = []
        first = next(iter(trees.values()))
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                server = servers[name]
                rows[name].append(_run_level(tree, "shm", server.host, server.port, server.proc.pid))
            pipe = _run_level(first, "pipe", config)
            threads = _run_level(first, "threads", config)
            reference.append(max(pipe["rps"], threads["rps"]))
            rows.setdefault("pipe", []).append(pipe)
            print(f"round {round_ + 1}: pipe() {reference[-1]:.0f} infer/s ({pipe['client_us']:.1f} us/request); "
                  + "; ".join(f"{name} {rows[name][-1]['rps'] / reference[-1]:.3f} ({rows[name][-1]['rps']:.0f} infer/s, "
                              f"client {rows[name][-1]['client_us']:.1f}, server {rows[name][-1]['server_us']:.1f} us/request)"
                              for name in trees), flush=True)
    finally:
        for server in servers.values():
            server.cleanup()

    def median(name: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[name])

    print(f"\npipe(): {median('pipe', 'client_us'):.1f} us/request (median), best {max(reference):.0f} infer/s")
    for name in trees:
        ratios = [row["rps"] / ref for row, ref in zip(rows[name], reference)]
        print(f"{name}: ratio to pipe() per round {[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f}, "
              f"best of each {max(r['rps'] for r in rows[name]) / max(reference):.3f}; us/request (median): client "
              f"{median(name, 'client_us'):.1f}, server {median(name, 'server_us'):.1f} (event loop "
              f"{median(name, 'loop_us'):.1f})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--level"]:
        if sys.path and Path(sys.path[0]).resolve() == HERE:
            del sys.path[0]  # this script's folder: the tree on PYTHONPATH must be the one imported
        print(json.dumps(level(sys.argv[2], sys.argv[3:])))
    else:
        main()
