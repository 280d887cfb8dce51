"""Warmup samples: run before a model (or a reloaded version) is reported READY.

config.toml (Triton's model_warmup, in TOML)::

    [[warmup]]
    count = 2                      # how many times to run this sample at each batch size
    # batch_sizes = [1, 8]         # default: every size from each instance's min to its max
    [warmup.inputs.x]
    dtype = "float32"
    shape = [1, 16]
    fill = "random"                # "zeros" (default) or "random" (seeded)
    # file = "sample.jpg"          # raw bytes (dtype = "bytes") or a .npy array, relative to the model folder

Each sample runs on **every instance of every node, at every batch size** it can form:
``k`` copies of the sample make a batch of ``k`` times the sample's size.  That is where
the one-time work of each batch size and instance happens (a CUDA graph capture, cuDNN's
algorithm choice, TorchScript's specialisation, a decoder's first call), which otherwise
stalls the first requests of each size for tens of milliseconds to seconds.  Node by node:
what the first node makes of a sample is the sample of the next one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trtserve_client.wire import DTYPES

from .completion import Completion
from .errors import ConfigError, ModelUnavailableError, TrtserveError
from .stats import uncounted

SAMPLE_KEYS = {"count", "inputs", "batch_sizes"}
INPUT_KEYS = {"dtype", "shape", "fill", "file"}


@dataclass(frozen=True)
class WarmupSample:
    count: int
    inputs: dict[str, Any]  # name -> ndarray or bytes, ready to send
    batch_sizes: tuple[int, ...] | None = None  # None: every size an instance can form

    @property
    def data(self) -> Any:
        """The item's ``data``: the lone input's value, or the dict of them."""
        return next(iter(self.inputs.values())) if len(self.inputs) == 1 else dict(self.inputs)


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
    sizes = table.get("batch_sizes")
    if sizes is not None and (not isinstance(sizes, list) or not sizes or not all(type(n) is int and n >= 1 for n in sizes)):
        raise _fail(where, f"{key}.batch_sizes", f"{key}.batch_sizes must be a list of integers >= 1, e.g. [1, 8], "
                    f"got {sizes!r}; leave it out to warm every batch size")
    values = {n: _value(spec, f"{key}.inputs.{n}", where, folder) for n, spec in inputs.items()}
    return WarmupSample(count, values, None if sizes is None else tuple(sorted(set(sizes))))


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


def run_warmup(pipeline: Any, samples: list[WarmupSample], model: str) -> None:
    """Every sample through every node, on each instance at each batch size; any failure,
    or a sample that a node finishes without a result, makes the load fail."""
    data = [sample.data for sample in samples]
    for node in pipeline.nodes:
        where = _Where(model, node.name)
        per_instance = node.on_each_instance(  # runs before the loop moves on: binds as it stands
            lambda inst, where=where, data=data: [_warm(inst, d, s, where.sample(i))
                                                  for i, (d, s) in enumerate(zip(data, samples))])
        data = per_instance[0]  # every instance made the same of each sample


@dataclass(frozen=True)
class _Where:
    model: str
    node: str
    index: int = 0

    def sample(self, index: int) -> _Where:
        return _Where(self.model, self.node, index)

    def fail(self, what: str) -> ModelUnavailableError:
        return ModelUnavailableError(f"model {self.model!r}: warmup sample {self.index} failed in node {self.node!r}: "
                                     f"{what}", model=self.model, node=self.node, sample=self.index)


def _warm(instance: Any, data: Any, sample: WarmupSample, where: _Where) -> Any:
    """On the instance's own thread: the sample at each batch size, ``count`` times; its
    result (the next node's sample)."""
    backend = instance.backend
    try:
        size = backend.admit({"data": data}, True)
    except TrtserveError as exc:
        raise where.fail(f"the node refuses it: {exc.message}") from None
    copies = [k for k in range(1, instance.hi // size + 1)
              if instance.lo <= k * size and (sample.batch_sizes is None or k * size in sample.batch_sizes)]
    if not copies:
        raise where.fail(f"a sample of size {size} forms no batch of sizes {instance.lo}..{instance.hi} "
                         f"(batch_sizes {list(sample.batch_sizes or ())}); send a smaller sample or other batch_sizes")
    result: Any = None
    for k in copies:
        for _ in range(sample.count):
            result = _run(backend, [{"data": data} for _ in range(k)], where)
    return result


def _run(backend: Any, items: list[dict[str, Any]], where: _Where) -> Any:
    try:
        with uncounted():  # warm-up is no traffic: its model calls stay out of the statistics
            completion = backend.forward(items)
            if isinstance(completion, Completion):
                completion.wait()
    except Exception as exc:
        reason = exc.message if isinstance(exc, TrtserveError) else f"{type(exc).__name__}: {exc}"
        raise where.fail(f"a batch of {len(items)}: {reason}") from exc
    if "result" not in items[0]:
        raise where.fail(f"a batch of {len(items)} ended without a result; the sample must be an input the model handles")
    return items[0]["result"]
