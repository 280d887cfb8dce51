"""The load generator's arithmetic, as small pure functions (unit-tested in CI).

Nothing here does I/O or reads a clock: callers pass numbers in, so every rule
(percentiles, stability, pacing, saturation, server-side deltas) is testable exactly.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

PERCENTILES = (50, 90, 95, 99)
STABILITY_WINDOWS = 3
STABILITY_TOLERANCE = 0.10
CPU_SATURATION_THRESHOLD = 0.9


# --------------------------------------------------------------------------- latency maths


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile of already sorted values, interpolated linearly between ranks.

    Same definition as numpy.percentile's default ("linear"), so numbers from this tool
    compare directly with numbers computed by numpy elsewhere.
    """
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    rank = (len(sorted_values) - 1) * q / 100.0
    lower = math.floor(rank)
    upper = min(lower + 1, len(sorted_values) - 1)
    fraction = rank - lower
    low_value, high_value = sorted_values[lower], sorted_values[upper]
    return low_value + (high_value - low_value) * fraction


def latency_summary(latencies_ns: Iterable[int], percentiles: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """Count, mean, min, max and the requested percentiles, in milliseconds."""
    values = sorted(latencies_ns)
    if not values:
        return {"count": 0}
    to_ms = 1e-6
    summary = {
        "count": len(values),
        "mean_ms": sum(values) / len(values) * to_ms,
        "min_ms": values[0] * to_ms,
        "max_ms": values[-1] * to_ms,
    }
    for q in percentiles:
        summary[f"p{q:g}_ms"] = percentile(values, q) * to_ms
    return summary


# --------------------------------------------------------------------------- stability


def is_stable(
    throughputs: Sequence[float],
    windows: int = STABILITY_WINDOWS,
    tolerance: float = STABILITY_TOLERANCE,
) -> bool:
    """True when each of the last ``windows`` throughputs lies within ``tolerance`` of their mean.

    This is perf_analyzer's rule ("within 10% of each other"): comparing against the mean
    rather than pairwise keeps one slightly high window from hiding a drifting trend.
    A window with no completed request never counts as stable.
    """
    if len(throughputs) < windows:
        return False
    last = throughputs[-windows:]
    mean = sum(last) / windows
    if mean <= 0:
        return False
    return all(abs(value - mean) <= tolerance * mean for value in last)


def should_stop(throughputs: Sequence[float], max_windows: int, **stability: Any) -> bool:
    """Stop measuring once stable, or after ``max_windows`` windows whatever happened."""
    return len(throughputs) >= max_windows or is_stable(throughputs, **stability)


# --------------------------------------------------------------------------- rate pacing


def arrival_offsets(rate: float, arrival: str = "constant", seed: int = 0) -> Iterator[float]:
    """Send times in seconds from the start, forever: evenly spaced or a Poisson process.

    Offsets are cumulative, not re-based on the clock, so a sender that falls behind sends
    the overdue requests at once and the long-run rate still equals ``rate``.
    """
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"request rate must be a positive finite number, got {rate}")
    if arrival == "constant":
        index = 0
        while True:
            yield index / rate
            index += 1
    elif arrival == "poisson":
        rng = random.Random(seed)
        offset = 0.0
        while True:
            yield offset
            offset += rng.expovariate(rate)
    else:
        raise ValueError(f"arrival must be 'constant' or 'poisson', got {arrival!r}")


def schedule(rate: float, count: int, arrival: str = "constant", seed: int = 0) -> list[float]:
    """The first ``count`` send offsets of :func:`arrival_offsets`."""
    offsets = arrival_offsets(rate, arrival, seed)
    return [next(offsets) for _ in range(count)]


# --------------------------------------------------------------------------- client health


def cpu_fraction(cpu_seconds: float, wall_seconds: float) -> float:
    """Process CPU time per wall second (1.0 = one core busy the whole time)."""
    if wall_seconds <= 0:
        return 0.0
    return cpu_seconds / wall_seconds


def cpu_saturated(cpu_seconds: float, wall_seconds: float, threshold: float = CPU_SATURATION_THRESHOLD) -> bool:
    """True when the client used at least ``threshold`` of a core: its numbers are suspect.

    The load generator runs its event loop on one thread, so near one core it is probably
    the bottleneck and the server could do more than measured.
    """
    return cpu_fraction(cpu_seconds, wall_seconds) >= threshold


# --------------------------------------------------------------------------- server side


def model_entry(snapshot: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    """The statistics op's entry for ``model`` (``{"models": [...]}``), or None."""
    if not snapshot:
        return None
    for entry in snapshot.get("models", ()):
        if entry.get("name") == model:
            return entry
    return None


def server_breakdown(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, float]:
    """Per-request server time over a window: deltas of two statistics entries of one model.

    Returns {} when either snapshot is missing (a server without statistics, the echo floor)
    or nothing completed between them.
    """
    if not before or not after:
        return {}
    done = _delta(before, after, "success_count") + _delta(before, after, "failure_count")
    if done <= 0:
        return {}
    batches = _batch_delta(before.get("batch_sizes") or {}, after.get("batch_sizes") or {})
    breakdown = {
        "server_requests": float(done),
        "server_queue_us": _delta(before, after, "queue_ns") / done / 1e3,
        "server_compute_us": _delta(before, after, "compute_ns") / done / 1e3,
    }
    batch_count = sum(batches.values())
    if batch_count:
        breakdown["server_avg_batch"] = sum(size * n for size, n in batches.items()) / batch_count
    return breakdown


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> float:
    return float(after.get(key, 0) or 0) - float(before.get(key, 0) or 0)


def _batch_delta(before: dict[Any, int], after: dict[Any, int]) -> dict[int, int]:
    """Batches executed between two cumulative histograms (msgpack keys may be str or int)."""
    old = {int(size): count for size, count in before.items()}
    delta = {int(size): count - old.get(int(size), 0) for size, count in after.items()}
    return {size: count for size, count in delta.items() if count > 0}


# --------------------------------------------------------------------------- inputs


def parse_shape_option(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``--shape name:1,16`` or ``--shape 1,16`` (for the only input) -> (name, dims)."""
    name, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        raise ValueError(f"--shape {text!r}: dimensions must be integers, e.g. input:1,16") from None
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"--shape {text!r}: give one or more non-negative dimensions, e.g. input:1,16")
    return (name or None), shape


def resolve_shape(
    name: str,
    declared: Sequence[int],
    override: Sequence[int] | None = None,
    batch_size: int = 1,
) -> tuple[int, ...]:
    """A concrete request shape from a declared shape with -1 dynamic dimensions.

    An explicit ``--shape`` wins.  Otherwise a dynamic leading (batch) dimension becomes
    ``batch_size``; any other dynamic dimension cannot be guessed and is an error that
    says which option to pass.
    """
    if override is not None:
        if declared and len(override) != len(declared):
            raise ValueError(f"input {name!r}: --shape has {len(override)} dims but the model declares {list(declared)}")
        for given, want in zip(override, declared):
            if want >= 0 and given != want:
                raise ValueError(f"input {name!r}: --shape {list(override)} conflicts with declared {list(declared)}")
        return tuple(override)
    shape = list(declared)
    if shape and shape[0] < 0:
        shape[0] = batch_size
    if any(d < 0 for d in shape):
        raise ValueError(
            f"input {name!r} has dynamic dimensions {list(declared)}; pass --shape {name}:"
            + ",".join(str(batch_size if i == 0 and d < 0 else (d if d >= 0 else 'N')) for i, d in enumerate(declared))
        )
    return tuple(shape)
