"""Req/s and p50 against concurrency for a batching model, with two source trees alternating.

    python bench/policy_sweep.py --tree before=/path/to/other/checkout --tree after=. --out sweep.json

For each round, each ``instance_num`` (``--instances``, default 1,2) and each tree: the
example ``tensor_mlp`` (its config, with ``instance_num`` replaced) is served by
``trtserve serve`` run from that tree, and ``trtserve-bench`` (this tree's) sweeps the
concurrency levels against it.  The trees alternate, so both see the same machine; the
table printed at the end has, per tree and level, the best req/s of the rounds and the
p50 of that run.  ``monotone`` says whether req/s never fell as concurrency rose (by more
than ``--tolerance`` percent, the run-to-run noise of a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from trtserve_bench.serverproc import ServerProcess  # noqa: E402

EXAMPLE = HERE.parent / "model_repository" / "tensor_mlp"


def repository(root: Path, instances: int, window_ms: str | None) -> Path:
    folder = root / f"mlp{instances}" / "tensor_mlp"
    (folder / "1").mkdir(parents=True)
    config = (EXAMPLE / "config.toml").read_text()
    assert "instance_num = 1" in config and "batching_timeout = 2" in config, "the example tensor_mlp changed"
    config = config.replace("instance_num = 1", f"instance_num = {instances}")
    if window_ms is not None:
        config = config.replace("batching_timeout = 2", f"batching_timeout = {window_ms}")
    (folder / "config.toml").write_text(config)
    (folder / "1" / "model.onnx").symlink_to(EXAMPLE / "1" / "model.onnx")
    return folder.parent


def sweep(tree: Path, repo: Path, levels: str, window_ms: float, out: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=f"{tree}:{tree / 'clients'}")
    argv = [sys.executable, "-m", "trtserve", "serve", "--repository", str(repo), "--host", "127.0.0.1",
            "--port", "0", "--log-level", "WARNING"]
    with ServerProcess(argv, env=env) as server:
        bench_env = dict(os.environ, PYTHONPATH=f"{HERE}:{HERE.parent / 'clients'}:{HERE.parent}")
        subprocess.run([sys.executable, "-m", "trtserve_bench.cli", "-m", "tensor_mlp", "--port", str(server.port),
                        "--concurrency", levels, "--window-ms", str(window_ms), "--json", str(out)],
                       env=bench_env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["results"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeat)")
    p.add_argument("--instances", default="1,2")
    p.add_argument("--batching-timeout", help="ms, instead of the example's 2")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--window-ms", type=float, default=500.0)
    p.add_argument("--tolerance", type=float, default=5.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    best: dict[str, dict[int, dict[int, dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repos = {n: repository(root, n, args.batching_timeout) for n in map(int, args.instances.split(","))}
        for rnd in range(args.rounds):
            for n, repo in repos.items():
                for name, path in trees.items():
                    rows = sweep(Path(path).resolve(), repo, args.concurrency, args.window_ms, root / f"{name}{n}{rnd}.json")
                    for row in rows:
                        slot = best.setdefault(name, {}).setdefault(n, {})
                        c = int(row["concurrency"])
                        if c not in slot or row["throughput"] > slot[c]["throughput"]:
                            slot[c] = {"throughput": row["throughput"], "p50_ms": row["p50_ms"]}
    table = {}
    for name, by_n in best.items():
        for n, levels in by_n.items():
            rates = [levels[c]["throughput"] for c in sorted(levels)]
            monotone = all(b >= a * (1 - args.tolerance / 100) for a, b in zip(rates, rates[1:]))
            table[f"{name} instance_num={n}"] = {"levels": {c: levels[c] for c in sorted(levels)}, "monotone": monotone}
            cells = " ".join(f"c{c}:{levels[c]['throughput']:.0f}/{levels[c]['p50_ms']:.2f}" for c in sorted(levels))
            print(f"{name:8} n={n} monotone={monotone}  {cells}")
    args.out.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
