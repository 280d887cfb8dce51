"""Request inputs: random tensors shaped from model metadata, or files (JPEGs) as bytes."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .logic import resolve_shape

DEFAULT_INPUT_NAME = "input"  # what a model with no declared inputs accepts (PROTOCOL: any single input)


def input_specs(metadata: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The metadata's inputs as [{"name", "dtype", "shape"}], [] when the server declared none."""
    return list((metadata or {}).get("inputs") or [])


def random_tensor(shape: Sequence[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Values a model accepts without special cases: normal floats, small integers, bits."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if kind == "u":
        return rng.integers(0, min(np.iinfo(dtype).max, 255) + 1, size=shape, dtype=dtype)
    return rng.integers(0, 100, size=shape, dtype=dtype)


def read_files(folder: str | Path) -> list[bytes]:
    """Every regular file of ``folder`` (sorted, hidden files skipped), as bytes."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--input-data {folder}: not a directory")
    blobs = [p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not blobs:
        raise ValueError(f"--input-data {folder}: the folder has no files")
    return blobs


def build_inputs(
    metadata: dict[str, Any] | None,
    shapes: dict[str | None, tuple[int, ...]],
    batch_size: int = 1,
    dtype: str = "float32",
    data_dir: str | Path | None = None,
    pool: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """A pool of request inputs (name -> value) that the load cycles through.

    ``shapes`` maps input name (None for "the only input") to a ``--shape``.  With
    ``data_dir`` every file becomes one request of the (single) bytes input.  Without
    declared inputs, one input named ``input`` of ``dtype`` and the given shape is sent.
    """
    specs = input_specs(metadata)
    if data_dir is not None:
        return _file_inputs(specs, data_dir)
    if not specs:
        shape = shapes.get(None) or next(iter(shapes.values()), None)
        if shape is None:
            raise ValueError("the server declares no inputs for this model: pass --shape (e.g. --shape 1,16) and --dtype")
        name = next((n for n in shapes if n), DEFAULT_INPUT_NAME)
        specs = [{"name": name, "dtype": dtype, "shape": list(shape)}]
    rng = np.random.default_rng(seed)
    concrete = [(s["name"], s["dtype"], _shape_for(s, specs, shapes, batch_size)) for s in specs]
    for name, spec_dtype, _ in concrete:
        if spec_dtype == "bytes":
            raise ValueError(f"input {name!r} takes bytes: pass --input-data FOLDER (e.g. a folder of JPEGs)")
    return [{name: random_tensor(shape, d, rng) for name, d, shape in concrete} for _ in range(pool)]


def _shape_for(spec: dict[str, Any], specs: list[dict[str, Any]], shapes: dict, batch_size: int) -> tuple[int, ...]:
    override = shapes.get(spec["name"])
    if override is None and len(specs) == 1:
        override = shapes.get(None)
    return resolve_shape(spec["name"], spec.get("shape") or [], override, batch_size)


def _file_inputs(specs: list[dict[str, Any]], data_dir: str | Path) -> list[dict[str, Any]]:
    if len(specs) > 1:
        raise ValueError(f"--input-data feeds one bytes input, but the model has {len(specs)} inputs")
    name = specs[0]["name"] if specs else DEFAULT_INPUT_NAME
    return [{name: blob} for blob in read_files(data_dir)]
