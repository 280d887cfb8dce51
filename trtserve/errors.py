"""trtserve's error tree; the single definition lives in the client package so that the
server, the in-process runtime and every client raise the very same classes."""
from trtserve_client.errors import (
    ErrorCode, TrtserveError, error_class, error_from_wire, BackendError, ConfigError,
    ConnectionFailedError, DeadlineExceededError, DeviceError, FrameTooLargeError, InternalError,
    InvalidArgumentError, InvalidInputError, ModelNotFoundError, ModelUnavailableError,
    NoResultError, PermissionDeniedError, ProtocolError, QueueFullError, ResourceExhaustedError,
    ShuttingDownError, UnauthenticatedError, UnknownOperationError, UnsupportedProtocolError,
    VersionNotFoundError,
)

__all__ = [
    "ErrorCode", "TrtserveError", "error_class", "error_from_wire", "BackendError", "ConfigError",
    "ConnectionFailedError", "DeadlineExceededError", "DeviceError", "FrameTooLargeError",
    "InternalError", "InvalidArgumentError", "InvalidInputError", "ModelNotFoundError",
    "ModelUnavailableError", "NoResultError", "PermissionDeniedError", "ProtocolError",
    "QueueFullError", "ResourceExhaustedError", "ShuttingDownError", "UnauthenticatedError",
    "UnknownOperationError", "UnsupportedProtocolError", "VersionNotFoundError",
]
