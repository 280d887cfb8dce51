"""Warmup samples: run before a model (or a reloaded version) is reported READY.

config.toml (Triton's model_warmup, in TOML)::

    [[warmup]]
    count = 2                      # how many times to run this sample
    [warmup.inputs.x]
    dtype = "float32"
    shape = [1, 16]
    fill = "random"                # "zeros" (default) or "random" (seeded)
    # file = "sample.jpg"          # raw bytes (dtype = "bytes") or a .npy array, relative to the model folder
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtserve_client.wire import DTYPES

from .errors import ConfigError, ModelUnavailableError

SAMPLE_KEYS = {"count", "inputs"}
INPUT_KEYS = {"dtype", "shape", "fill", "file"}


@dataclass(frozen=True)
class WarmupSample:
    count: int
    inputs: dict[str, Any]  # name -> ndarray or bytes, ready to send


def parse_warmup(raw: Any, where: str, folder: Path) -> list[WarmupSample]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise _fail(where, "warmup", "warmup must be an array of tables: [[warmup]] with [warmup.inputs.NAME]")
    return [_sample(table, f"warmup[{i}]", where, folder) for i, table in enumerate(raw)]


def _sample(table: dict, key: str, where: str, folder: Path) -> WarmupSample:
    for name in table:
        if name not in SAMPLE_KEYS:
            raise _fail(where, f"{key}.{name}", f"unknown key {key}.{name}; a warmup sample has {sorted(SAMPLE_KEYS)}")
    count = table.get("count", 1)
    if type(count) is not int or count < 1:
        raise _fail(where, f"{key}.count", f"{key}.count must be an integer >= 1, got {count!r}")
    inputs = table.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise _fail(where, f"{key}.inputs", f"{key} needs at least one [{key.split('[')[0]}.inputs.NAME] table")
    return WarmupSample(count, {n: _value(spec, f"{key}.inputs.{n}", where, folder) for n, spec in inputs.items()})


def _value(spec: Any, key: str, where: str, folder: Path) -> Any:
    if not isinstance(spec, dict):
        raise _fail(where, key, f"{key} must be a table with dtype, shape and fill or file")
    unknown = set(spec) - INPUT_KEYS
    if unknown:
        raise _fail(where, f"{key}.{sorted(unknown)[0]}", f"unknown key(s) {sorted(unknown)} in {key}; use {sorted(INPUT_KEYS)}")
    if "file" in spec:
        path = folder / str(spec["file"])
        if not path.is_file():
            raise _fail(where, f"{key}.file", f"{key}.file = {spec['file']!r}: {path} does not exist")
        return np.load(path) if path.suffix == ".npy" else path.read_bytes()
    dtype, shape, fill = spec.get("dtype"), spec.get("shape"), spec.get("fill", "zeros")
    if dtype not in DTYPES:
        raise _fail(where, f"{key}.dtype", f"{key}.dtype = {dtype!r}; use one of {', '.join(DTYPES)} (or give a file)")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 1 for d in shape):
        raise _fail(where, f"{key}.shape", f"{key}.shape must be concrete positive integers, got {shape!r}")
    if fill == "zeros":
        return np.zeros(shape, dtype=dtype)
    if fill == "random":
        rng = np.random.default_rng(0)
        return (rng.random(shape) * 255).astype(dtype)
    raise _fail(where, f"{key}.fill", f"{key}.fill = {fill!r}; use \"zeros\" or \"random\"")


def _fail(where: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}", file=where, key=key)


def run_warmup(pipeline, samples: list[WarmupSample], model: str) -> None:
    """Run every sample through the pipeline; any failure makes the load fail."""
    for index, sample in enumerate(samples):
        data = next(iter(sample.inputs.values())) if len(sample.inputs) == 1 else dict(sample.inputs)
        for _ in range(sample.count):
            done, outcome = threading.Event(), {}

            def on_done(item, error, outcome=outcome, done=done):
                outcome.update(item=item, error=error)
                done.set()

            pipeline.submit({"data": data}, on_done)
            done.wait()
            if outcome["error"] is not None or "result" not in outcome["item"]:
                reason = outcome["error"].message if outcome["error"] is not None else "no result"
                raise ModelUnavailableError(
                    f"model {model!r}: warmup sample {index} failed: {reason}", model=model, sample=index
                )
