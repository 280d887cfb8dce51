"""trtserve: a small, fast model server for TensorRT and ONNX models.

In-process use::

    import trtserve
    models = trtserve.pipe({"backend": "Identity"})
    item = {"data": b"x"}
    models(item)
    assert item["result"] == b"x"
"""
from .backend import Backend, Key, TensorSpec, register, registered_names
from .completion import Completion
from .errors import (
    ErrorCode, TrtserveError, error_class, error_from_wire, BackendError, ConfigError,
    ConnectionFailedError, DeadlineExceededError, DeviceError, FrameTooLargeError, InternalError,
    InvalidArgumentError, InvalidInputError, ModelNotFoundError, ModelUnavailableError,
    NoResultError, PermissionDeniedError, ProtocolError, QueueFullError, ResourceExhaustedError,
    ShuttingDownError, UnauthenticatedError, UnknownOperationError, UnsupportedProtocolError,
    VersionNotFoundError,
)
from .pipe import Pipe, pipe

__version__ = "0.2.0"
__all__ = [
    "Backend", "Completion", "Key", "Pipe", "TensorSpec", "pipe", "register", "registered_names",
    # the error tree (errors.py)
    "ErrorCode", "TrtserveError", "error_class", "error_from_wire", "BackendError", "ConfigError",
    "ConnectionFailedError", "DeadlineExceededError", "DeviceError", "FrameTooLargeError",
    "InternalError", "InvalidArgumentError", "InvalidInputError", "ModelNotFoundError",
    "ModelUnavailableError", "NoResultError", "PermissionDeniedError", "ProtocolError",
    "QueueFullError", "ResourceExhaustedError", "ShuttingDownError", "UnauthenticatedError",
    "UnknownOperationError", "UnsupportedProtocolError", "VersionNotFoundError",
]
