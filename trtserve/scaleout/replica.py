"""The Ray Serve deployment of one model: each replica runs the model's trtserve pipeline.

A replica loads the model exactly as ``trtserve serve`` does (``ModelRepository.load``:
``backend.py``, version policy, nodes, instances, warmup), so it batches the same way.
The front door (forwarder.py) sends it *calls*, each carrying the requests that arrived
together; the replica submits them all inside one ``held_dispatch()`` (so inline nodes
batch them as the server batches one socket read) and answers once every one finished.

Values cross as Python objects (numpy arrays, bytes, dicts) through Ray's serialization,
never as trtserve wire frames.  Errors cross as trtserve's typed exceptions (picklable).
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from ray import serve

from ..errors import DeviceError, ModelUnavailableError, TrtserveError
from ..hold import held_dispatch
from ..repository import ModelRepository

# One request of a call: (data, version or None, seconds left or None, priority).
CallRequest = tuple[Any, "int | None", "float | None", int]
# Its outcome: (error or None, has_result, result, queue_ns, compute_ns).
Outcome = tuple["TrtserveError | None", bool, Any, int, int]


class ModelReplica:
    """Serve deployment class; ``serve.deployment(ModelReplica)`` is built by repository.py."""

    def __init__(self, root: str, model: str, kwargs: dict[str, Any]) -> None:
        self.model = model
        self.repository = ModelRepository(root, kwargs)
        self.repository.load(model)  # a failure is raised: Serve reports the replica failed
        self.replica_id = _replica_id()

    # -- serving -----------------------------------------------------------------------
    async def infer(self, requests: list[CallRequest]) -> tuple[str, list[Outcome]]:
        """Run one call's requests through the pipeline; their outcomes, in order."""
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        pending = [len(requests)]
        lock = threading.Lock()
        errors: list[TrtserveError | None] = [None] * len(requests)
        items = [{"data": data} for data, *_ in requests]

        def done_for(index: int):
            def on_done(_item: dict[str, Any], error: TrtserveError | None) -> None:
                errors[index] = error
                with lock:
                    pending[0] -= 1
                    last = pending[0] == 0
                if last:  # one wake-up of the replica's loop per call, not per request
                    loop.call_soon_threadsafe(_settle, finished)

            return on_done

        flows = self._submit_all(requests, items, done_for)
        if requests:
            await finished
        return self.replica_id, [
            (errors[i], "result" in items[i], items[i].get("result"),
             getattr(flows[i], "queue_ns", 0), getattr(flows[i], "compute_ns", 0))
            for i in range(len(requests))
        ]

    def _submit_all(self, requests: list[CallRequest], items: list[dict[str, Any]], done_for) -> list[Any]:
        now = time.monotonic()
        flows: list[Any] = [None] * len(requests)
        with held_dispatch():  # inline nodes form batches from the whole call
            for index, (_, version, seconds_left, priority) in enumerate(requests):
                on_done = done_for(index)
                try:
                    model = self.repository.get(self.model, version)
                    deadline = None if seconds_left is None else now + seconds_left
                    flows[index] = model.submit(items[index], on_done, deadline, priority)
                except TrtserveError as exc:  # refused before queueing: answered at once
                    on_done(items[index], exc)
        return flows

    # -- control plane (the front door's status thread, via broadcast) ---------------------
    def metadata(self) -> dict[int, dict[str, Any]]:
        """``model_metadata`` of every version this replica serves."""
        latest = self.repository.get(self.model)
        served = dict(latest.entry.models) if latest.entry is not None else {latest.version: latest}
        return {version: model.metadata() for version, model in served.items()}

    def statistics(self) -> dict[str, Any]:
        latest = self.repository.get(self.model)
        served = dict(latest.entry.models) if latest.entry is not None else {latest.version: latest}
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "versions": [served[v].statistics() for v in sorted(served)],
        }

    def check_health(self) -> None:
        """Serve's health check: a sticky CUDA error or a lost model restarts the replica."""
        from ..server.handlers import cuda_poisoned

        poisoned = cuda_poisoned()
        if poisoned is not None:
            raise DeviceError(f"replica {self.replica_id}: the GPU is unusable: {poisoned.message}")
        if not self.repository.loaded():
            raise ModelUnavailableError(f"replica {self.replica_id}: model {self.model!r} is not loaded", model=self.model)

    def __del__(self) -> None:
        # Serve calls this after the replica's calls finished (graceful shutdown): what is
        # still queued inside the pipeline runs before the instances stop.
        repository = getattr(self, "repository", None)
        if repository is not None:
            for name in repository.loaded():
                repository.unload(name)
            repository.close()


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # built outside a Serve replica (a unit test): the process names it
        return f"pid-{os.getpid()}"


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:
        return ""
