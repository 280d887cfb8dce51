"""The ``[ray]`` table of a model's config.toml: how the model runs on Ray Serve.

Pure validation, no Ray import: every server validates the table (a typo fails the model's
load as any other key does), while only ``trtserve serve --ray`` uses it::

    [ray]
    num_replicas = 2              # a fixed count; or autoscale with min/max_replicas:
    # min_replicas = 1
    # max_replicas = 4
    # target_ongoing_requests = 2  # requests in flight per replica the autoscaler aims at
    num_cpus = 1                  # per replica
    num_gpus = 0                  # per replica (fractions share a GPU)

Command-line overrides (``--ray-set [MODEL:]KEY=VALUE``) are merged into the table before
it is validated, so they obey the same rules and give the same errors.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from typing import Any

from ..backend import did_you_mean
from ..errors import ConfigError
from .autoscale import POLICY

TABLE = "ray"
DEFAULT_APP_PREFIX = "trtserve-"  # Serve application of model M: DEFAULT_APP_PREFIX + M
DEFAULT_DEPLOY_TIMEOUT_S = 300.0  # --ray-deploy-timeout: replicas not running by then = UNAVAILABLE
# Keys that only mean something when Serve autoscales (min_replicas/max_replicas given).
AUTOSCALING_ONLY = ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "look_back_period_s")
REPLICA_COUNT_KEYS = ("num_replicas", "min_replicas", "max_replicas")


def _at_least(low: float, integer: bool) -> Any:
    kind = "an integer" if integer else "a number"

    def check(value: Any) -> str | None:
        if integer and type(value) is not int:
            return f"must be {kind} >= {low:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            return f"must be {kind} >= {low:g}"
        return None

    return check


def _positive_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return "must be a number > 0"
    return None


# key -> (check, one line of help); docs/configuration.md documents each.
KEYS: dict[str, tuple[Any, str]] = {
    "num_replicas": (_at_least(1, True), "fixed number of replicas (not with min_replicas/max_replicas)"),
    "min_replicas": (_at_least(1, True), "autoscaling: fewest replicas"),
    "max_replicas": (_at_least(1, True), "autoscaling: most replicas"),
    "target_ongoing_requests": (_positive_number, "autoscaling: requests in flight per replica to aim at"),
    "upscale_delay_s": (_at_least(0, False), "autoscaling: seconds of high load before adding a replica"),
    "downscale_delay_s": (_at_least(0, False), "autoscaling: seconds of low load before removing one"),
    "look_back_period_s": (_positive_number, "autoscaling: seconds of load history the decision averages"),
    "num_cpus": (_at_least(0, False), "CPUs reserved per replica"),
    "num_gpus": (_at_least(0, False), "GPUs reserved per replica (a fraction shares one)"),
}

# Keys of earlier versions, when requests reached replicas through Ray Serve calls.
REMOVED = {
    "max_ongoing_requests": "replicas no longer take Ray Serve calls; a replica's server reads every request "
                            "sent to it (delete the key)",
    "max_requests_per_call": "requests travel to the replicas one by one over trtserve's protocol and batch "
                             "there (delete the key)",
}


@dataclass(frozen=True)
class RaySettings:
    """A model's validated ``[ray]`` table; None means "not set" (the default applies)."""

    num_replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    look_back_period_s: float | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def as_table(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment(...).options()`` (Ray Serve's names)."""
        actor = {"num_cpus": 1.0 if self.num_cpus is None else self.num_cpus, "num_gpus": self.num_gpus or 0}
        options: dict[str, Any] = {"ray_actor_options": actor}
        if not self.autoscaling:
            options["num_replicas"] = self.num_replicas or 1
            return options
        low = self.min_replicas if self.min_replicas is not None else 1
        # The replicas' own in-flight counts drive it (autoscale.py): requests bypass Serve's handles.
        autoscaling = {"min_replicas": low, "max_replicas": self.max_replicas or max(low, 1),
                       "policy": {"policy_function": POLICY}}
        for key in AUTOSCALING_ONLY:
            if getattr(self, key) is not None:
                autoscaling[key] = getattr(self, key)
        options["autoscaling_config"] = autoscaling
        return options


def parse_ray_table(raw: Any, where: str) -> RaySettings:
    """Validate a ``[ray]`` table; ``where`` is the file (or the flag) named in errors."""
    if raw is None:
        return RaySettings()
    if not isinstance(raw, dict):
        raise _fail(where, f"[{TABLE}] must be a table of settings (num_replicas = 2, ...), got {raw!r}", TABLE, raw)
    for key, value in raw.items():
        if key in REMOVED:
            raise _fail(where, f"{TABLE}.{key} is no longer used: {REMOVED[key]}", f"{TABLE}.{key}", value)
        if key not in KEYS:
            raise _fail(
                where,
                f"unknown key {TABLE}.{key}{did_you_mean(key, list(KEYS))}; valid keys are {', '.join(KEYS)}",
                f"{TABLE}.{key}",
                value,
            )
        problem = KEYS[key][0](value)
        if problem:
            raise _fail(where, f"{TABLE}.{key} = {value!r} {problem}", f"{TABLE}.{key}", value)
    settings = RaySettings(**raw)
    _check_combination(settings, where)
    return settings


def _check_combination(settings: RaySettings, where: str) -> None:
    if settings.autoscaling and settings.num_replicas is not None:
        raise _fail(
            where,
            f"{TABLE}.num_replicas = {settings.num_replicas} is a fixed count, but min_replicas/max_replicas "
            "ask Ray Serve to autoscale; keep one of the two",
            f"{TABLE}.num_replicas",
            settings.num_replicas,
        )
    if not settings.autoscaling:
        stray = next((k for k in AUTOSCALING_ONLY if getattr(settings, k) is not None), None)
        if stray is not None:
            raise _fail(
                where,
                f"{TABLE}.{stray} applies only when Ray Serve autoscales; add min_replicas and max_replicas "
                f"(or remove {stray})",
                f"{TABLE}.{stray}",
                getattr(settings, stray),
            )
    low, high = settings.min_replicas, settings.max_replicas
    if low is not None and high is not None and low > high:
        raise _fail(where, f"{TABLE}.min_replicas = {low} is larger than max_replicas = {high}; make min <= max",
                    f"{TABLE}.min_replicas", low)


def _fail(where: str, message: str, key: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: {message}", file=where, key=key, value=repr(value))


# --------------------------------------------------------------------------- overrides


@dataclass(frozen=True)
class Override:
    """One ``--ray-set [MODEL:]KEY=VALUE``: ``model`` None applies to every model."""

    model: str | None
    key: str
    value: Any
    text: str


def parse_override(text: str) -> Override:
    """``[MODEL:]KEY=VALUE`` with a TOML value (``num_gpus=0.5``); the key is checked
    against the table's keys here, the value when merged (with the table's rules)."""
    flag = f"--ray-set {text!r}"
    target, sep, literal = text.partition("=")
    model, colon, key = target.rpartition(":")
    key = key.strip()
    if not sep or not key or not literal.strip() or (colon and not model):
        raise ConfigError(f"{flag}: expected [MODEL:]KEY=VALUE, e.g. num_replicas=2 or resnet:num_gpus=1",
                          key="ray_set", value=text)
    if key in REMOVED:
        raise ConfigError(f"{flag}: {TABLE}.{key} is no longer used: {REMOVED[key]}",
                          key=f"{TABLE}.{key}", value=text)
    if key not in KEYS:
        raise ConfigError(f"{flag}: unknown key {key!r}{did_you_mean(key, list(KEYS))}; valid keys are {', '.join(KEYS)}",
                          key=f"{TABLE}.{key}", value=text)
    try:
        value = tomllib.loads(f"v = {literal.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"{flag}: {literal.strip()!r} is not a number; write it as in config.toml (2, 0.5)",
                          key=f"{TABLE}.{key}", value=text) from None
    return Override(model or None, key, value, text)


def apply_overrides(table: dict[str, Any] | None, model: str, overrides: list[Override]) -> dict[str, Any] | None:
    """The model's ``[ray]`` table with the overrides that concern it merged in.

    Overriding the replica count switches the mode: ``num_replicas`` drops the file's
    min/max_replicas and autoscaling keys, ``min_replicas``/``max_replicas`` drop its
    ``num_replicas``, so a fixed deployment can be made to autoscale from the command line
    and back.
    """
    mine = [o for o in overrides if o.model in (None, model)]
    if not mine:
        return table
    merged = dict(table) if isinstance(table, dict) else {}
    for override in mine:
        if override.key == "num_replicas":
            for key in ("min_replicas", "max_replicas", *AUTOSCALING_ONLY):
                merged.pop(key, None)
        elif override.key in ("min_replicas", "max_replicas"):
            merged.pop("num_replicas", None)
        merged[override.key] = override.value
    return merged
