"""A model's nodes chained with ``next``.

The pipeline is callback-driven, so the sync ``pipe()`` and the asyncio server share it:
``submit(item, on_done)`` returns at once and ``on_done(item, error)`` runs exactly once,
on whichever thread finished the item.

Item lifecycle: any stale ``result`` is removed on entry; between nodes ``result``
becomes ``data``; at the end the caller's original ``data`` is put back, so an item
comes out as it went in, plus ``result`` (absent when the item failed) and whatever keys
backends added (``color``, say).  Outputs declared with ``source`` are renamed then.

At start the pipeline checks that it fits together (signature.py): declared tensors
against the model files, each stage's results against the next stage's inputs.  A
request a later node still refuses fails with BackendError naming both nodes: what it
sent was made by a stage, not by the client.  So does one whose admission at a later
node raises any other exception (a bug in its validate): the request is never lost.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

from .backend import TensorSpec
from .config import ModelConfig
from .errors import BackendError, ConfigError, InvalidInputError, TrtserveError
from .node import Node
from .request import Request
from .signature import check_pipeline, label
from .stats import ModelStats

ItemCallback = Callable[[dict[str, Any], "TrtserveError | None"], None]
_MISSING = object()


class Pipeline:
    def __init__(self, config: ModelConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.config = config
        self.nodes = [Node(node, dict(kwargs or {}, model=config.name)) for node in config.nodes]
        for node in self.nodes:
            node.kwargs["stats"] = node.stats  # backends count their model calls (Backend.init)
        self.stats = ModelStats()
        self._outputs: list[TensorSpec] | None = None  # what the last node gives, checked at start
        self._renames = {source: name for name, source in config.output_sources.items()}

    def start(self) -> Pipeline:
        started = []
        try:
            for node in self.nodes:
                try:
                    node.start()
                except ConfigError as exc:
                    raise self._in_config(exc, node) from None
                started.append(node)
            self._outputs = check_pipeline(self.config, self.nodes)
        except BaseException:
            for node in started:
                node.close()
            raise
        return self

    def _in_config(self, exc: ConfigError, node: Node) -> ConfigError:
        """A backend's init error, with the config file and node it belongs to."""
        source = self.config.source
        where = "" if exc.message.startswith(source) else f"{source}: "
        message = f"{where}node {node.name!r}: {exc.message}"
        return ConfigError(message, **{"file": source, "node": node.name, **exc.details})

    def close(self, drain: bool = False) -> None:
        """Stop accepting work; running work finishes; queued work fails, or runs if ``drain``.

        Draining goes node by node from the entry, so every item an upstream node finishes
        is still accepted downstream before that node closes in turn.
        """
        for node in self.nodes:
            node.close(drain=drain)

    @property
    def max_batch(self) -> int:
        return self.nodes[-1].max_size

    def io_spec(self) -> tuple[list[TensorSpec] | None, list[TensorSpec] | None]:
        """Declared tensors win; otherwise what the first backend takes and what the last
        gives as the stages feed it (a model fed single images gives single results)."""
        first = self.nodes[0].backend.io_spec()
        inputs = self.config.inputs or (first[0] if first else None)
        return inputs, self.config.outputs or self._outputs

    def submit(
        self, item: dict[str, Any], on_done: ItemCallback, deadline: float | None = None, priority: int = 0
    ) -> Request:
        """Start ``item`` through the chain.  Raises (nothing queued) on bad input or a full queue.

        ``deadline`` is a ``time.monotonic()`` value; the returned request may be cancelled.
        ``priority`` applies at the entry node (1 = highest, 0 = default).
        """
        item.pop("result", None)
        request = _Flow(item, self._stage_done, deadline, 0, priority)  # positional: the hot path
        request.caller = on_done
        request.original = original = item.get("data", _MISSING)
        try:
            self.nodes[0].submit(request)
        except TrtserveError as exc:
            if original is not _MISSING:
                item["data"] = original
            self.stats.record(0, 0, exc.name)
            raise
        return request

    def _stage_done(self, req: _Flow, error: TrtserveError | None) -> None:
        """A node finished ``req``: hand its result to the next node, or finish."""
        position = req.context + 1
        if error is not None or "result" not in req.item or position == len(self.nodes):
            self._finish(req, error)
            return
        if req.cancelled:  # the caller gave up while a stage ran: the rest never runs
            if req.cancel_error is not None:
                self._finish(req, req.cancel_error)  # counted, as a queued cancel is
            return
        req.item["data"] = req.item.pop("result")
        req.context = position
        req.priority = 0  # downstream nodes use their own default level
        try:
            self.nodes[position].submit(req)
        except InvalidInputError as exc:  # what a stage made, not what the client sent
            self._finish(req, self._misfit(position, exc))
        except TrtserveError as exc:
            self._finish(req, exc)
        except Exception as exc:  # a bug in the next stage's validate or request_size: still finished
            self._finish(req, self._crashed(position, exc))

    def _misfit(self, position: int, exc: InvalidInputError) -> BackendError:
        before, node = self.nodes[position - 1], self.nodes[position]
        return BackendError(
            f"{label(node)} refused what {label(before)} produced for this request: {exc.message}; "
            "the stages do not fit for this input (a configuration problem, not the request's): make "
            f"{before.name!r} produce what {node.name!r} takes (docs/configuration.md, \"Stages that fit\")",
            node=node.name,
            producer=before.name,
        )

    def _crashed(self, position: int, exc: Exception) -> BackendError:
        before, node = self.nodes[position - 1], self.nodes[position]
        return BackendError(
            f"{label(node)} failed to admit what {label(before)} produced for this request: "
            f"{type(exc).__name__}: {exc} (its validate or request_size raised this; a refusal "
            "is trtserve.InvalidInputError)",
            node=node.name,
            producer=before.name,
            exception=type(exc).__name__,
        )

    def _finish(self, req: _Flow, error: TrtserveError | None) -> None:
        item = req.item
        if req.original is not _MISSING:
            item["data"] = req.original
        if error is not None:
            item.pop("result", None)
        elif self._renames and type(item.get("result")) is dict:
            renames = self._renames
            item["result"] = {renames.get(key, key): value for key, value in item["result"].items()}
        outcome = error.name if error is not None else None if "result" in item else "NO_RESULT"
        self.stats.record(req.queue_ns, req.compute_ns, outcome)
        req.caller(item, error)


class _Flow(Request):
    """A request travelling a pipeline: the caller's callback and original ``data`` ride
    along, so a submit allocates no closures (``context`` is the node position)."""

    __slots__ = ("caller", "original")
    caller: ItemCallback
    original: Any
