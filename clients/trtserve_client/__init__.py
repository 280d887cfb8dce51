"""trtserve's client library: needs only msgpack and numpy.

    from trtserve_client import Client
    with Client("127.0.0.1", 8001) as client:
        outputs = client.infer("tensor_mlp", batch)   # {"output": ndarray}

``Client`` (blocking, thread-safe) wraps ``AsyncClient`` (asyncio); both pipeline many
requests per connection over a pool of connections and raise the typed errors below,
chosen by the wire error code.  ``Client(endpoints=["h1:8001", "h2:8001"])`` balances
requests over several servers and fails over between them (docs/scaling.md).  A client on the server's host can pass tensors through shared
memory instead (``register_system_shm``, ``register_cuda_shm``: regions.py).
docs/PROTOCOL.md specifies the wire format.
"""
from .aio import DEFAULT_HOST, DEFAULT_PORT, AsyncClient
from .client import Client
from .connection import Connection
from .errors import (
    ErrorCode, TrtserveError, error_class, error_from_wire, BackendError, ConfigError,
    ConnectionFailedError, DeadlineExceededError, DeviceError, FrameTooLargeError, InternalError,
    InvalidArgumentError, InvalidInputError, ModelNotFoundError, ModelUnavailableError,
    NoResultError, PermissionDeniedError, ProtocolError, QueueFullError, ResourceExhaustedError,
    ShuttingDownError, UnauthenticatedError, UnknownOperationError, UnsupportedProtocolError,
    VersionNotFoundError,
)
from .regions import SystemSharedMemory
from .wire import DEFAULT_MAX_FRAME, PROTOCOL_VERSION

__version__ = "0.2.0"
__all__ = [
    "AsyncClient",
    "Client",
    "Connection",
    "DEFAULT_HOST",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_PORT",
    "PROTOCOL_VERSION",
    "SystemSharedMemory",
    # the error tree (errors.py)
    "ErrorCode", "TrtserveError", "error_class", "error_from_wire", "BackendError", "ConfigError",
    "ConnectionFailedError", "DeadlineExceededError", "DeviceError", "FrameTooLargeError",
    "InternalError", "InvalidArgumentError", "InvalidInputError", "ModelNotFoundError",
    "ModelUnavailableError", "NoResultError", "PermissionDeniedError", "ProtocolError",
    "QueueFullError", "ResourceExhaustedError", "ShuttingDownError", "UnauthenticatedError",
    "UnknownOperationError", "UnsupportedProtocolError", "VersionNotFoundError",
]
