"""Sequential / S: run stages in order inside one instance.

Between stages ``result`` becomes ``data``.  An item a stage leaves without ``result``
leaves the chain (it ends with no result) while the others go on.  The range is the
intersection of the stages' non-trivial ``[min, max]`` (a stage reporting [1, 1] accepts
whatever it is given, one item at a time or a list).

At load the pipeline asks ``produces``: each stage's results are checked against what the
next stage accepts (signature.check_link), so stages that cannot fit fail the load naming
both.  At run time a later stage that refuses its input (InvalidInputError) fails the batch
with BackendError naming both stages: the input was made by a stage, not by the client.

As in TorchPipe, stages are initialised last to first: in
``S[DecodeTensor,ResizeTensor,SyncTensor]`` the trailing SyncTensor creates the instance's
CUDA stream and makes it current before the stages that enqueue on it initialise.
"""
from __future__ import annotations

from typing import Any

from ..backend import Backend, InstanceContext, TensorSpec
from ..errors import BackendError, ConfigError, InvalidInputError
from ..signature import accepts, check_link


class Sequential(Backend):
    children_arity = None

    def init(self, context: InstanceContext) -> None:
        self.config = context.config
        self.node = context.node
        for child in reversed(self.children):
            child.init(context)
        ranges = [(c.min(), c.max()) for c in self.children if (c.min(), c.max()) != (1, 1)]
        self._lo = max((lo for lo, _ in ranges), default=1)
        self._hi = min((hi for _, hi in ranges), default=1)
        if self._lo > self._hi:
            raise ConfigError(
                f"Sequential stages have disjoint batch ranges {ranges}; make their [min, max] overlap",
                ranges=[list(r) for r in ranges],
            )

    def max(self) -> int:
        return self._hi

    def min(self) -> int:
        return self._lo

    def stage(self, index: int) -> str:
        return f"stage {index + 1} ({type(self.children[index]).__name__}) of node {self.node!r}"

    def produces(self, given: list[TensorSpec] | None) -> list[TensorSpec] | None:
        for index, stage in enumerate(self.children):
            if index:
                check_link(self.stage(index - 1), given, self.stage(index), accepts(stage))
            given = stage.produces(given)
        return given

    def forward(self, items: list[dict[str, Any]]) -> None:
        live = items
        last = len(self.children) - 1
        for index, stage in enumerate(self.children):
            try:
                stage.forward(live)
            except InvalidInputError as exc:
                if index == 0:
                    raise  # the node's own input: the caller's (or the previous node's) to fix
                raise BackendError(
                    f"{self.stage(index)} refused what {self.stage(index - 1)} produced: {exc.message}; the stages "
                    "do not fit for this input (a configuration problem, not the request's)",
                    node=self.node,
                    stage=index + 1,
                ) from None
            if index == last:
                return
            survivors = []
            for item in live:
                if "result" in item:
                    item["data"] = item.pop("result")
                    survivors.append(item)
            live = survivors
            if not live:
                return

    def signature(self):
        """The model file of the last stage that serves one (S[...,OnnxRuntime], say)."""
        return next((s for s in (c.signature() for c in reversed(self.children)) if s is not None), None)

    def request_size(self, item):
        return self.children[0].request_size(item)

    def io_spec(self):
        first, last = self.children[0].io_spec(), self.children[-1].io_spec()
        if first is None or last is None:
            return None
        return first[0], last[1]
