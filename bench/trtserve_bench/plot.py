"""Plot a saved run: ``python -m trtserve_bench.plot RUN.json OUT.png [--title T]``.

Reads what ``trtserve-bench --json`` writes (rows under ``results``) or what
``bench/triton/compare.py --json`` writes (rows under ``levels``, one series per system),
so a comparison can be plotted where matplotlib is installed, not where it ran.
"""
from __future__ import annotations

import argparse
import json
import sys

from .output import plot_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="JSON written by trtserve-bench --json or bench/triton/compare.py --json")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--title", default="throughput vs latency")
    args = parser.parse_args(argv)
    with open(args.run) as fh:
        document = json.load(fh)
    rows = document.get("results") or document.get("levels")
    if not rows:
        parser.error(f"{args.run} has neither 'results' (trtserve-bench) nor 'levels' (compare.py) rows")
    plot_png(rows, args.out, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
