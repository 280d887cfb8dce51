"""CUDA graphs for TorchScriptTensor: capture a model once per input signature, replay after.

A ResNet-18 batch launched eagerly from Python costs ~1.5 ms of host launch work for
~0.75 ms of GPU time, and two instances launching at once share one GIL; a captured graph
is one launch (docs/gpu.md).  Each signature (the batch's input shapes and dtypes) gets its
own graph, with static input tensors that every batch is copied into and static outputs
that the caller must copy out before the next replay (TorchScriptTensor's split does, on
the same stream).  Each graph keeps a private memory pool: graphs replayed in any order
must not share one.  ``limit`` bounds how many signatures are captured; the rest run
eagerly, as does any signature whose capture fails (a model that syncs with the host).

Runs on the instance thread with the instance's stream current.  torch is passed in, never
imported here, so the CPU path imports nothing from CUDA.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("trtserve.backends.gpu")

_EAGER = object()  # a signature whose capture failed: run it eagerly from now on


class GraphCache:
    def __init__(self, torch: Any, model: Callable[..., Any], limit: int) -> None:
        self.torch = torch
        self.model = model
        self.limit = limit
        self._graphs: dict[tuple, Any] = {}

    def __len__(self) -> int:
        return sum(1 for entry in self._graphs.values() if entry is not _EAGER)

    def run(self, inputs: list[Any]) -> Any:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.limit:
                return self.model(*inputs)
            entry = self._graphs[key] = self._capture(inputs)
        if entry is _EAGER:
            return self.model(*inputs)
        static_inputs, graph, static_output = entry
        for static, value in zip(static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        graph.replay()  # on the current stream, after the copies
        return static_output

    def _capture(self, inputs: list[Any]) -> Any:
        torch = self.torch
        static_inputs = [t.clone() for t in inputs]
        try:
            for _ in range(2):  # warm-up: cuDNN picks its kernels, lazy buffers get allocated
                self.model(*static_inputs)
            graph = torch.cuda.CUDAGraph()
            # thread_local: another instance's CUDA calls during this capture stay legal.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_output = self.model(*static_inputs)
        except Exception as exc:  # e.g. a host sync inside the model: not capturable
            log.warning("TorchScriptTensor: cannot capture a CUDA graph for inputs %s (%s: %s); running "
                        "them eagerly", [tuple(t.shape) for t in inputs], type(exc).__name__, exc)
            return _EAGER
        return static_inputs, graph, static_output
