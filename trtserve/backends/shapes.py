"""Items of different shapes in one batch: the ``pad`` policy (grouping itself: stacking.py).

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

The common batch, where every item already has one shape, stacks as one call.
This module reads and checks the ``pad`` key; stacking.group applies it.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import did_you_mean
from ..errors import ConfigError

PAD_KEYS = ("value", "limit")


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


def pad_rules(raw: Mapping[str, Any] | None, ports: list[Any], where: str) -> dict[str, PadRule]:
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
