"""The backend contract, its declared config keys, and the registry of backend names.

A backend is the unit of computation (TorchPipe's idea).  The scheduler gives it a
thread-safe forward, ``instance_num`` instances and dynamic batching for free; the
backend itself only has to::

    init(config, kwargs)   # once, on its instance's own thread
    forward(items)         # items are dicts: read item["data"], write item["result"]
                           # (the outermost backend may return a Completion: completion.py)
    max() / min()          # the batch sizes it accepts (both default to the node's config)

A backend that cannot handle one item leaves its ``result`` unset (a soft failure of that
item); an exception fails every item of the batch.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

from .errors import ConfigError, InvalidInputError


@dataclass(frozen=True)
class Key:
    """A config key a backend understands: its type, default and one line of help."""

    type: type | tuple[type, ...]
    default: Any = None
    help: str = ""
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)
    example: str = ""  # a valid value as TOML writes it, for the message of a required key


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

    def __init__(self) -> None:
        self.children: list[Backend] = []
        self.config: dict[str, Any] = {}

    # -- the contract ------------------------------------------------------------------
    def init(self, config: dict[str, Any], kwargs: dict[str, Any]) -> None:
        """Prepare the instance.  Runs on the instance's own thread.  Wrappers init children."""
        self.config = config
        for child in self.children:
            child.init(config, kwargs)

    def forward(self, items: list[dict[str, Any]]) -> None:
        if len(self.children) == 1:
            self.children[0].forward(items)
            return
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


def register(name: str, cls: type[Backend]) -> type[Backend]:
    """Register ``cls`` under ``name`` so expressions can use it.  Returns ``cls``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"backend name {name!r} must be a Python identifier", name=repr(name))
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(
            f"cannot register {cls!r} as {name!r}: backends must subclass trtserve.Backend",
            name=name,
        )
    with _lock:
        _registered[name] = cls
    return cls


def registered_names() -> list[str]:
    with _lock:
        return sorted(set(_BUILTIN) | set(_registered))


def is_builtin(name: str) -> bool:
    """Shipped with trtserve (not registered by a user or a model's backend.py)."""
    with _lock:
        return name in _BUILTIN and name not in _registered


def is_registered(name: str) -> bool:
    with _lock:
        return name in _registered or name in _BUILTIN


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``; an unknown name suggests the nearest one."""
    with _lock:
        cls = _registered.get(name)
    if cls is not None:
        return cls
    target = _BUILTIN.get(name)
    if target is None:
        raise ConfigError(
            f"unknown backend {name!r}{did_you_mean(name, registered_names())}; "
            "register it with trtserve.register(name, cls) or ship it in the model's backend.py",
            backend=name,
        )
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def did_you_mean(word: str, candidates: list[str]) -> str:
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def load_backend_file(path: Path) -> None:
    """Execute a model folder's backend.py, which registers its backends as a side effect."""
    module_name = f"trtserve_model_backend_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as a Python module", file=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(
            f"{path}: importing the model's backend.py failed: {type(exc).__name__}: {exc}",
            file=str(path),
        ) from exc


def call_recorder(kwargs: dict[str, Any]) -> Callable[[int], None]:
    """How a backend that runs a model counts each call: ``record(rows)`` into the node's
    statistics (``kwargs["stats"]``, set by the pipeline), or nowhere outside a pipeline."""
    stats = kwargs.get("stats")
    return stats.record_call if stats is not None else _ignore_call


def _ignore_call(rows: int) -> None:
    """Outside a pipeline nothing counts model calls."""


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
    "InvalidInputError",
    "Key",
    "Signature",
    "TensorSpec",
    "backend_class",
    "item_size",
    "load_backend_file",
    "register",
    "registered_names",
]
