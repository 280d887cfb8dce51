"""Summarise a ``pytest bench/ --benchmark-json=out.json`` file as a Markdown table.

    python -m trtserve_bench.summarize out.json

One line per benchmark: its headline numbers and every recorded target with its verdict.
"""
from __future__ import annotations

import json
import sys
from typing import Any

HEADLINE = ("model", "concurrency", "rps", "p50_ms", "p99_ms", "codec_mb_s", "numpy_mb_s", "ratio_to_numpy",
            "direct_rows_per_s", "throughput_ratio_vs_direct_batch_max", "p99_ratio_to_echo", "threaded_ratio_to_echo")


def describe(info: dict[str, Any]) -> str:
    parts = [f"{key}={_fmt(info[key])}" for key in HEADLINE if key in info]
    return ", ".join(parts)


def verdicts(info: dict[str, Any]) -> str:
    return "; ".join(
        f"{name} = {t['value']:.3f} (target {t['target']}: {'met' if t['met'] else 'MISSED'})"
        for name, t in info.get("targets", {}).items()
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(document: dict[str, Any]) -> str:
    lines = ["| benchmark | numbers | targets |", "|---|---|---|"]
    for bench in document.get("benchmarks", []):
        info = bench.get("extra_info", {})
        lines.append(f"| {bench['name']} | {describe(info)} | {verdicts(info) or '-'} |")
    machine = document.get("machine_info", {})
    lines.append("")
    lines.append(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cpus, "
                 f"python {machine.get('python_version', '?')}; taken {document.get('datetime', '?')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trtserve_bench.summarize BENCHMARK.json", file=sys.stderr)
        return 2
    with open(args[0]) as fh:
        print(table(json.load(fh)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
