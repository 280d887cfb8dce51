"""The operation table: the envelope check, then one short function per operation.

A handler returns either the result map (answered at once, on the loop thread) or a
pending call, a server/reply.Reply (answered when it is set; ``cancel()`` drops it).  Every
refusal is a typed TrtserveError whose message names the field, the value and the fix.
"""
from __future__ import annotations

import asyncio
import datetime
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from trtserve_client.wire import OPERATIONS, PROTOCOL_VERSION

from ..backend import did_you_mean
from ..errors import (
    InvalidArgumentError,
    ModelUnavailableError,
    ShuttingDownError,
    TrtserveError,
    UnknownOperationError,
    UnsupportedProtocolError,
)
from ..repository import ModelRepository
from .auth import Authenticator
from .control import ModelControl
from .infer import InferHandler, optional_version, require_model
from .reply import Reply
from .shm_ops import SharedMemory

# Operations that start work; refused once the server is draining for shutdown.
_WORK_OPS = frozenset({"infer", "load", "unload"})
# Operations that act on state the connection owns (its shared-memory regions): they get it too.
_CONNECTION_OPS = frozenset({"infer", "shm_register", "shm_unregister", "shm_status"})


def cuda_poisoned() -> Any:
    """The sticky CUDA error that made this process's GPU unusable, or None.  Looked up only
    when the cuda layer was ever imported, so a CPU-only server never imports it."""
    errors = sys.modules.get("trtserve.cuda.errors")
    return errors.poisoned_error() if errors is not None else None


class Deferred(Reply):
    """A blocking operation running in the control executor (load, unload), answered when
    its job ends.  Cancelling drops the answer; the job itself goes on.  ``pending`` (a set
    of the calls not answered yet) lets a shutdown answer them at once."""

    __slots__ = ("pending",)

    def __init__(self, job: asyncio.Future, pending: set | None = None) -> None:
        super().__init__()
        self.pending = pending
        if pending is not None:
            pending.add(self)
        job.add_done_callback(self._settle)

    def _settle(self, job: asyncio.Future) -> None:
        if self.pending is not None:
            self.pending.discard(self)
        if self.done:  # cancelled, or answered by a shutdown, before the job ended
            return
        if job.cancelled():
            self.cancel()
        elif (error := job.exception()) is not None:
            self.set_exception(error)
        else:
            self.set_result(job.result())


class Dispatcher:
    def __init__(
        self,
        repository: ModelRepository,
        *,
        loop: asyncio.AbstractEventLoop,
        executor: Executor,
        max_frame: int,
        control: ModelControl,
        version: str,
        authenticator: Authenticator | None = None,
        metrics: Any = None,
        shared_memory: SharedMemory | None = None,
    ) -> None:
        self.repository = repository
        self.loop = loop
        self.executor = executor
        self.max_frame = max_frame
        self.control = control
        self.authenticator = authenticator
        self.version = version
        self.ready = False  # serving: set once listening, cleared when draining starts
        self.draining = False
        self._control_calls: set[Deferred] = set()  # load/unload not answered yet
        self.shm = shared_memory if shared_memory is not None else SharedMemory(None)
        self._ops: dict[str, Callable[..., Any]] = {
            "auth": self.auth,
            "infer": (repository.infer_handler or InferHandler)(repository, loop, metrics, self.shm),
            "live": self.live,
            "ready": self.ready_op,
            "server_metadata": self.server_metadata,
            "model_metadata": self.model_metadata,
            "model_config": self.model_config,
            "repository_index": self.repository_index,
            "statistics": self.statistics,
            "load": self.load,
            "unload": self.unload,
            "shm_register": self.shm.register,
            "shm_unregister": self.shm.unregister,
            "shm_status": self.shm.status,
        }
        assert set(self._ops) == set(OPERATIONS), "the table must cover wire.OPERATIONS exactly"

    def dispatch(self, message: dict[str, Any], connection: Any = None) -> Any:
        """One request of ``connection`` (the server/protocol.py object that owns its regions)."""
        v = message.get("v")
        if type(v) is not int or v != PROTOCOL_VERSION:
            raise self._bad_version(v)
        op = message.get("op")
        handler = self._ops.get(op) if type(op) is str else None
        if handler is None:
            raise self._bad_op(op)
        if self.draining and op in _WORK_OPS:
            raise ShuttingDownError(
                f"the server is shutting down and accepts no new {op!r} requests; retry on another server",
                operation=op,
            )
        if op in _CONNECTION_OPS:
            return handler(message, connection)
        return handler(message)

    @staticmethod
    def _bad_version(v: Any) -> TrtserveError:
        if type(v) is not int:
            return InvalidArgumentError(
                f"field 'v' (protocol version) must be the integer {PROTOCOL_VERSION}, got {type(v).__name__} {v!r}",
                field="v",
                value=repr(v),
            )
        return UnsupportedProtocolError(
            f"protocol version {v} is not supported; this server speaks version {PROTOCOL_VERSION}",
            version=v,
            supported=[PROTOCOL_VERSION],
        )

    @staticmethod
    def _bad_op(op: Any) -> TrtserveError:
        if type(op) is not str:
            return InvalidArgumentError(
                f"field 'op' must be a string naming the operation, got {type(op).__name__} {op!r}; "
                f"operations are {list(OPERATIONS)}",
                field="op",
                value=repr(op),
            )
        return UnknownOperationError(
            f"unknown operation {op!r}{did_you_mean(op, list(OPERATIONS))}; operations are {list(OPERATIONS)}",
            operation=op,
            operations=list(OPERATIONS),
        )

    # -- access ------------------------------------------------------------------------
    def auth(self, message: dict[str, Any]) -> dict[str, Any]:
        """Check the token (UNAUTHENTICATED closes the connection: server/protocol.py).
        Without a configured token every connection is already admitted."""
        if self.authenticator is None:
            return {"authenticated": True, "required": False}
        self.authenticator.check(message)
        return {"authenticated": True, "required": True}

    # -- health and metadata -----------------------------------------------------------
    def live(self, message: dict[str, Any]) -> dict[str, Any]:
        # A sticky CUDA error makes the process's GPU unusable until it restarts: report not
        # live so that an orchestrator's liveness probe restarts it (CPU models still serve).
        poisoned = cuda_poisoned()
        if poisoned is not None:
            return {"live": False, "reason": poisoned.message}
        return {"live": True}

    def ready_op(self, message: dict[str, Any]) -> dict[str, Any]:
        name = message.get("model")
        if name is None:
            return {"ready": self.ready and not self.draining and cuda_poisoned() is None}
        name = require_model(message)
        version = optional_version(message)
        try:
            model = self.repository.get(name, version)
        except ModelUnavailableError:
            return {"ready": False}
        return {"ready": not self.draining and model.is_ready()}

    def server_metadata(self, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": "trtserve",
            "version": self.version,
            "protocol": PROTOCOL_VERSION,
            "operations": list(OPERATIONS),
            "max_frame": self.max_frame,
        }

    def model_metadata(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.repository.get(require_model(message), optional_version(message)).metadata()

    def model_config(self, message: dict[str, Any]) -> dict[str, Any]:
        model = self.repository.get(require_model(message))
        return {"name": model.name, "source": model.config.source, "config": _plain(model.config.raw)}

    def repository_index(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"models": self.repository.index()}

    def statistics(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("model") is not None:
            return {"models": self._served_stats(require_model(message))}
        models = []
        for name in self.repository.loaded():
            try:
                models += self._served_stats(name)
            except TrtserveError:
                continue  # unloaded between the listing and the read
        return {"models": models}

    def _served_stats(self, name: str) -> list[dict[str, Any]]:
        """One row per served version (a version policy may serve several)."""
        latest = self.repository.get(name)
        served = dict(latest.entry.models) if latest.entry is not None else {latest.version: latest}
        return [served[v].statistics() for v in sorted(served)]

    # -- model control -----------------------------------------------------------------
    def load(self, message: dict[str, Any]) -> Deferred:
        name = self._controlled(message, "load")

        def run() -> dict[str, Any]:
            model = self.repository.load(name)
            return {"name": model.name, "version": model.version, "state": "READY"}

        return Deferred(self.loop.run_in_executor(self.executor, run), self._control_calls)

    def unload(self, message: dict[str, Any]) -> Deferred:
        name = self._controlled(message, "unload")

        def run() -> dict[str, Any]:
            self.repository.unload(name)
            return {"name": name, "state": "UNLOADED"}

        return Deferred(self.loop.run_in_executor(self.executor, run), self._control_calls)

    def abandon_control(self, error: TrtserveError) -> None:
        """Shutdown: answer every load and unload still running with ``error`` now.  Their
        jobs go on (a load's model would only be closed again), but no stop waits for a
        model's code, which may hang."""
        for call in list(self._control_calls):
            self._control_calls.discard(call)
            if not call.done:
                call.set_exception(error)

    def _controlled(self, message: dict[str, Any], op: str) -> str:
        if not self.control.operations:
            raise self.control.denial(op)
        return require_model(message)


def _plain(value: Any) -> Any:
    """TOML as parsed, reduced to msgpack types (TOML dates and times become ISO strings)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return value
