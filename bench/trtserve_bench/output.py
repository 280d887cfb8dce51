"""Reporting: CSV and JSON files, the live progress line, the optional PNG plot."""
from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

# One row per load level.  CSV keeps this order; JSON keeps every key a row has.
COLUMNS = (
    "label",
    "concurrency",
    "target_rate",
    "throughput",
    "send_rate",
    "count",
    "errors",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "windows",
    "stable",
    "client_cpu",
    "client_saturated",
    "send_lag_p99_ms",
    "server_queue_us",
    "server_compute_us",
    "server_avg_batch",
    "server_requests",
)


SUMMARY_KEYS = ("throughput", "count", "errors", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "stable", "windows",
                "client_cpu", "client_saturated", "server_queue_us", "server_compute_us", "server_avg_batch")


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """The fields of a measured row worth keeping (pytest-benchmark extra_info), floats rounded."""
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k in SUMMARY_KEYS}


def best(rows: list[dict[str, Any]], key: str = "throughput", lowest: bool = False) -> dict[str, Any]:
    """The least disturbed of repeated measurements: highest throughput, or lowest latency."""
    return (min if lowest else max)(rows, key=lambda r: r.get(key, 0.0))


def csv_text(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as CSV with a header; missing values are empty, floats keep 4 decimals."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in COLUMNS})
    return out.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else value


def json_text(rows: Iterable[dict[str, Any]], config: dict[str, Any], environment: dict[str, Any]) -> str:
    """One JSON document: how the run was configured, where it ran, and every row."""
    return json.dumps({"config": config, "environment": environment, "results": list(rows)}, indent=2, default=str) + "\n"


def write_file(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --------------------------------------------------------------------------- progress


def progress_line(label: str, window: int, max_windows: int, stats: dict[str, Any]) -> str:
    """One status line per finished window, e.g. ``c=8  w 3/10  1234 infer/s  p50 1.2 ms ...``."""
    parts = [f"{label:>10}", f"w {window}/{max_windows}", f"{stats.get('throughput', 0.0):9.1f} infer/s"]
    if stats.get("count"):
        parts.append(f"p50 {stats['p50_ms']:7.3f} ms  p99 {stats['p99_ms']:7.3f} ms")
    if stats.get("errors"):
        parts.append(f"errors {stats['errors']}")
    parts.append(f"client cpu {stats.get('client_cpu', 0.0) * 100:3.0f}%")
    return "  ".join(parts)


def final_line(row: dict[str, Any]) -> str:
    """The line a finished level leaves on screen: its merged (reported) numbers."""
    verdict = "stable" if row.get("stable") else "NOT stable"
    line = progress_line(row.get("label", ""), row.get("windows", 0), row.get("windows", 0), row)
    return f"{line}  => {verdict}"


class Progress:
    """Writes progress lines to stderr: rewritten in place on a terminal, one per line otherwise."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, line: str) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r\x1b[2K" + line) if self.tty else line + "\n")
        self.stream.flush()

    def done(self, line: str) -> None:
        """The final line of one load level stays on screen."""
        if not self.enabled:
            return
        self.stream.write(("\r\x1b[2K" + line + "\n") if self.tty else line + "\n")
        self.stream.flush()


def table(rows: Iterable[dict[str, Any]]) -> str:
    """The human summary printed at the end of a run."""
    header = f"{'level':>10} {'infer/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} {'stable':>6} {'cpu':>5} {'queue us':>9} {'compute us':>10} {'batch':>6}"
    lines = [header]
    for row in rows:
        lines.append(
            f"{row.get('label', ''):>10} {row.get('throughput', 0.0):10.1f} {_ms(row, 'p50_ms')} {_ms(row, 'p90_ms')} "
            f"{_ms(row, 'p95_ms')} {_ms(row, 'p99_ms')} {row.get('errors', 0):6d} {'yes' if row.get('stable') else 'no':>6} "
            f"{row.get('client_cpu', 0.0) * 100:4.0f}%{'!' if row.get('client_saturated') else ' '}"
            f"{_num(row, 'server_queue_us', 9)} {_num(row, 'server_compute_us', 10)} {_num(row, 'server_avg_batch', 6)}"
        )
    if any(row.get("client_saturated") for row in rows):
        lines.append("! the client used >= 90% of a core: it may be the bottleneck; add --connections or run a second client")
    return "\n".join(lines)


def _ms(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return f"{value:8.3f}" if isinstance(value, (int, float)) else f"{'-':>8}"


def _num(row: dict[str, Any], key: str, width: int) -> str:
    value = row.get(key)
    return f" {value:{width}.1f}" if isinstance(value, (int, float)) else f" {'-':>{width}}"


# --------------------------------------------------------------------------- plot


def plot_png(rows: list[dict[str, Any]], path: str | Path, title: str = "trtserve-bench") -> None:
    """Throughput (x) against p50 and p99 latency (y), one point per load level.

    matplotlib is an optional extra: imported here, only when a plot is asked for.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install 'trtserve[bench]' (or pip install matplotlib)"
        ) from None
    points = [r for r in rows if r.get("count")]
    systems = list(dict.fromkeys(r.get("system") for r in points))  # compare.py rows name theirs
    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, system in enumerate(systems):
        mine = [r for r in points if r.get("system") == system]
        color = palette[index % len(palette)]
        for key, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            label = key.replace("_ms", "") if system is None else f"{system} {key.replace('_ms', '')}"
            ax.plot([r["throughput"] for r in mine], [r[key] for r in mine], style, label=label, color=color)
        for row in mine:
            ax.annotate(str(row.get("label", "")), (row["throughput"], row["p99_ms"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(systems) > 1:
        ax.set_yscale("log")  # the systems' latencies differ by an order of magnitude
    ax.set_xlabel("throughput (infer/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
