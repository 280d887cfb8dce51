"""Summarise a ``pytest bench/ --benchmark-json=out.json`` file as a Markdown table (and CSV).

    python -m trtserve_bench.summarize out.json [--csv summary.csv]

One line per benchmark: its headline numbers and every recorded target with its verdict.
pytest-benchmark's JSON carries every timing round (megabytes for the codec benchmarks);
this summary is the part worth keeping next to the code (bench/results/).
"""
from __future__ import annotations

import argparse
import csv
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


def machine_line(document: dict[str, Any]) -> str:
    machine = document.get("machine_info", {})
    commit = (document.get("commit_info") or {}).get("id") or "?"
    return (f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cpus, "
            f"python {machine.get('python_version', '?')}; taken {document.get('datetime', '?')}; commit {commit[:7]}")


def table(document: dict[str, Any]) -> str:
    lines = ["| benchmark | numbers | targets |", "|---|---|---|"]
    for bench in document.get("benchmarks", []):
        info = bench.get("extra_info", {})
        lines.append(f"| {bench['name']} | {describe(info)} | {verdicts(info) or '-'} |")
    lines.append("")
    lines.append(machine_line(document))
    return "\n".join(lines)


def csv_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per benchmark: the headline numbers, then ``<target>`` and ``<target>_met``."""
    rows = []
    for bench in document.get("benchmarks", []):
        info = bench.get("extra_info", {})
        row: dict[str, Any] = {"benchmark": bench["name"], **{key: info[key] for key in HEADLINE if key in info}}
        for name, t in info.get("targets", {}).items():
            row[name], row[f"{name}_target"], row[f"{name}_met"] = t["value"], t["target"], t["met"]
        rows.append(row)
    return rows


def write_csv(document: dict[str, Any], path: str) -> None:
    rows = csv_rows(document)
    fields: list[str] = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trtserve_bench.summarize",
                                     description="a pytest-benchmark JSON file as a Markdown table (stdout)")
    parser.add_argument("json", metavar="BENCHMARK.json")
    parser.add_argument("--csv", metavar="PATH", help="also write one CSV row per benchmark here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with open(args.json) as fh:
        document = json.load(fh)
    print(table(document))
    if args.csv:
        write_csv(document, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
