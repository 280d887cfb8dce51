"""The backend contract, its declared config keys, and the registry of backend names.

A backend is the unit of computation (TorchPipe's idea).  The scheduler gives it a
thread-safe forward, ``instance_num`` instances and dynamic batching for free; the
backend itself only has to::

    init(context)          # once, on its instance's own thread (an InstanceContext)
    forward(items)         # items are dicts: read item["data"], write item["result"]
                           # (the outermost backend may return a Completion: completion.py)
    max() / min()          # the batch sizes it accepts (both default to the node's config)

A backend that cannot handle one item leaves its ``result`` unset (a soft failure of that
item; it may say why in ``item[NO_RESULT]``, which the server's NO_RESULT error repeats);
an exception fails every item of the batch.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar
from collections.abc import Callable, Iterator, Mapping

from .completion import Completion
from .errors import ConfigError, InvalidInputError

NO_RESULT = "no_result"  # item key: why a backend left this item without a result (a str)


@dataclass(frozen=True)
class Key:
    """A config key a backend understands: its type, default and one line of help."""

    type: type | tuple[type, ...]
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)
    example: str = ""  # a valid value as TOML writes it, for the message of a required key


def option(key: Key) -> Any:
    """A field of a backend's ``BackendOptions`` dataclass that is also a config key: declared by
    ``key`` (type, default, help, checks), defaulting to ``key.default``."""
    return field(default=key.default, metadata={"key": key})


@dataclass(frozen=True)
class BackendOptions:
    """Base of a backend's typed options: a frozen dataclass whose fields are config keys.

    A field made with ``option(Key(...))`` is a key of the backend's own, which the loader
    checks (config.py) like any ``config_keys`` entry; a plain field reads a node key the
    backend needs (``model``, ``max``).  Field names are the config file's names.  A
    backend that sets ``Options`` gets its ``config_keys`` from it and reads the values,
    typed and frozen, with ``context.options(self.Options)``.
    """

    @classmethod
    def keys(cls) -> dict[str, Key]:
        return {f.name: f.metadata["key"] for f in fields(cls) if "key" in f.metadata}

    @classmethod
    def from_config(cls: type[_O], config: Mapping[str, Any]) -> _O:
        """The options of one node's (validated) config; a key the config lacks keeps its default."""
        values = {f.name: _frozen(config[f.name]) for f in fields(cls) if f.name in config}
        return cls(**values)

    def check(self) -> None:
        """Refuse keys that contradict each other (a ConfigError naming the key and the fix).
        The loader calls it once each key passed its own checks, so the error names the file."""


_O = TypeVar("_O", bound=BackendOptions)


def _frozen(value: Any) -> Any:
    """A config value as a frozen dataclass holds it: arrays as tuples, tables read-only."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return value


@dataclass(frozen=True)
class InstanceContext:
    """What ``Backend.init`` is told about the instance it prepares.

    ``config`` is the node's configuration: every key, typed as TOML gives it, defaults
    filled in; ``options(cls)`` reads a backend's typed ``Options`` from it.  ``extra``
    holds what the program passed to ``trtserve.pipe(config, **extra)``.
    """

    config: Mapping[str, Any]
    instance_index: int = 0
    node: str = "node"  # the node's name
    model: str = "model"  # the model's name
    version: int | None = None  # from a repository: the version served
    model_dir: str | None = None  # from a repository: the version folder
    stats: Any = field(default=None, compare=False)  # the node's statistics (a pipeline's NodeStats)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Mapping[str, Any], settings: Mapping[str, Any], instance_index: int) -> InstanceContext:
        """The context of instance ``instance_index`` of a node whose pipeline was built
        with ``settings`` (``node``, ``model``, ``stats``, a repository's ``version`` and
        ``model_dir``, and whatever else the program passed)."""
        known = {f.name for f in fields(cls)} - {"config", "instance_index", "extra"}
        return cls(
            config=config,
            instance_index=instance_index,
            extra={k: v for k, v in settings.items() if k not in known},
            **{k: v for k, v in settings.items() if k in known},
        )

    def options(self, cls: type[_O]) -> _O:
        return cls.from_config(self.config)

    @property
    def record_call(self) -> Callable[[int], None]:
        """How a backend that runs a model counts each call: ``record_call(rows)`` into the
        node's statistics (``model_calls``, ``call_rows``); nowhere outside a pipeline."""
        return self.stats.record_call if self.stats is not None else _ignore_call

    @property
    def where(self) -> str:
        """``model.node``, to name this node in logs and messages."""
        return f"{self.model}.{self.node}"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as metadata reports it; -1 marks a dynamic dimension.

    ``batched``: ``shape[0]`` is the batch dimension and an item may also carry one sample
    without it (the model backends' convention); otherwise an item carries exactly
    ``shape``.  ``layout`` (``"HWC"``, ``"CHW"``) is set where a stage knows it.
    """

    name: str
    dtype: str  # numpy dtype name, or "bytes" for raw byte strings
    shape: tuple[int, ...]
    batched: bool = field(default=False, compare=False)
    layout: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def follow(inputs: list[TensorSpec], outputs: list[TensorSpec], given: list[TensorSpec] | None) -> list[TensorSpec]:
    """A model's outputs as its items will carry them: a model whose batched inputs are fed
    single samples (one rank short) hands back single samples; fed whole batches, whole
    batches; fed what is not known, either (the outputs stay ``batched``)."""
    if not given or len(given) != len(inputs) or not all(s.batched for s in inputs):
        return outputs
    if all(len(g.shape) == len(s.shape) - 1 for g, s in zip(given, inputs)):
        return [replace(o, shape=o.shape[1:], batched=False) for o in outputs]
    if all(len(g.shape) == len(s.shape) and not g.batched for g, s in zip(given, inputs)):
        return [replace(o, batched=False) for o in outputs]
    return outputs


@dataclass(frozen=True)
class Signature:
    """The inputs and outputs a backend read from its model file, for checking what a config
    declares.  ``typed`` is False where the file keeps no dtypes or shapes (TorchScript):
    then only counts, and the output names in ``outputs``, are known.  ``input_names`` is
    False where the model takes its inputs by position."""

    file: str
    inputs: tuple[TensorSpec, ...] | None  # None: the file does not say
    outputs: tuple[TensorSpec, ...] | None
    typed: bool = True
    input_names: bool = True


class Backend:
    """Base class of every backend.  Subclass it and register the subclass."""

    #: Keys this backend reads from its node's config, beyond the scheduler's own keys.
    config_keys: ClassVar[dict[str, Key]] = {}
    #: The typed form of those keys (an ``Options`` dataclass); when set, ``config_keys``
    #: is derived from it.
    Options: ClassVar[type[BackendOptions] | None] = None
    #: How many inner backends the expression may give it: 0 (a leaf), 1 (a wrapper such as
    #: ``SyncTensor[X]``), None for one or more (``S[A,B,C]``), or a tuple of the allowed
    #: counts when a backend has several forms (SyncTensor: ``(0, 1)``).
    children_arity: ClassVar[int | None | tuple[int, ...]] = 0
    #: True when ``init`` binds per-thread state that every ``forward`` relies on (the GPU
    #: backends: the instance's current CUDA stream).  Such a backend needs its own instance
    #: thread, so a node using it cannot be ``inline``.
    thread_bound: ClassVar[bool] = False
    #: Config keys this backend cannot run without (its own or the node's, e.g. ``model``):
    #: a config that leaves one out fails at load, naming the file and the key.
    required_keys: ClassVar[tuple[str, ...]] = ()
    #: True on the outermost backend of a node (set before ``init``): only its ``forward``
    #: may return a Completion, since a wrapper would drop it (completion.py).
    is_root: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        typed = cls.__dict__.get("Options")
        if typed is not None:
            cls.config_keys = typed.keys()

    def __init__(self) -> None:
        self.children: list[Backend] = []
        self.config: Mapping[str, Any] = {}

    # -- the contract ------------------------------------------------------------------
    def init(self, context: InstanceContext) -> None:
        """Prepare the instance.  Runs on the instance's own thread.  Wrappers init children."""
        self.config = context.config
        for child in self.children:
            child.init(context)

    def forward(self, items: list[dict[str, Any]]) -> Completion | None:
        if len(self.children) == 1:
            self.children[0].forward(items)
            return None
        raise NotImplementedError(f"{type(self).__name__} must implement forward(items)")

    def max(self) -> int:
        if len(getattr(self, "children", ())) == 1:
            return self.children[0].max()
        return int(getattr(self, "config", {}).get("max", 1))

    def min(self) -> int:
        if len(getattr(self, "children", ())) == 1:
            return self.children[0].min()
        return int(getattr(self, "config", {}).get("min", 1))

    # -- optional hooks ----------------------------------------------------------------
    def validate(self, item: dict[str, Any]) -> None:
        """Reject a bad item before it is queued (raise InvalidInputError).

        Called on the caller's thread on an initialised instance, so it must only read.
        Checking here rather than in forward keeps one bad request from failing a batch.
        """
        if len(self.children) >= 1:
            self.children[0].validate(item)

    def admit(self, item: dict[str, Any], sized: bool) -> int:
        """What the scheduler calls at submit: ``validate``, then (on a batching node, ``sized``)
        ``request_size``.  One entry point lets a backend that parses its input for both
        (OnnxRuntime) parse each request once; the default simply calls the two."""
        self.validate(item)
        return self.request_size(item) if sized else 1

    def request_size(self, item: dict[str, Any]) -> int:
        """How much of ``max`` this item uses; by default its first dimension (see item_size).

        Backends whose items are single images (HWC arrays) override this to return 1.
        """
        if self.children:
            return self.children[0].request_size(item)
        return item_size(item)

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
        """Inputs and outputs for metadata and validation, when the backend knows them."""
        if len(self.children) == 1:
            return self.children[0].io_spec()
        return None

    def signature(self) -> Signature | None:
        """The I/O read from the model file this backend serves (None: it serves none).
        The pipeline checks the config's ``[[input]]``/``[[output]]`` against it at load."""
        if len(self.children) == 1:
            return self.children[0].signature()
        return None

    def produces(self, given: list[TensorSpec] | None) -> list[TensorSpec] | None:
        """What this backend's results look like when its items look like ``given`` (None:
        not known), for the load-time check that a pipeline's stages fit.  By default the
        outputs of ``io_spec``; a model backend's outputs lose their batch dimension when
        its items are single samples (see signature.follow)."""
        if len(self.children) == 1:
            return self.children[0].produces(given)
        spec = self.io_spec()
        return None if spec is None else follow(spec[0], spec[1], given)

    def close(self) -> None:
        """Release resources.  Runs on the instance's own thread."""
        for child in self.children:
            child.close()


# --------------------------------------------------------------------------- registry

# Built-in backends are imported on first use, so `import trtserve` stays light and the
# CPU-only paths never import cuda or tensorrt.
_BUILTIN: dict[str, str] = {
    "Identity": "trtserve.backends.identity:Identity",
    "Sequential": "trtserve.backends.sequential:Sequential",
    "S": "trtserve.backends.sequential:Sequential",
    "DecodeMat": "trtserve.backends.opencv:DecodeMat",
    "ResizeMat": "trtserve.backends.opencv:ResizeMat",
    "CvtColorMat": "trtserve.backends.opencv:CvtColorMat",
    "cvtColorMat": "trtserve.backends.opencv:CvtColorMat",  # TorchPipe's spelling
    "Mat2Tensor": "trtserve.backends.tensor:Mat2Tensor",
    "OnnxRuntime": "trtserve.backends.onnxruntime:OnnxRuntime",
    "SyncTensor": "trtserve.backends.gpu.sync:SyncTensor",
    "TensorrtTensor": "trtserve.backends.gpu.tensorrt:TensorrtTensor",
    "DecodeTensor": "trtserve.backends.gpu.image:DecodeTensor",
    "ResizeTensor": "trtserve.backends.gpu.image:ResizeTensor",
    "CvtColorTensor": "trtserve.backends.gpu.image:CvtColorTensor",
    "cvtColorTensor": "trtserve.backends.gpu.image:CvtColorTensor",
    "FusedPreprocessTensor": "trtserve.backends.gpu.image:FusedPreprocessTensor",
    "TorchScriptTensor": "trtserve.backends.gpu.torchscript:TorchScriptTensor",
}
_registered: dict[str, type[Backend]] = {}
_lock = threading.Lock()


# The registrations of the model whose code (backend.py, config, pipeline) is being loaded on
# this thread: a model's backends are visible to that model only (modelcode.py sets it).
_scope = threading.local()


@contextmanager
def model_scope(classes: dict[str, type[Backend]] | None) -> Iterator[None]:
    """Backends registered on this thread inside the block go to ``classes`` (one model's),
    and names are looked up there first; ``None``: the process-wide registry only."""
    previous = getattr(_scope, "classes", None)
    _scope.classes = classes
    try:
        yield
    finally:
        _scope.classes = previous


def current_scope() -> dict[str, type[Backend]] | None:
    return getattr(_scope, "classes", None)


def register(name: str, cls: type[Backend]) -> type[Backend]:
    """Register ``cls`` under ``name`` so expressions can use it.  Returns ``cls``.

    Called from a model's backend.py, the name is that model's alone, and a built-in name
    is refused: one model's code must never change what another model runs."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"backend name {name!r} must be a Python identifier", name=repr(name))
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(
            f"cannot register {cls!r} as {name!r}: backends must subclass trtserve.Backend",
            name=name,
        )
    scoped = current_scope()
    if scoped is not None:
        if name in _BUILTIN:
            raise ConfigError(
                f"backend.py registers {name!r}, the name of a built-in backend; a model's backends cannot "
                f"replace built-ins: register it under a name of its own, e.g. 'My{name}'",
                name=name,
            )
        scoped[name] = cls
        return cls
    with _lock:
        _registered[name] = cls
    return cls


def registered_names() -> list[str]:
    with _lock:
        return sorted(set(_BUILTIN) | set(_registered) | set(current_scope() or ()))


def is_builtin(name: str) -> bool:
    """Shipped with trtserve (not registered by a user or a model's backend.py)."""
    with _lock:
        return name in _BUILTIN and name not in _registered


def is_registered(name: str) -> bool:
    with _lock:
        return name in _registered or name in _BUILTIN or name in (current_scope() or ())


def backend_class(name: str, scope: dict[str, type[Backend]] | None = None) -> type[Backend]:
    """The class registered as ``name`` (in ``scope``, this thread's model scope when None,
    first); an unknown name suggests the nearest one."""
    cls = find_backend(name, scope)
    if cls is None:
        raise ConfigError(
            f"unknown backend {name!r}{did_you_mean(name, registered_names())}; "
            "register it with trtserve.register(name, cls) or ship it in the model's backend.py",
            backend=name,
        )
    return cls


def find_backend(name: str, scope: dict[str, type[Backend]] | None = None) -> type[Backend] | None:
    """The class registered as ``name``, as ``backend_class`` finds it, or None when no
    backend has that name."""
    cls = (scope if scope is not None else current_scope() or {}).get(name)
    if cls is not None:
        return cls
    with _lock:
        cls = _registered.get(name)
    if cls is not None:
        return cls
    target = _BUILTIN.get(name)
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def did_you_mean(word: str, candidates: list[str]) -> str:
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def _ignore_call(rows: int) -> None:
    """Outside a pipeline nothing counts model calls."""


def init_contract_problem(cls: type[Backend]) -> str | None:
    """Why ``cls.init`` cannot be called as ``init(context)`` (None: it can).  A backend
    written for ``init(self, config, kwargs)`` is refused at load with the fix."""
    try:
        parameters = list(inspect.signature(cls.init).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return None  # not introspectable (a C extension): let the call decide
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    variadic = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    if len(required) <= 1 and (positional or variadic):
        return None
    names = ", ".join(["self"] + [str(p) for p in parameters])
    return (
        f"{cls.__name__}.init({names}) does not take the instance context: write "
        "def init(self, context) and call super().init(context); context.config is the node's config "
        "(what config was), context.instance_index, .node, .model, .version, .model_dir, .stats and .extra "
        "what kwargs held (docs/writing-a-backend.md)"
    )


def item_size(item: dict[str, Any]) -> int:
    """How much of a node's ``max`` one item uses (TorchPipe's request_size).

    A tensor (or a dict of tensors) counts its first dimension; anything else counts 1.
    """
    data = item.get("data")
    if isinstance(data, dict):
        data = next(iter(data.values()), None)
    shape = getattr(data, "shape", None)
    if shape and not isinstance(data, (bytes, bytearray, memoryview)):
        return max(int(shape[0]), 1)
    return 1


__all__ = [
    "Backend",
    "InstanceContext",
    "InvalidInputError",
    "Key",
    "BackendOptions",
    "Signature",
    "TensorSpec",
    "backend_class",
    "item_size",
    "model_scope",
    "option",
    "register",
    "registered_names",
]
