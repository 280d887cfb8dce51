"""Front door + Ray Serve replica vs `trtserve serve`, same model, same machine.

    python bench/ray_frontdoor.py [--model tensor_mlp] [--repository model_repository]
                                  [--rounds 3] [--json PATH]

Runs, one after the other (never side by side, so they do not share the cores):

1. ``trtserve serve --repository R --load-model M`` (the model in the server process);
2. the same with ``--ray local --ray-set num_replicas=1`` (a local Ray cluster, one
   replica running the model and serving it with its own trtserve server, the front door
   forwarding each request to it);

(and, with ``--compare-with CHECKOUT``, the Ray path once more with another checkout's
code, e.g. the main branch's worktree: a before/after inside one run), and measures each
with ``trtserve-bench`` at concurrency 1 (p50 latency) and 32
(throughput, and the CPU time the server or front door, the replica and the benchmark
client each spent per request), ``--rounds`` times, alternating, so that a burst of other work on the
machine does not land on one path only.  Prints one row per path and round, the medians,
and the two comparisons docs/scaling.md reports, computed from the medians: p50 overhead
(ms) at c=1 and the throughput ratio at c=32.  Not a test: numbers depend on the machine;
docs/scaling.md gives the current ones, with the machine they were measured on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "trtserve listening on "


def trtserve() -> list[str]:
    script = Path(sys.executable).with_name("trtserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "trtserve"]


def bench_command() -> list[str]:
    script = Path(sys.executable).with_name("trtserve-bench")
    return [str(script)] if script.exists() else [sys.executable, "-m", "trtserve_bench.cli"]


def start(argv: list[str], log: Path, timeout: float = 300.0, code: str | None = None) -> tuple[subprocess.Popen, int]:
    """Start a server (``code``: a checkout whose trtserve it imports); its port from the one
    line it prints once listening."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([code, str(Path(code) / "clients"), env.get("PYTHONPATH", "")])
    with open(log, "ab") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
    give_up = time.monotonic() + timeout
    line = proc.stdout.readline().decode()  # blocks until listening (or exit)
    if not line.startswith(PREFIX) or time.monotonic() > give_up:
        proc.kill()
        raise RuntimeError(f"{argv} did not start: {line!r}; see {log}")
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def measure(port: int, model: str, concurrency: int, windows: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(bench_command() + ["-m", model, "--port", str(port), "--concurrency", str(concurrency),
                                          "--max-windows", str(windows), "--json", out.name, "--quiet"], check=True)
        (row,) = json.load(open(out.name))["results"]
    return row


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replica_pids() -> list[int]:
    """The Ray Serve replica processes on this machine (Ray names them ray::ServeReplica:...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::ServeReplica"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def measure_with_cpu(proc: subprocess.Popen, port: int, model: str, windows: int) -> tuple[dict, dict]:
    """The c=32 level, and the CPU each process spent per answered request meanwhile (µs):
    where the cores go, which the throughput of a closed loop on few cores follows."""
    pids = {"server": [proc.pid], "replica": replica_pids()}
    before = {role: sum(map(cpu_seconds, group)) for role, group in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    row = measure(port, model, 32, windows)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = {role: sum(map(cpu_seconds, group)) - before[role] for role, group in pids.items()}
    spent["client"] = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    requests = row["throughput"] * wall
    return row, {role: round(seconds / requests * 1e6, 1) for role, seconds in spent.items() if role == "client" or pids[role]}


def run_path(name: str, argv: list[str], model: str, windows: int, log: Path, code: str | None = None) -> dict:
    proc, port = start(argv, log, code=code)
    try:
        c1 = measure(port, model, 1, windows)
        c32, cpu = measure_with_cpu(proc, port, model, windows)
    finally:
        stop(proc)
    row = {"path": name, "p50_ms_c1": c1["p50_ms"], "infer_per_s_c32": c32["throughput"],
           "p50_ms_c32": c32["p50_ms"], "errors": c1["errors"] + c32["errors"], "cpu_us_per_request_c32": cpu}
    print(f"{name:<28} p50 c=1 {row['p50_ms_c1']:8.3f} ms   c=32 {row['infer_per_s_c32']:9.1f} infer/s "
          f"(p50 {row['p50_ms_c32']:.2f} ms)   errors {row['errors']}   CPU µs/request at c=32 {cpu}", flush=True)
    return row


def median_row(name: str, rows: list[dict]) -> dict:
    """Each measure's median over the rounds (errors: their sum)."""
    row = {"path": name, **{key: statistics.median(r[key] for r in rows)
                            for key in ("p50_ms_c1", "infer_per_s_c32", "p50_ms_c32")}}
    row["errors"] = sum(r["errors"] for r in rows)
    row["cpu_us_per_request_c32"] = {role: statistics.median(r["cpu_us_per_request_c32"][role] for r in rows)
                                     for role in rows[0]["cpu_us_per_request_c32"]}
    print(f"{name + ', median':<28} p50 c=1 {row['p50_ms_c1']:8.3f} ms   c=32 {row['infer_per_s_c32']:9.1f} infer/s   "
          f"CPU µs/request {row['cpu_us_per_request_c32']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tensor_mlp")
    p.add_argument("--repository", default=str(ROOT / "model_repository"))
    p.add_argument("--windows", type=int, default=6, help="measurement windows (1 s) per level")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each path, alternating; medians are reported")
    p.add_argument("--ray-set", action="append", default=[], metavar="KEY=VALUE",
                   help="more [ray] settings for the Ray path, e.g. num_cpus=0.5 (repeatable)")
    p.add_argument("--compare-with", metavar="CHECKOUT",
                   help="also run the Ray path with the trtserve of this checkout (a git worktree of another commit)")
    p.add_argument("--json", help="write the rows and the environment here")
    args = p.parse_args(argv)
    log = Path(tempfile.gettempdir()) / "ray_frontdoor_bench.log"
    # Only the measured model loads: the other examples' replicas would take the cores.
    base = trtserve() + ["serve", "--repository", args.repository, "--port", "0", "--log-level", "WARNING",
                         "--model-control", "explicit", "--load-model", args.model]
    extra = [a for setting in args.ray_set for a in ("--ray-set", setting)]
    ray_path = base + ["--ray", "local", "--ray-set", "num_replicas=1", *extra]
    paths: dict[str, tuple[list[str], str | None]] = {"trtserve serve": (base, None),
                                                       "front door + 1 Ray replica": (ray_path, None)}
    if args.compare_with:
        paths[f"front door, {args.compare_with}"] = (ray_path, str(Path(args.compare_with).resolve()))
    rounds: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, (command, code) in paths.items():
            rounds[name].append(run_path(name, command, args.model, args.windows, log, code))
    direct, ray, *compared = (median_row(name, rows) for name, rows in rounds.items())
    summary = {
        "p50_overhead_ms_c1": ray["p50_ms_c1"] - direct["p50_ms_c1"],
        "throughput_ratio_c32": ray["infer_per_s_c32"] / direct["infer_per_s_c32"],
    }
    if compared:
        summary["compared_throughput_ratio_c32"] = compared[0]["infer_per_s_c32"] / direct["infer_per_s_c32"]
        summary["ray_path_speedup_c32"] = ray["infer_per_s_c32"] / compared[0]["infer_per_s_c32"]
    print(f"p50 overhead at c=1: {summary['p50_overhead_ms_c1']:+.3f} ms (target <= 1 ms); "
          f"throughput at c=32: {summary['throughput_ratio_c32']:.2f} of the direct server (target >= 0.7)")
    if compared:
        print(f"{args.compare_with}: {summary['compared_throughput_ratio_c32']:.2f} of the direct server; this "
              f"checkout's Ray path is {summary['ray_path_speedup_c32']:.2f}x its throughput")
    if args.json:
        import ray as ray_module

        environment = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                       "python": platform.python_version(), "cpu_count": os.cpu_count(), "ray": ray_module.__version__,
                       "machine": platform.machine(), "model": args.model, "ray_set": args.ray_set,
                       "rounds": args.rounds, "compare_with": args.compare_with}
        Path(args.json).write_text(json.dumps({"rows": [direct, ray, *compared], "rounds": rounds, "summary": summary,
                                               "environment": environment}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
