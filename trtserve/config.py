"""Model configuration: TOML (or a dict) in, a validated ModelConfig out.

Two forms, as in TorchPipe:

* one node: ``backend = "..."`` and the node's keys at the top level;
* several nodes: one table per node, chained with ``next``; the entry node is the one no
  other node points to.

Model-level ``[[input]]`` / ``[[output]]`` tables declare tensors for validation and
metadata; ``[ray]`` says how ``trtserve serve --ray`` deploys the model (scaleout/settings.py),
so ``ray`` cannot name a node.  Every error names the file, the key, the offending value and the fix.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtserve_client.wire import DTYPES

from .backend import Backend, Key, TensorSpec, backend_class, current_scope, did_you_mean, is_builtin
from .errors import ConfigError
from .expression import Expr, ExpressionError, parse, resolve
from .scaleout.settings import RaySettings, parse_ray_table
from .versions import VersionPolicy, parse_policy
from .warmup import WarmupSample, parse_warmup


def _positive(value: Any) -> str | None:
    return None if value >= 1 else "must be at least 1"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 and math.isfinite(value) else "must be a finite number >= 0"


NODE_KEYS: dict[str, Key] = {
    "backend": Key(str, None, "backend expression, e.g. S[DecodeMat,ResizeMat]"),
    "instance_num": Key(int, 1, "parallel instances, each on its own thread", check=_positive),
    "inline": Key(bool, False, "run forward on the submitting thread, not on instance threads: for backends "
                  "that take microseconds and never block (docs/configuration.md)"),
    "batching_timeout": Key((int, float), 0, "ms to wait for a batch to fill", check=_non_negative),
    "max": Key(int, 1, "largest batch (sum of request sizes)", check=_positive),
    "min": Key(int, 1, "smallest batch the backend accepts", check=_positive),
    "model": Key(str, None, "model file, relative to the version folder", example='"model.onnx"'),
    "next": Key(str, None, "name of the node that receives this node's results"),
    "max_queue_size": Key(int, 0, "queued requests before QUEUE_FULL; 0 = unbounded", check=_non_negative),
    "queue_timeout": Key((int, float), 0, "ms a request may wait in the queue; 0 = no limit", check=_non_negative),
    "priority_levels": Key(int, 1, "number of priority levels; 1 is the highest", check=_positive),
    "default_priority": Key(int, 0, "level for requests without a priority; 0 = the lowest", check=_non_negative),
}
MODEL_KEYS = {"input", "output", "version_policy", "warmup", "ray", "load_timeout"}  # load_timeout: loadjob.py
TENSOR_KEYS = {"input": {"name", "dtype", "shape"}, "output": {"name", "dtype", "shape", "source"}}
TENSOR_DTYPES = DTYPES + ("bytes",)
# Triton's spellings of scheduler keys, and what they are called here.
TRITON_KEYS = {
    "max_batch_size": "max (the largest batch, in rows)",
    "instance_count": "instance_num",
    "count": "instance_num",
    "max_queue_delay_microseconds": "batching_timeout (in milliseconds)",
    "default_model_filename": "model",
    "platform": "backend",
}


@dataclass(frozen=True)
class Scheduling:
    """A node's scheduling keys, typed (the config file keeps TorchPipe's names)."""

    instance_num: int = 1
    inline: bool = False
    batching_timeout_s: float = 0.0  # batching_timeout, converted from ms
    max_queue_size: int = 0  # 0 = unbounded
    queue_timeout_s: float = 0.0  # queue_timeout, converted from ms; 0 = no limit
    priority_levels: int = 1
    default_priority: int = 1  # resolved: 0 in the file means the lowest level

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Scheduling:
        levels = int(options["priority_levels"])
        return cls(
            instance_num=int(options["instance_num"]),
            inline=bool(options["inline"]),
            batching_timeout_s=float(options["batching_timeout"]) / 1000.0,
            max_queue_size=int(options["max_queue_size"]),
            queue_timeout_s=float(options["queue_timeout"]) / 1000.0,
            priority_levels=levels,
            default_priority=int(options["default_priority"]) or levels,
        )


@dataclass
class NodeConfig:
    name: str
    expr: Expr
    options: dict[str, Any]  # every key of the node, typed, defaults filled in
    backends: dict[str, type[Backend]] | None = field(default=None, repr=False)  # the model's own (modelcode.py)

    @property
    def scheduling(self) -> Scheduling:
        return Scheduling.from_options(self.options)

    @property
    def next(self) -> str | None:
        """The node this one's results go to (None: the last of the chain)."""
        return self.options.get("next")



@dataclass
class ModelConfig:
    name: str
    nodes: list[NodeConfig]  # chain order: the entry node first
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    output_sources: dict[str, str] = field(default_factory=dict)  # declared name -> the model's name
    source: str = "<dict>"
    raw: dict[str, Any] = field(default_factory=dict)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    warmup: list[WarmupSample] = field(default_factory=list)
    ray: RaySettings = field(default_factory=RaySettings)  # how `trtserve serve --ray` deploys it

    @property
    def entry(self) -> NodeConfig:
        return self.nodes[0]


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found", file=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}; fix the syntax", file=str(path)) from None


def load_config(
    source: dict[str, Any] | str | Path,
    *,
    name: str | None = None,
    model_dir: Path | None = None,
) -> ModelConfig:
    """Validate a config dict or TOML file.  ``model`` paths resolve against ``model_dir``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        raw, where = read_toml(path), str(path)
        model_dir = model_dir if model_dir is not None else path.parent
        name = name or path.parent.name
    elif isinstance(source, dict):
        raw, where = source, "<config dict>"
        model_dir = model_dir if model_dir is not None else Path.cwd()
        name = name or "model"
    else:
        raise ConfigError(
            f"config must be a dict or a path to a .toml file, got {type(source).__name__}",
            received=type(source).__name__,
        )
    folder = Path(source).parent if isinstance(source, (str, Path)) else Path(model_dir)
    return _Validator(where, Path(model_dir), folder).model(raw, name)


class _Validator:
    def __init__(self, where: str, model_dir: Path, folder: Path) -> None:
        self.where = where
        self.model_dir = model_dir  # the version folder: `model` paths resolve here
        self.folder = folder  # the model folder: warmup files resolve here

    def fail(self, message: str, **details: Any) -> ConfigError:
        return ConfigError(f"{self.where}: {message}", file=self.where, **details)

    # -- model level -------------------------------------------------------------------
    def model(self, raw: dict[str, Any], name: str) -> ModelConfig:
        if "backend" in raw:  # one node, keys at the top level
            node_raw = {k: v for k, v in raw.items() if k not in MODEL_KEYS}
            nodes = [self.node(name, node_raw, prefix="")]
        else:
            nodes = self.node_tables(raw)
        sources: dict[str, str] = {}
        return ModelConfig(
            name=name,
            nodes=self.chain(nodes),
            inputs=self.tensors(raw.get("input"), "input", {}),
            outputs=self.tensors(raw.get("output"), "output", sources),
            output_sources=sources,
            source=self.where,
            raw=raw,
            version_policy=parse_policy(raw.get("version_policy"), self.where),
            warmup=parse_warmup(raw.get("warmup"), self.where, self.folder),
            ray=parse_ray_table(raw.get("ray"), self.where),
        )

    def node_tables(self, raw: dict[str, Any]) -> list[NodeConfig]:
        tables = {key: value for key, value in raw.items() if isinstance(value, dict) and key not in MODEL_KEYS}
        nodes = []
        for key, value in raw.items():
            if key in MODEL_KEYS:
                continue
            if not isinstance(value, dict):
                raise self.loose_key(key, _toml(value), tables)
            nodes.append(self.node(key, value, prefix=f"[{key}]."))
        if not nodes:
            raise self.fail("no 'backend' key and no node tables; add backend = \"Identity\" for example", key="backend")
        return nodes

    def loose_key(self, key: str, value: Any, tables: dict[str, Any]) -> ConfigError:
        """A top-level key that is not a node table, in a config made of node tables."""
        if tables and (key in NODE_KEYS or key in TRITON_KEYS or key in _backend_keys(tables.values())):
            ours = TRITON_KEYS[key].split(" ")[0] if key in TRITON_KEYS else key  # Triton's name: ours, moved
            return self.fail(
                f"top-level key {key!r}: this config has node tables ({', '.join(f'[{t}]' for t in tables)}), "
                f"and {ours} is a key of one node: move the line {ours} = {value} below the [header] of the node it "
                "is for (a node key at the top level only works in a one-node config, one with a top-level "
                "'backend' key)",
                key=key,
                value=value,
            )
        return self.fail(
            f"unknown top-level key {key!r}{did_you_mean(key, list(NODE_KEYS) + sorted(MODEL_KEYS))}; a config is "
            "either one node (with a top-level 'backend' key) or one [table] per node",
            key=key,
        )

    def chain(self, nodes: list[NodeConfig]) -> list[NodeConfig]:
        by_name = {n.name: n for n in nodes}
        targets = set()
        for node in nodes:
            if node.next is None:
                continue
            if node.next not in by_name:
                raise self.fail(
                    f"[{node.name}].next = {node.next!r} names no node{did_you_mean(node.next, list(by_name))}; "
                    f"nodes are {sorted(by_name)}",
                    key=f"{node.name}.next",
                    value=node.next,
                )
            if node.next in targets:
                raise self.fail(f"two nodes have next = {node.next!r}; pipelines are linear chains", key="next")
            targets.add(node.next)
        entries = [n for n in nodes if n.name not in targets]
        if len(entries) != 1:
            raise self.fail(
                f"a pipeline needs exactly one entry node (one no 'next' points to), found "
                f"{sorted(n.name for n in entries) or 'none (a cycle)'}; chain the nodes with next",
                key="next",
            )
        ordered, seen = [], set()
        at: NodeConfig | None = entries[0]
        while at is not None:
            if at.name in seen:
                raise self.fail(f"node {at.name!r} appears twice in the chain (a cycle)", key="next")
            seen.add(at.name)
            ordered.append(at)
            at = by_name.get(at.next) if at.next else None
        if len(ordered) != len(nodes):
            loose = sorted(set(by_name) - seen)
            raise self.fail(f"nodes {loose} are not reachable from the entry node {entries[0].name!r}", key="next")
        return ordered

    # -- node level --------------------------------------------------------------------
    def node(self, name: str, raw: dict[str, Any], prefix: str) -> NodeConfig:
        if "backend" not in raw:
            raise self.fail(f"node {name!r} has no 'backend' key; add {prefix}backend = \"Identity\"", key=f"{prefix}backend")
        expr = self.expression(raw["backend"], prefix)
        spec = dict(NODE_KEYS)
        for backend_name in expr.names():
            spec.update(backend_class(backend_name).config_keys)
        options = {}
        for key, value in raw.items():
            if key not in spec:
                raise self.unknown_key(prefix, key, value, spec, expr)
            options[key] = self.value(prefix + key, value, spec[key])
        for key, k in spec.items():
            options.setdefault(key, k.default)
        if options["min"] > options["max"]:
            raise self.fail(
                f"{prefix}min = {options['min']} is larger than {prefix}max = {options['max']}; make min <= max",
                key=prefix + "min",
                value=options["min"],
            )
        if options["default_priority"] > options["priority_levels"]:
            raise self.fail(
                f"{prefix}default_priority = {options['default_priority']} exceeds {prefix}priority_levels = "
                f"{options['priority_levels']}; use a level between 1 and priority_levels (0 = the lowest)",
                key=prefix + "default_priority",
                value=options["default_priority"],
            )
        if options["inline"]:
            self.check_inline(expr, prefix)
        self.check_required(expr, options, spec, prefix)
        if options["model"] is not None:
            options["model"] = self.model_file(prefix, options["model"])
        self.check_backend_options(expr, options, prefix)
        return NodeConfig(name=name, expr=expr, options=options, backends=current_scope())

    def check_backend_options(self, expr: Expr, options: dict[str, Any], prefix: str) -> None:
        """Each backend's typed options, read from the node's keys, refuse keys that
        contradict each other (BackendOptions.check); the error gets the file and the node."""
        for name in dict.fromkeys(expr.names()):
            typed = backend_class(name).Options
            if typed is None:
                continue
            try:
                typed.from_config(options).check()
            except ConfigError as exc:
                key = exc.details.get("key")
                details = {**exc.details, "key": prefix + key} if key else exc.details
                raise self.fail(exc.message, **details) from None

    def unknown_key(self, prefix: str, key: str, value: Any, spec: dict[str, Key], expr: Expr) -> ConfigError:
        if key in TRITON_KEYS:
            ours = TRITON_KEYS[key].split(" ")[0]
            hint = f": Triton's {key} is called {TRITON_KEYS[key]} here; write {prefix}{ours} = {_toml(value)}"
        else:
            hint = did_you_mean(key, list(spec))
        custom = sorted({n for n in expr.names() if not is_builtin(n)})
        if custom and not hint:
            hint = (
                f"; if {' or '.join(custom)} reads it, the backend must declare it: add config_keys = "
                f"{{{key!r}: trtserve.Key(type, default, \"help\")}} to its class"
            )
        return self.fail(
            f"unknown key {prefix}{key} for backend {str(expr)!r}{hint}; valid keys are {', '.join(sorted(spec))}",
            key=prefix + key,
        )

    def check_required(self, expr: Expr, options: dict[str, Any], spec: dict[str, Key], prefix: str) -> None:
        """Keys a backend cannot run without, reported here where the file is known."""
        for name in expr.names():
            for key in (k for k in backend_class(name).required_keys if options.get(k) is None):
                known = spec.get(key, Key(str))  # (a required key the backend forgot to declare: no help)
                raise self.fail(
                    f"{name} needs the key {prefix}{key} ({known.help or 'required'}); add {key} = "
                    f"{known.example or '...'} to {'the node ' + prefix[:-1] if prefix else 'the config'}",
                    key=prefix + key,
                    backend=name,
                )

    def check_inline(self, expr: Expr, prefix: str) -> None:
        """An inline node's forward runs on whichever thread submits: a backend whose init
        binds per-thread state (a CUDA stream) would find it missing there."""
        bound = [name for name in expr.names() if backend_class(name).thread_bound]
        if bound:
            raise self.fail(
                f"{prefix}inline = true runs forward on the submitting thread, but {bound[0]} binds per-thread "
                "state at init (the instance's CUDA stream) and needs its own instance thread; remove "
                f"{prefix}inline or set it to false",
                key=prefix + "inline",
                value=True,
                backend=bound[0],
            )

    def expression(self, text: Any, prefix: str) -> Expr:
        if not isinstance(text, str):
            raise self.fail(f"{prefix}backend must be a string such as \"S[DecodeMat,ResizeMat]\", got {text!r}", key=prefix + "backend")
        try:
            expr = parse(text)
        except ExpressionError as exc:  # add the file and key the bare parser cannot know
            raise ExpressionError(f"{self.where}: {prefix}backend: {exc.message}", file=self.where, key=prefix + "backend", **exc.details) from None
        resolve(expr, f"{self.where}: {prefix}backend")
        return expr

    def value(self, key: str, value: Any, spec: Key) -> Any:
        types = spec.type if isinstance(spec.type, tuple) else (spec.type,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise self.fail(
                f"{key} must be {wanted}, got {type(value).__name__} {value!r}",
                key=key,
                value=repr(value),
            )
        if spec.choices is not None and value not in spec.choices:
            raise self.fail(f"{key} = {value!r} is not one of {list(spec.choices)}", key=key, value=repr(value))
        problem = spec.check(value) if spec.check else None
        if problem:
            raise self.fail(f"{key} = {value!r} {problem}", key=key, value=repr(value))
        return value

    def model_file(self, prefix: str, relative: str) -> str:
        path = (self.model_dir / relative).resolve()
        if not path.is_file():
            served = ""
            if self.where != "<config dict>" and self.model_dir.resolve() == self.folder.resolve():
                served = (" (this model has no numbered version folder, so the model folder itself is served "
                          "as version 1; model files usually go in a folder 1/)")
            raise self.fail(
                f"{prefix}model = {relative!r}: file {path} does not exist{served}; put the model file there "
                "or fix the key",
                key=prefix + "model",
                value=relative,
            )
        return str(path)

    # -- declared tensors --------------------------------------------------------------
    def tensors(self, raw: Any, kind: str, sources: dict[str, str]) -> list[TensorSpec] | None:
        """Declared tensors; an output's ``source`` (the model's name for it) goes to ``sources``."""
        if raw is None:
            return None
        if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
            raise self.fail(f"{kind} must be an array of tables: [[{kind}]] name = ... dtype = ... shape = [...]", key=kind)
        specs: list[TensorSpec] = []
        allowed = sorted(TENSOR_KEYS[kind])
        for i, table in enumerate(raw):
            where = f"{kind}[{i}]"
            for key in table:
                if key not in allowed:
                    raise self.fail(f"unknown key {where}.{key}{did_you_mean(key, allowed)}; valid keys are {allowed}", key=f"{where}.{key}")
            name, dtype, shape = table.get("name"), table.get("dtype"), table.get("shape", [-1])
            if not isinstance(name, str) or not name:
                raise self.fail(f"{where}.name must be a non-empty string, got {name!r}", key=f"{where}.name")
            if any(s.name == name for s in specs):
                raise self.fail(f"{where}.name = {name!r} is declared twice; every {kind} needs its own name", key=f"{where}.name")
            source = table.get("source", name)
            if not isinstance(source, str) or not source:
                raise self.fail(f"{where}.source must be the model's name for this output, got {source!r}", key=f"{where}.source")
            sources.update({name: source} if source != name else {})
            if dtype not in TENSOR_DTYPES:
                raise self.fail(
                    f"{where}.dtype = {dtype!r}{did_you_mean(str(dtype), list(TENSOR_DTYPES))}; "
                    f"use one of {', '.join(TENSOR_DTYPES)}",
                    key=f"{where}.dtype",
                    value=repr(dtype),
                )
            if not isinstance(shape, list) or not all(type(d) is int and d >= -1 for d in shape):
                raise self.fail(f"{where}.shape must be a list of integers (-1 = any), got {shape!r}", key=f"{where}.shape")
            specs.append(TensorSpec(name, dtype, tuple(shape)))
        return specs


def _toml(value: Any) -> str:
    """A value as TOML writes it, for a fix the user can paste (booleans lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _backend_keys(tables: Any) -> set[str]:
    """The config keys of the backends the node tables name (those that parse)."""
    keys: set[str] = set()
    for table in tables:
        try:
            keys.update(key for name in parse(table["backend"]).names() for key in backend_class(name).config_keys)
        except (KeyError, ConfigError):
            continue  # a broken table is reported on its own
    return keys


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "an array"}
