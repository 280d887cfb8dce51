"""Load-time checks that a model fits together, so a misfit fails the load, not every request.

Two checks, one rule (``misfit``):

* **Declared against the model.**  A config's ``[[input]]`` / ``[[output]]`` tables against
  the signature the backend read from its model file (``Backend.signature``): counts,
  names, dtypes, ranks, fixed dimensions.
* **Stage against stage.**  What one stage produces (``Backend.produces``) against what the
  next accepts (``io_spec`` inputs), inside ``S[...]`` and between nodes.

Specs describe what an item carries (backend.TensorSpec): a dtype, a shape with -1 for a
dynamic dimension and optionally a layout.  A ``batched`` spec also fits one sample
without its leading batch dimension (a model backend stacks such samples itself).
"""
from __future__ import annotations

from typing import Any

from .backend import Backend, Signature, TensorSpec, did_you_mean
from .errors import ConfigError

# The fix for the usual misfit: an image stage's uint8 HWC image before a float model.
IMAGE_FIX = (
    "finish the image stages with Mat2Tensor, which scales, normalises and turns the HWC uint8 image "
    "into a CHW float32 tensor, e.g. S[DecodeMat,ResizeMat,CvtColorMat,Mat2Tensor] (docs/configuration.md)"
)


def describe(spec: TensorSpec) -> str:
    """``float32 (N, 3, 64, 64)`` or ``uint8 HWC (64, 64, 3)``; ``?`` is any size."""
    dims = ["?" if d == -1 else str(d) for d in spec.shape]
    if spec.batched and dims:
        dims[0] = "N" if spec.shape[0] == -1 else dims[0]
    layout = f" {spec.layout}" if spec.layout else ""
    shape = "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
    return f"{spec.dtype}{layout} {shape}"


def misfit(given: TensorSpec, wanted: TensorSpec, strict: bool = False) -> str | None:
    """Why an item described by ``given`` cannot be what ``wanted`` describes (None: it fits).

    A dimension only one side fixes fits, unless ``strict``: a declaration that leaves open
    (-1) what the model fixes would advertise sizes the model refuses.
    """
    if given.dtype != wanted.dtype:
        return f"dtype {given.dtype}, expected {wanted.dtype}"
    if given.layout and wanted.layout and given.layout != wanted.layout:
        return f"layout {given.layout}, expected {wanted.layout}"
    g, w = given.shape, wanted.shape
    if len(g) == len(w):
        offset = 0
    elif wanted.batched and len(g) == len(w) - 1:
        offset, w = 1, w[1:]  # one sample of a batched input
    elif given.batched and len(w) == len(g) - 1:
        offset, g = 0, g[1:]
    else:
        ranks = f"{len(w)}" + (f" (or {len(w) - 1} for one sample)" if wanted.batched else "")
        return f"{len(g)} dimensions, expected {ranks}"
    for axis, (got, want) in enumerate(zip(g, w)):
        if got != -1 and want != -1 and got != want:
            return f"dimension {axis + offset} is {got}, expected {want}"
        if strict and got == -1 and want != -1:
            return f"dimension {axis + offset} is -1 (any size), but the model fixes it at {want}"
    return None


# --------------------------------------------------------------------------- stage against stage


def accepts(backend: Backend) -> list[TensorSpec] | None:
    """What a backend takes: its own io_spec, else its first inner backend's."""
    spec = backend.io_spec()
    if spec is not None:
        return spec[0]
    return accepts(backend.children[0]) if backend.children else None


def check_link(producer: str, produced: list[TensorSpec] | None, consumer: str, accepted: list[TensorSpec] | None) -> None:
    """Raise ConfigError naming both sides when ``produced`` cannot feed ``accepted``."""
    if produced is None or accepted is None:
        return  # one side does not say: the request path checks (and names both nodes)
    for given, wanted in _pairs(producer, produced, consumer, accepted):
        problem = misfit(given, wanted)
        if problem is not None:
            raise ConfigError(
                f"{producer} produces {describe(given)}, but {consumer} takes {describe(wanted)} "
                f"(input {wanted.name!r}): {problem}; {_fix(given, wanted)}",
                producer=producer,
                consumer=consumer,
                produced=describe(given),
                accepted=describe(wanted),
            )


def _pairs(producer: str, produced: list[TensorSpec], consumer: str, accepted: list[TensorSpec]) -> list[tuple[TensorSpec, TensorSpec]]:
    if len(produced) == 1 and len(accepted) == 1:
        return [(produced[0], accepted[0])]  # one value: its name is only a label
    by_name = {s.name: s for s in produced}
    missing = [s.name for s in accepted if s.name not in by_name]
    if missing:
        raise ConfigError(
            f"{producer} produces {[s.name for s in produced]}, but {consumer} takes {[s.name for s in accepted]}: "
            f"{missing} not among them; name the outputs after the inputs, or put a stage between them",
            producer=producer,
            consumer=consumer,
            missing=missing,
        )
    return [(by_name[s.name], s) for s in accepted]


def _fix(given: TensorSpec, wanted: TensorSpec) -> str:
    if given.dtype == "uint8" and given.layout == "HWC" and wanted.dtype.startswith("float"):
        return IMAGE_FIX
    if given.dtype == wanted.dtype and given.layout in ("HWC", "CHW"):
        return "make the sizes agree (resize_h and resize_w of the image stages, or the model's input size)"
    return "put a stage between them that converts one into the other, or export the model to take what the first gives"


# --------------------------------------------------------------------------- declared against the model


class Declared:
    """Checks one config's declared tensors; every error names the file and the key."""

    def __init__(self, where: str, model: str, sources: dict[str, str]) -> None:
        self.where = where  # the config file
        self.model = model
        self.sources = sources  # declared output name -> the model's name for it

    def fail(self, key: str, message: str, **details: Any) -> ConfigError:
        return ConfigError(f"{self.where}: model {self.model!r}: {message}", file=self.where, key=key, model=self.model, **details)

    def against_signature(self, kind: str, declared: list[TensorSpec], signature: Signature) -> None:
        """Strict: count, names, dtypes, ranks, fixed dims.  A lone input or output travels
        as a bare array, so its declared name is simply the one clients use; several
        travel as a dict keyed by the model's names, so each must be the model's (an
        output may be renamed with ``source``)."""
        actual = signature.inputs if kind == "input" else signature.outputs
        if actual is None:
            return  # the file does not say (a TorchScript model returning a dict)
        self._count(kind, declared, list(actual), signature.file)
        by_name = len(actual) > 1 and (kind == "output" or signature.input_names)
        for index, spec in enumerate(declared):
            if by_name or self.sources.get(spec.name) is not None:
                model_spec = self._match(kind, index, spec, list(actual), signature.file)
            else:
                model_spec = actual[index]
            if signature.typed:
                self._compare(kind, index, spec, model_spec, signature.file, strict=True)

    def against_stage(self, kind: str, declared: list[TensorSpec], actual: list[TensorSpec] | None, stage: str) -> None:
        """Loose: what a stage without a model file takes or gives (an image stage, say)."""
        if actual is None:
            return
        self._count(kind, declared, actual, stage)
        for index, (spec, stage_spec) in enumerate(zip(declared, actual)):
            self._compare(kind, index, spec, stage_spec, stage, strict=False)

    def _count(self, kind: str, declared: list[TensorSpec], actual: list[TensorSpec], source: str) -> None:
        if len(declared) != len(actual):
            raise self.fail(
                kind,
                f"declares {len(declared)} {kind}(s) {[s.name for s in declared]} but {source} has "
                f"{len(actual)}: {[describe_named(s) for s in actual]}; declare every one of them, or remove "
                f"the [[{kind}]] tables to serve the model's own",
                declared=len(declared),
                actual=len(actual),
            )

    def _match(self, kind: str, index: int, spec: TensorSpec, actual: list[TensorSpec], source: str) -> TensorSpec:
        name = self.sources.get(spec.name, spec.name) if kind == "output" else spec.name
        for candidate in actual:
            if candidate.name == name:
                return candidate
        names = [s.name for s in actual]
        rename = f", or keep {spec.name!r} and add source = {names[index]!r} to rename it" if kind == "output" else ""
        raise self.fail(
            f"{kind}[{index}].{'source' if name != spec.name else 'name'}",
            f"{kind}[{index}] names {name!r}, which is not an {kind} of {source}{did_you_mean(name, names)}; "
            f"its {kind}s are {names}: use the model's name{rename}",
            value=name,
            expected=names,
        )

    def _compare(self, kind: str, index: int, spec: TensorSpec, actual: TensorSpec, source: str, strict: bool) -> None:
        problem = misfit(spec, actual, strict)
        if problem is None:
            return
        field = "dtype" if problem.startswith("dtype") else "shape"
        sample = f" (or {list(actual.shape[1:])} for single samples)" if actual.batched else ""
        raise self.fail(
            f"{kind}[{index}].{field}",
            f"{kind}[{index}] {spec.name!r} declares {describe(spec)}, but {source} has {describe(actual)}: "
            f"{problem}; declare dtype = {actual.dtype!r}, shape = {list(actual.shape)}{sample}, or remove the "
            f"[[{kind}]] tables to serve the model's own",
            declared=describe(spec),
            actual=describe(actual),
        )


def describe_named(spec: TensorSpec) -> str:
    return f"{spec.name} {describe(spec)}"


# --------------------------------------------------------------------------- a whole pipeline


def check_pipeline(config: Any, nodes: list[Any]) -> list[TensorSpec] | None:
    """Check a started pipeline (``config``: ModelConfig, ``nodes``: its Schedulers) and
    return what its last node gives, as far as the stages say (None: not known)."""
    try:
        return _check(config, nodes)
    except ConfigError as exc:
        if exc.message.startswith(config.source):
            raise
        raise ConfigError(f"{config.source}: {exc.message}", **{**exc.details, "file": config.source}) from None


def _check(config: Any, nodes: list[Any]) -> list[TensorSpec] | None:
    declared = Declared(config.source, config.name, config.output_sources)
    entry = nodes[0].backend
    entry_signature = leaf(entry, last=False).signature()
    if config.inputs is not None:
        if entry_signature is not None:
            declared.against_signature("input", config.inputs, entry_signature)
        else:
            declared.against_stage("input", config.inputs, accepts(entry), label(nodes[0]))
    given = config.inputs
    for previous, node in zip([None] + nodes[:-1], nodes):
        if previous is not None:
            check_link(label(previous), given, label(node), accepts(node.backend))
        given = node.backend.produces(given)  # S[...] checks its own stages here
    exit_signature = leaf(nodes[-1].backend, last=True).signature()
    if config.outputs is not None:
        if exit_signature is None:
            declared.against_stage("output", config.outputs, given, label(nodes[-1]))
        else:
            if given is not None and exit_signature.typed:  # as the items will carry them
                exit_signature = Signature(exit_signature.file, exit_signature.inputs, tuple(given))
            declared.against_signature("output", config.outputs, exit_signature)
    return given


def leaf(backend: Backend, last: bool) -> Backend:
    """The first (or last) stage of a backend tree: through wrappers and S[...]."""
    while backend.children:
        backend = backend.children[-1 if last else 0]
    return backend


def label(node: Any) -> str:
    return f"node {node.name!r} ({node.config.expr})"
