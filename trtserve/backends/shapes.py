"""Items of different shapes in one batch: grouping, and the optional padding policy.

A model with dynamic dimensions beyond the batch (an OCR recognizer's width, a detector's
height and width) can receive, in one scheduler batch, items that do not stack.

* **Grouping (the default).**  Items run in groups of equal shapes, one model call per
  group, in the order each shape first appears.  Results are exact; a batch of three
  widths is three calls.
* **Padding (``pad``, per input).**  Every dynamic dimension of that input is padded at its
  end (bottom, right) with ``value`` up to the largest size among the batch's items, so the
  batch runs as one call.  Only sizes up to ``limit`` are padded; an item larger than
  ``limit`` keeps its shape and runs in a group of its own.  Results keep the padded size:
  a recognizer whose output length follows its input width returns the padded length.

The common batch, where every item already has one shape, stacks exactly as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..backend import did_you_mean
from ..errors import ConfigError

PAD_KEYS = ("value", "limit")


class Stackable(Protocol):
    """What grouping needs of a prepared item: its inputs with their batch dimension."""

    arrays: dict[str, Any]
    rows: int


@dataclass(frozen=True)
class PadRule:
    axes: tuple[int, ...]  # axes of the batched input (batch = 0) that are padded
    value: float
    limit: int | None  # the largest size padding reaches; None = no limit


def check_pad(value: dict) -> str | None:
    """The ``pad`` key's form, checked at load before the model is opened."""
    example = "e.g. pad = { x = { value = 0.0, limit = 1280 } }"
    for name, rule in value.items():
        if not isinstance(rule, dict) or set(rule) - set(PAD_KEYS):
            return f"must map input names to tables with {list(PAD_KEYS)}, {example}; {name} = {rule!r}"
        fill = rule.get("value", 0)
        if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not np.isfinite(fill):
            return f"must give a finite number as {name}.value, {example}; got {fill!r}"
        limit = rule.get("limit")
        if limit is not None and (type(limit) is not int or limit < 1):
            return f"must give a positive integer as {name}.limit (the largest padded size), {example}; got {limit!r}"
    return None


def pad_rules(raw: dict | None, ports: list[Any], where: str) -> dict[str, PadRule]:
    """``pad`` against the model's inputs (``ports``: name, dtype, shape): names must exist,
    the input must have a dynamic dimension beyond the batch, and the value must fit its dtype."""
    rules: dict[str, PadRule] = {}
    by_name = {port.name: port for port in ports}
    for name, rule in (raw or {}).items():
        port = by_name.get(name)
        if port is None:
            raise ConfigError(
                f"pad names {name!r}, which is not an input of {where}{did_you_mean(name, list(by_name))}; "
                f"its inputs are {list(by_name)}",
                key="pad", value=name,
            )
        axes = tuple(axis for axis, dim in enumerate(port.shape) if axis > 0 and not isinstance(dim, int))
        if not axes:
            raise ConfigError(
                f"pad.{name}: input {name!r} of {where} has shape {port.pattern()} with no dynamic dimension "
                "beyond the batch, so its items always stack; remove pad." + name,
                key=f"pad.{name}",
            )
        value = rule.get("value", 0)
        if port.dtype.kind in "iub" and float(value) != int(value):
            raise ConfigError(
                f"pad.{name}.value = {value!r} does not fit input {name!r}'s dtype {port.dtype.name}; use a whole number",
                key=f"pad.{name}.value", value=repr(value),
            )
        rules[name] = PadRule(axes, value, rule.get("limit"))
    return rules


Padding = dict[str, tuple[tuple[int, ...], float]]  # input -> (shape without the batch dim, value)


def group(prepared: list[Stackable], rules: dict[str, PadRule] | None = None) -> list[tuple[list[int], Padding | None]]:
    """Item indices that run as one call, in order of first appearance, each with what to
    pad each input to (``Padding``), or None when nothing is padded."""
    groups: dict[tuple, list[int]] = {}
    for index, prep in enumerate(prepared):
        groups.setdefault(_key(prep, rules), []).append(index)
    if not rules:
        return [(indices, None) for indices in groups.values()]
    return [(indices, _target([prepared[i] for i in indices], rules)) for indices in groups.values()]


def _key(prep: Stackable, rules: dict[str, PadRule] | None) -> tuple:
    key = []
    for name, array in prep.arrays.items():
        shape = array.shape[1:]
        rule = rules.get(name) if rules else None
        if rule is not None:  # padded dims that fit the limit do not split the batch
            shape = tuple(
                None if axis + 1 in rule.axes and (rule.limit is None or dim <= rule.limit) else dim
                for axis, dim in enumerate(shape)
            )
        key.append(shape)
    return tuple(key)


def _target(members: list[Stackable], rules: dict[str, PadRule]) -> Padding | None:
    target = {}
    for name, rule in rules.items():
        shapes = [m.arrays[name].shape[1:] for m in members]
        largest = tuple(max(dims) for dims in zip(*shapes))
        if any(shape != largest for shape in shapes):
            target[name] = (largest, rule.value)
    return target or None


def stack(arrays: list[np.ndarray], pad: tuple[tuple[int, ...], float] | None = None) -> np.ndarray:
    """The batch of one input: ``arrays`` concatenated on axis 0, each padded at the end of
    its dimensions to ``pad``'s shape with its value (None: they already agree)."""
    if pad is None:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    shape, value = pad
    rows = sum(a.shape[0] for a in arrays)
    batch = np.full((rows,) + tuple(shape), value, dtype=arrays[0].dtype)  # one allocation
    start = 0
    for array in arrays:
        stop = start + array.shape[0]
        batch[(slice(start, stop),) + tuple(slice(0, d) for d in array.shape[1:])] = array
        start = stop
    return batch
