"""One served version of a model: its config, its running pipeline, and what it reports
(metadata, statistics).  The repository (repository.py) builds, swaps and retires them."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .backend import Signature, TensorSpec
from .config import ModelConfig
from .errors import ShuttingDownError, TrtserveError
from .node import Node
from .pipeline import ItemCallback
from .stats import ModelStats


class Submitted(Protocol):
    """A request on its way (a pipeline's ``Request``)."""

    def cancel(self, error: TrtserveError | None = None) -> None:
        """The caller gave up: stop the request if it has not run (``error``: what to count)."""
        ...


class ServedPipeline(Protocol):
    """What a served version runs and the server uses: a ``Pipeline``, or, for a model served
    by Ray, scaleout's ``RemotePipeline`` (no local nodes and no ``submit``: its replicas
    run them, and the front door relays their requests: scaleout/relay.py)."""

    @property
    def nodes(self) -> Sequence[Node]: ...

    @property
    def stats(self) -> ModelStats: ...

    @property
    def max_batch(self) -> int: ...

    def submit(
        self, item: dict[str, Any], on_done: ItemCallback, deadline: float | None = None, priority: int = 0
    ) -> Submitted: ...

    def io_spec(self) -> tuple[list[TensorSpec] | None, list[TensorSpec] | None]: ...

    def close(self, drain: bool = False) -> None: ...


class Versions(Protocol):
    """Every version of a model served now (the repository's entry for the model)."""

    models: dict[int, LoadedModel]


@dataclass
class LoadedModel:
    """One served version of a model: its config and its running pipeline."""

    name: str
    version: int
    folder: Path
    config: ModelConfig
    pipeline: ServedPipeline
    entry: Versions | None = field(default=None, repr=False)

    def submit(
        self, item: dict[str, Any], on_done: ItemCallback, deadline: float | None = None, priority: int = 0
    ) -> Submitted:
        try:
            return self.pipeline.submit(item, on_done, deadline, priority)
        except ShuttingDownError:
            successor = self.entry.models.get(self.version) if self.entry else None
            if successor is None or successor is self:
                raise
            # This version was swapped out between lookup and submit: the new one answers.
            return successor.submit(item, on_done, deadline, priority)

    def is_ready(self) -> bool:
        """Whether this version can take requests now (a remote one may have lost its replicas)."""
        return True

    def metadata(self) -> dict[str, Any]:
        inputs, outputs = self.pipeline.io_spec()
        return {
            "name": self.name,
            "versions": sorted(self.entry.models) if self.entry else [self.version],
            "inputs": [t.to_dict() for t in inputs or []],
            "outputs": [t.to_dict() for t in outputs or []],
            "max_batch_size": self.pipeline.max_batch,
            "nodes": [
                {"name": n.name, "backend": str(n.config.expr), "instance_num": n.scheduling.instance_num,
                 **_model_file(n.backend.signature(), self.folder)}
                for n in self.pipeline.nodes
            ],
        }

    def statistics(self) -> dict[str, Any]:
        stats = self.pipeline.stats.snapshot()
        stats.update(name=self.name, version=self.version)
        stats["nodes"] = {n.name: n.stats.snapshot() for n in self.pipeline.nodes}
        last = stats["nodes"][self.pipeline.nodes[-1].name]
        for key in ("batch_sizes", "model_calls", "call_rows"):  # the model node's, at the top
            stats[key] = last[key]
        return stats


def _model_file(signature: Signature | None, folder: Path) -> dict[str, Any]:
    """A node's model file (relative to the model folder) and the signature read from it
    (Triton's auto-complete shows this; declared tensors were checked against it at load)."""
    if signature is None:
        return {}
    path = Path(signature.file)
    shown = str(path.relative_to(folder.resolve())) if path.is_relative_to(folder.resolve()) else path.name

    def tensors(specs: Any) -> list[dict[str, Any]] | None:
        if specs is None:
            return None
        return [t.to_dict() if signature.typed else {"name": t.name} for t in specs]

    return {"model_file": shown, "model_inputs": tensors(signature.inputs), "model_outputs": tensors(signature.outputs)}
