"""CUDA graphs for TorchScriptTensor (``cuda_graph = true``): one graph per input signature.

Why: a TorchScript model launched from Python costs host time per kernel.  ResNet-18 at
batch 8 is ~60 launches, about 1 ms of host time on an H100 host against ~0.75 ms of
GPU time, and two instances launching at once slow each other down.  A replayed graph is
one launch for the whole model.

Per instance, on the instance's stream:

* the first batch of a new signature (its input shapes and dtypes) runs the model eagerly
  ``WARMUP_RUNS`` times (TorchScript's profiling executor specialises and fuses, cuDNN
  picks its algorithms, lazy handles get created), then captures one call into a graph.
  Static input and output tensors live in the instance's private memory pool;
* later batches of that signature copy their inputs into the static inputs (device to
  device, on the stream) and replay the graph.

The outputs are the graph's static tensors: they hold until the next replay on this stream,
so the caller copies them out within the same forward (TorchScriptTensor._split does, to
pinned host memory or to DeviceArrays of its own).

Capturing while other instances run:

* ``capture_error_mode = "thread_local"``: only the capturing thread is barred from calls
  that are illegal during capture; other instances keep allocating and waiting;
* ``capture_begin``/``capture_end`` rather than ``torch.cuda.graph()``, whose ``__enter__``
  synchronises the whole device and empties the caching allocators, under the other
  instances' running work;
* one capture at a time in the process (``_CAPTURE_LOCK``): captures are rare (once per
  signature and instance) and torch's capture bookkeeping is process-wide.

A model that cannot be captured (a host sync such as ``.item()``, work on the CPU, shapes
that depend on the data) fails its capture; that signature then runs eagerly and one
warning names the error.  An instance tries at most ``MAX_GRAPHS`` signatures (captured or
failed); further ones run eagerly (a warning says so once).

Known limit: while one instance captures, torch's caching allocator treats a capture as
underway, and an allocation elsewhere that runs out of memory cannot fall back to freeing
cached blocks (as ``torch.cuda.graph()`` avoids by emptying the cache first, which would
stall the other instances).  Captures are short and happen once per signature.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Any, Final

log = logging.getLogger("trtserve.backends")

WARMUP_RUNS = 3  # eager calls before a capture; graph_rate in bench/gpu/run_all.py uses 3 too
MAX_GRAPHS = 32  # per instance: batch sizes 1..max of one sample shape fit for any max <= 32
_CAPTURE_LOCK = threading.Lock()


class _Unseen(enum.Enum):
    """graphs.get's default: a signature not seen yet (None there means: it runs eagerly)."""

    UNSEEN = enum.auto()


_UNSEEN: Final = _Unseen.UNSEEN


def signature(inputs: list[Any]) -> tuple[Any, ...]:
    """What a graph is specialised to: each input's shape and dtype."""
    return tuple((tuple(x.shape), x.dtype) for x in inputs)


class _Graph:
    """One captured call: static inputs to copy into, the graph, the static outputs."""

    def __init__(self, graph: Any, inputs: list[Any], outputs: Any) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs

    def run(self, inputs: list[Any]) -> Any:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.outputs


class GraphRunner:
    """Calls ``model(*inputs)`` through a CUDA graph per signature, eagerly where it cannot.

    Call it only on the instance thread, with the instance's stream current in torch.
    """

    def __init__(self, torch: Any, model: Any, name: str, limit: int | None = None) -> None:
        self.torch = torch
        self.model = model
        self.name = name  # for warnings: which node
        self.limit = MAX_GRAPHS if limit is None else limit
        self.pool = torch.cuda.graph_pool_handle()  # shared by this instance's graphs only
        self.graphs: dict[tuple[Any, ...], _Graph | None] = {}  # None: this signature runs eagerly
        self._warned_limit = False

    @property
    def captured(self) -> int:
        return sum(graph is not None for graph in self.graphs.values())

    def __call__(self, *inputs: Any) -> Any:
        key = signature(list(inputs))
        graph = self.graphs.get(key, _UNSEEN)
        if graph is _UNSEEN:
            if len(self.graphs) >= self.limit:  # not remembered: the dict stays bounded
                self._warn_limit(key)
                return self.model(*inputs)
            graph = self.graphs[key] = self._capture(key, list(inputs))
        return self.model(*inputs) if graph is None else graph.run(list(inputs))

    def close(self) -> None:
        """Drop the graphs and their pool (the instance's stream must be idle)."""
        self.graphs.clear()

    def _warn_limit(self, key: tuple[Any, ...]) -> None:
        if not self._warned_limit:
            self._warned_limit = True
            log.warning("%s: %d input signatures already have CUDA graphs (or failed to capture); signature %s "
                        "and any further ones run eagerly (send fewer distinct shapes, or set cuda_graph = false)",
                        self.name, self.limit, _describe(key))

    def _capture(self, key: tuple[Any, ...], inputs: list[Any]) -> _Graph | None:
        static = [x.clone() for x in inputs]  # on the instance stream, outside the pool
        with _CAPTURE_LOCK:
            started = time.perf_counter()
            try:
                for _ in range(WARMUP_RUNS):
                    self.model(*static)
                graph = self._record(static)
                log.info("%s: captured a CUDA graph for inputs %s in %.1f ms", self.name, _describe(key),
                         (time.perf_counter() - started) * 1e3)
                return graph
            except Exception as exc:  # a model that cannot be captured still runs, eagerly
                log.warning("%s: the model cannot be captured in a CUDA graph for inputs %s, so they run "
                            "eagerly (%s: %s); set cuda_graph = false to stop trying",
                            self.name, _describe(key), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                return None

    def _record(self, static: list[Any]) -> _Graph:
        graph = self.torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        try:
            outputs = self.model(*static)
            graph.capture_end()
        except BaseException:
            self._end_after_failure(graph)
            raise
        return _Graph(graph, static, outputs)

    def _end_after_failure(self, graph: Any) -> None:
        """End a capture the model broke, and stop routing allocations to the pool.

        torch's ``capture_end`` raises on an invalidated capture *before* it tells the
        caching allocator that the capture is over, and an allocator that believes a capture
        is underway stops recycling memory used across streams.  The model's own exception
        is the one reported; these two only tidy up and may find nothing to do.
        """
        torch = self.torch
        try:
            graph.capture_end()
        except RuntimeError:
            pass  # the usual case: "operation failed due to a previous error during capture"
        end_routing = getattr(torch._C, "_cuda_endAllocateToPool", None)
        if end_routing is not None:
            try:
                end_routing(torch.cuda.current_device(), self.pool)
            except RuntimeError:
                pass  # capture_end got as far as ending it


def _describe(key: tuple[Any, ...]) -> str:
    return ", ".join(f"{str(dtype).replace('torch.', '')}{list(shape)}" for shape, dtype in key)
