"""AsyncClient: the asyncio client, a pool of pipelined connections.

    async with AsyncClient("127.0.0.1", 8001, connections=4) as client:
        outputs = await client.infer("tensor_mlp", np.zeros((1, 16), np.float32))

    # several servers (front doors, or trtserve serve processes), balanced per request:
    async with AsyncClient(endpoints=["10.0.0.5:8001", "10.0.0.6:8001"]) as client:
        ...

Every operation of the protocol (docs/PROTOCOL.md) is one method.  Errors are the typed
classes of :mod:`trtserve_client.errors`, chosen by the wire code.  The sync
:class:`~trtserve_client.client.Client` runs this very class on a private event loop.
"""
from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .connection import DEFAULT_CONNECT_TIMEOUT, Connection
from .endpoints import DEFAULT_DOWN_S, Endpoint, Endpoints, parse_endpoints
from .errors import (
    ConnectionFailedError,
    InvalidArgumentError,
    InvalidInputError,
    ModelUnavailableError,
    ProtocolError,
    ShuttingDownError,
    TrtserveError,
)
from .regions import Region, SystemSharedMemory, decode_outputs
from .wire import DEFAULT_MAX_FRAME, decode_value, encode_tensors

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
#: Name used for a lone input when the model declares no inputs (the server then accepts any).
ANONYMOUS_INPUT = "input"
STRATEGIES = ("least_in_flight", "round_robin")
# Answers that mean "this server did not answer this request; another one may": the
# connection dropped (or never opened) before an answer, or the server is shutting down.
RETRIABLE = (ConnectionFailedError, ShuttingDownError)


def _another_may_answer(exc: TrtserveError) -> bool:
    """A RETRIABLE failure, or a server still loading the model (a restarted one binds
    before its models are READY): nothing ran there, another endpoint may answer."""
    return isinstance(exc, RETRIABLE) or (
        isinstance(exc, ModelUnavailableError) and exc.details.get("state") == "LOADING")
# Operations that are safe to send again: they change nothing on the server.
_IDEMPOTENT = frozenset({"infer", "live", "ready", "server_metadata", "model_metadata", "model_config",
                         "repository_index", "statistics"})
_CLOSE_UNREGISTER_S = 5.0  # close() waits this long for the server to let go of regions

Value = np.ndarray | bytes
Inputs = Mapping[str, Any] | np.ndarray | bytes | bytearray | memoryview


class AsyncClient:
    """A pool of ``connections`` pipelined connections to one server, or to each of several.

    Each method is one protocol operation and returns that operation's ``result`` map as
    docs/PROTOCOL.md defines it, except ``live``/``ready`` (a bool) and ``infer`` (the
    decoded outputs).  Failures raise the typed errors of :mod:`trtserve_client.errors`.

    ``strategy`` picks the connection for each request: ``"least_in_flight"`` (default;
    ties broken round-robin) or ``"round_robin"``.  ``timeout`` is the default per-request
    timeout in seconds (None: wait as long as the server takes).  Connections open on first
    use and reopen on the next call after a drop, so a client outlives server restarts.

    Access control: ``token`` (str or bytes) is sent in an ``auth`` request first on every
    new connection, reconnects included; a wrong one raises UnauthenticatedError.  TLS:
    ``ssl=`` an ``ssl.SSLContext`` (or True for the system's CAs), or ``tls=True`` with
    ``ca_file=`` the PEM file that signed the server's certificate (a self-signed
    certificate is its own CA); ``server_hostname`` overrides the name checked.

    Several servers: ``endpoints=["host:port", ("host", port), ...]`` instead of
    host/port.  Each request goes to the endpoint with the fewest requests outstanding; an
    endpoint whose connection fails is skipped for a while (endpoints.py) and used again
    once it answers.  A request whose connection dropped before its answer (or that a
    draining server refused with SHUTTING_DOWN, or a server still loading the model refused
    with MODEL_UNAVAILABLE, state LOADING) is sent again on another endpoint, at most
    ``retries`` times (default: once per other endpoint; 0 turns it off).  This is safe
    because inference is idempotent: running a request twice gives the same answer and
    changes nothing.  ``load`` and ``unload`` are never re-sent.  With one endpoint nothing
    is ever re-sent: whether a dropped request ran is the caller's call.

    Shared memory (a server on the same host): ``register_system_shm`` / ``register_cuda_shm``
    register a region on every connection of every endpoint (and again after a reconnect); inputs
    given as ``region.tensor(...)`` travel as references, and outputs named in
    ``infer(shm_outputs=...)`` come back as views of their regions (regions.py).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        connections: int = 1,
        strategy: str = "least_in_flight",
        timeout: float | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame: int = DEFAULT_MAX_FRAME,
        token: str | bytes | None = None,
        ssl: _ssl.SSLContext | bool | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        server_hostname: str | None = None,
        endpoints: Sequence[str | tuple[str, int]] | None = None,
        retries: int | None = None,
        down_s: float = DEFAULT_DOWN_S,
    ) -> None:
        if not isinstance(connections, int) or connections < 1:
            raise InvalidArgumentError(f"connections must be an integer >= 1, got {connections!r}", connections=repr(connections))
        if strategy not in STRATEGIES:
            raise InvalidArgumentError(f"strategy must be one of {STRATEGIES}, got {strategy!r}", strategy=repr(strategy))
        _check_timeout(timeout)
        addresses = _addresses(host, port, endpoints)
        self.host, self.port = addresses[0]
        self.retries = _retries(retries, len(addresses))
        if isinstance(down_s, bool) or not isinstance(down_s, (int, float)) or not down_s > 0:
            raise InvalidArgumentError(f"down_s must be a number of seconds > 0, got {down_s!r}", field="down_s")
        self.down_s = float(down_s)
        self.strategy = strategy
        self.timeout = timeout
        if token is not None and (not isinstance(token, (str, bytes)) or not token):
            raise InvalidArgumentError(f"token must be a non-empty str or bytes, got {type(token).__name__}", field="token")
        context = _ssl_context(ssl, tls, ca_file)
        self._endpoints = Endpoints([
            Endpoint(h, p, connections, max_frame=max_frame, connect_timeout=connect_timeout, token=token, ssl=context,
                     server_hostname=server_hostname or (h if context is not None else None))
            for h, p in addresses
        ])
        self._input_names: dict[tuple[str, int | None], str] = {}
        self._regions: dict[str, Region] = {}

    # -- pool --------------------------------------------------------------------------
    @property
    def connections(self) -> list[Connection]:
        return [c for e in self._endpoints.all for c in e.pool]

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every endpoint, in the order given."""
        return [e.address for e in self._endpoints.all]

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.connections)

    def outstanding(self) -> dict[str, int]:
        """Requests in flight per endpoint (``host:port``)."""
        return {e.address: e.in_flight for e in self._endpoints.all}

    async def connect(self) -> None:
        """Open every pooled connection now (they otherwise open on first use), so that an
        unreachable server fails here with ConnectionFailedError."""
        await asyncio.gather(*(c.connect() for c in self.connections))

    async def _send(self, op: str, fields: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """One request on the chosen endpoint; re-sent elsewhere when it may be (class docstring)."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        tried: list[Endpoint] = []
        while True:
            endpoint = self._endpoints.pick(tried)
            assert endpoint is not None  # the loop ends before every endpoint was tried
            try:
                result = await endpoint.connection(self.strategy).request(op, fields, _remaining(deadline))
            except TrtserveError as exc:
                if not _another_may_answer(exc):
                    raise
                endpoint.failed(self.down_s)  # dropped, unreachable, draining or loading: skip it a while
                tried.append(endpoint)
                if op not in _IDEMPOTENT or len(tried) > self.retries or len(tried) == len(self._endpoints.all):
                    raise
                continue
            endpoint.answered()
            return result

    async def request(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send any operation with raw wire fields; returns the ``result`` map as received.

        The escape hatch under the typed methods (e.g. an infer with an explicit
        ``timeout_ms`` for the server but no client-side timeout).
        """
        timeout = self._timeout(timeout)
        return await self._send(op, fields, timeout)

    # -- health and metadata -----------------------------------------------------------
    async def live(self, timeout: float | None = None) -> bool:
        """True when the server process is up and answering."""
        return bool((await self.request("live", timeout))["live"])

    async def ready(self, model: str | None = None, version: int | None = None, timeout: float | None = None) -> bool:
        """Server readiness, or, given ``model``, whether that model (version) can serve."""
        fields = _optional(model=model, version=version)
        return bool((await self.request("ready", timeout, **fields))["ready"])

    async def server_metadata(self, timeout: float | None = None) -> dict[str, Any]:
        """``{"name", "version", "protocol", "operations", "max_frame", ...}``."""
        return await self.request("server_metadata", timeout)

    async def model_metadata(self, model: str, version: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """``{"name", "versions", "inputs", "outputs", "max_batch_size", "nodes"}``."""
        return await self.request("model_metadata", timeout, model=_model(model), **_optional(version=version))

    async def model_config(self, model: str, timeout: float | None = None) -> dict[str, Any]:
        """``{"name", "source", "config"}``: the model's configuration as the server parsed it."""
        return await self.request("model_config", timeout, model=_model(model))

    async def repository_index(self, timeout: float | None = None) -> dict[str, Any]:
        """``{"models": [{"name", "version", "versions_on_disk", "state", "reason"}]}``:
        every model on disk or loaded."""
        return await self.request("repository_index", timeout)

    async def statistics(self, model: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """``{"models": [{"name", "version", "success_count", ...}]}``: every loaded model,
        or only ``model``."""
        fields = _optional(model=None if model is None else _model(model))
        return await self.request("statistics", timeout, **fields)

    # -- repository control ------------------------------------------------------------
    async def load(self, model: str, timeout: float | None = None) -> dict[str, Any]:
        """Load (or reload) a model's latest version; ``{"name", "version", "state"}``."""
        self._forget(model)
        return await self.request("load", timeout, model=_model(model))

    async def unload(self, model: str, timeout: float | None = None) -> dict[str, Any]:
        """Unload a model; ``{"name", "state": "UNLOADED"}``."""
        self._forget(model)
        return await self.request("unload", timeout, model=_model(model))

    # -- inference ---------------------------------------------------------------------
    async def infer(
        self,
        model: str,
        inputs: Inputs,
        version: int | None = None,
        outputs: Iterable[str] | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        shm_outputs: Mapping[str, Any] | None = None,
    ) -> dict[str, Value]:
        """Run ``model`` on ``inputs`` and return ``{output name: ndarray or bytes}``.

        ``inputs`` is a dict name -> array/bytes, or one array/bytes for a one-input model
        (its name is looked up once in the model's metadata and cached).  Arrays carry
        their batch dimension.  ``outputs`` selects output names.  ``priority`` is the
        queue level (1 = highest; None = the model's default).  ``timeout`` (seconds)
        bounds the whole call and is also sent as ``timeout_ms`` so the server drops the
        request instead of computing an answer nobody waits for.  Returned arrays are
        read-only views over the received bytes (no copy); ``.copy()`` one to modify it.

        Shared memory: an input value may be ``region.tensor(shape, dtype, offset)``, and
        ``shm_outputs`` maps output names to a registered region (the whole of it) or
        ``region.slot(offset, byte_size)``; those outputs are written there by the server
        and returned as views of the region (numpy, or DeviceView for CUDA regions).
        """
        model = _model(model)
        timeout = self._timeout(timeout)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        named = await self._named(model, version, inputs, timeout)
        fields = _infer_fields(model, named, version, outputs, priority)
        if shm_outputs is not None:
            fields["shm_outputs"] = self._slots(shm_outputs)
        remaining = _remaining(deadline)
        if remaining is not None:
            fields["timeout_ms"] = remaining * 1000.0
        try:
            result = await self._send("infer", fields, remaining)
        except InvalidInputError:
            if not isinstance(inputs, Mapping):
                # The cached input name may be stale (another client reloaded the model with
                # new inputs): look it up again on the next call.
                self._input_names.pop((model, version), None)
            raise
        return _decode_outputs(result, self._regions)

    async def _named(self, model: str, version: int | None, inputs: Inputs, timeout: float | None) -> Mapping[str, Any]:
        if isinstance(inputs, Mapping):
            return inputs
        name = self._input_names.get((model, version))
        if name is None:
            name = _sole_input(await self.model_metadata(model, version, timeout))
            self._input_names[(model, version)] = name
        return {name: inputs}

    # -- shared memory -------------------------------------------------------------------
    async def register_system_shm(self, name: str, byte_size: int, key: str | None = None, offset: int = 0,
                                  timeout: float | None = None) -> SystemSharedMemory:
        """Register ``byte_size`` bytes of POSIX shared memory as region ``name``: a new object
        (removed again when the region is unregistered), or ``offset`` into the existing
        object ``key``.  Returns the region (``ndarray``, ``write``, ``tensor``, ``slot``)."""
        return await self._register(SystemSharedMemory(name, byte_size, key, offset), timeout)

    async def register_cuda_shm(self, name: str, byte_size: int, device: int = 0, memory: Any = None,
                                timeout: float | None = None) -> Any:
        """Register ``byte_size`` bytes of device memory on ``device`` as region ``name``,
        shared through CUDA IPC: allocated here, or ``memory`` (an address, or an object with
        ``__cuda_array_interface__``).  Needs cuda-python; returns a CudaSharedMemory."""
        from .cuda_regions import CudaSharedMemory  # only CUDA users need cuda-python

        return await self._register(CudaSharedMemory(name, byte_size, device, memory), timeout)

    async def _register(self, region: Region, timeout: float | None) -> Any:
        if region.name in self._regions:
            region.close()
            raise InvalidArgumentError(f"this client already has a region named {region.name!r}; unregister it first",
                                       field="name", region=region.name)
        timeout = self._timeout(timeout)
        self._regions[region.name] = region
        # Every connection's answer first, so none is left registered behind a failure.
        outcomes = await asyncio.gather(*(c.register_region(region.registration(), timeout) for c in self.connections),
                                        return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            await self.unregister_shm(region.name, timeout)
            raise failures[0]
        return region

    async def unregister_shm(self, name: str | Region | None = None, timeout: float | None = None) -> None:
        """Unregister region ``name`` (or every region) on every connection, then release this
        process's side of it.  Returns once the server no longer uses it (requests in flight
        that use it finish first)."""
        name = name.name if isinstance(name, Region) else name
        if name is not None and name not in self._regions:
            raise InvalidArgumentError(f"this client has no region named {name!r}; it has {sorted(self._regions)}",
                                       field="name", region=name)
        timeout = self._timeout(timeout)
        outcomes = await asyncio.gather(*(c.unregister_region(name, timeout) for c in self.connections), return_exceptions=True)
        for region in [self._regions.pop(name)] if name is not None else list(self._regions.values()):
            region.close()
        if name is None:
            self._regions.clear()
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            raise failures[0]

    async def shm_status(self, name: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """``{"regions": [...], "max_regions", "max_bytes", "mapped_bytes"}`` as one pooled
        connection's server side sees it (every connection holds the same regions)."""
        return await self.request("shm_status", timeout, **_optional(name=name))

    def _slots(self, shm_outputs: Mapping[str, Any]) -> dict[str, Any]:
        slots = {}
        for name, slot in shm_outputs.items():
            if isinstance(slot, Region):
                slot = slot.slot()
            if not isinstance(slot, dict) or slot.get("region") not in self._regions:
                raise InvalidArgumentError(f"shm_outputs[{name!r}] must be a region registered by this client or "
                                           f"region.slot(...), got {slot!r:.80}", field="shm_outputs")
            slots[name] = slot
        return slots

    def _forget(self, model: str) -> None:
        # A (re)load may change the model's inputs; look its input name up again next time.
        for key in [k for k in self._input_names if k[0] == model]:
            del self._input_names[key]

    def _timeout(self, timeout: float | None) -> float | None:
        _check_timeout(timeout)
        return self.timeout if timeout is None else timeout

    # -- lifecycle ---------------------------------------------------------------------
    async def close(self) -> None:
        """Close every connection; requests still pending fail with ConnectionFailedError.
        Regions are unregistered first (so the server has let go of device memory before it
        is freed), then released on this side."""
        if self._regions:
            try:
                await self.unregister_shm(timeout=_CLOSE_UNREGISTER_S)
            except TrtserveError:
                pass  # closing the connections releases them on the server anyway
        await asyncio.gather(*(c.close() for c in self.connections))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        if len(self._endpoints.all) > 1:
            return f"AsyncClient(endpoints={self.endpoints!r}, connections={len(self.connections)}, strategy={self.strategy!r})"
        return f"AsyncClient({self.host!r}, {self.port}, connections={len(self.connections)}, strategy={self.strategy!r})"


# --------------------------------------------------------------------------- helpers


def _ssl_context(ssl: _ssl.SSLContext | bool | None, tls: bool, ca_file: str | None) -> _ssl.SSLContext | None:
    """The TLS context for ``ssl=``/``tls=``/``ca_file=``, or None for plain TCP."""
    if isinstance(ssl, _ssl.SSLContext):
        if tls or ca_file is not None:
            raise InvalidArgumentError("give either ssl=<SSLContext> or tls=True/ca_file=, not both", field="ssl")
        return ssl
    if ssl not in (None, True, False):
        raise InvalidArgumentError(f"ssl must be an ssl.SSLContext, True or None, got {type(ssl).__name__}", field="ssl")
    if not (ssl or tls or ca_file is not None):
        return None
    try:  # verifies the certificate and the host name, TLS 1.2 or later
        return _ssl.create_default_context(cafile=ca_file)
    except (OSError, _ssl.SSLError) as exc:
        raise InvalidArgumentError(f"ca_file={ca_file!r} cannot be loaded ({exc}); give a PEM file of CA certificates", field="ca_file") from None


def _addresses(host: str, port: int, endpoints: Sequence[Any] | None) -> list[tuple[str, int]]:
    if endpoints is not None:
        if (host, port) != (DEFAULT_HOST, DEFAULT_PORT):
            raise InvalidArgumentError("give either host/port or endpoints=[...], not both", field="endpoints")
        return parse_endpoints(endpoints)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidArgumentError(f"port must be an integer in 1..65535, got {port!r}", port=repr(port))
    return [(host, port)]


def _retries(retries: int | None, endpoints: int) -> int:
    """How many times one request may be re-sent: by default once on each other endpoint."""
    if retries is None:
        return endpoints - 1
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgumentError(f"retries must be an integer >= 0 (0 = never re-send), got {retries!r}",
                                   field="retries")
    return retries


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise InvalidArgumentError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}", timeout=repr(timeout))


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    # Never 0: the server refuses timeout_ms <= 0, and an expired call still deserves its
    # typed DeadlineExceededError from the client's own timer.
    return max(deadline - asyncio.get_running_loop().time(), 1e-3)


def _model(model: Any) -> str:
    if not isinstance(model, str) or not model:
        raise InvalidArgumentError(f"model must be a non-empty string, got {model!r}", field="model")
    return model


def _names(outputs: Iterable[str]) -> list[str]:
    names = [outputs] if isinstance(outputs, str) else list(outputs)
    if not all(isinstance(n, str) for n in names):
        raise InvalidArgumentError(f"outputs must be output names (strings), got {names!r}", field="outputs")
    return names


def _optional(**fields: Any) -> dict[str, Any]:
    """Optional wire fields are omitted, never sent as nil."""
    return {k: v for k, v in fields.items() if v is not None}


def _infer_fields(
    model: str, inputs: Mapping[str, Any], version: int | None, outputs: Iterable[str] | None, priority: int | None
) -> dict[str, Any]:
    for name, value in inputs.items():
        if isinstance(value, (list, tuple)):
            raise InvalidInputError(
                f"input {name!r} is a Python {type(value).__name__}, not an array: the wire carries typed tensors; "
                f"send numpy.asarray(value, dtype=...) with the model's dtype (model_metadata lists it)",
                input=name, type=type(value).__name__)
    fields = {"model": model, "inputs": encode_tensors(inputs)}
    fields.update(_optional(version=version, outputs=None if outputs is None else _names(outputs), priority=priority))
    return fields


def _sole_input(metadata: dict[str, Any]) -> str:
    declared = [spec.get("name") for spec in metadata.get("inputs") or []]
    if not declared:
        return ANONYMOUS_INPUT
    if len(declared) == 1 and isinstance(declared[0], str):
        return declared[0]
    raise InvalidInputError(
        f"model {metadata.get('name')!r} has inputs {declared}; pass a dict name -> value instead of a single value",
        model=metadata.get("name"),
        expected=declared,
    )


def _decode_outputs(result: dict[str, Any], regions: dict[str, Region]) -> dict[str, Value]:
    try:
        return decode_outputs(result.get("outputs"), regions, decode_value)
    except TrtserveError as exc:
        # Our own request was fine; a tensor the server sent cannot be decoded.
        raise ProtocolError(f"the server sent malformed outputs: {exc.message}", **exc.details) from None
