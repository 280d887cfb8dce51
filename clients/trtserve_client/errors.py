"""The one error tree of trtserve, shared by the server, the in-process runtime and the client.

Every error carries a numeric :class:`ErrorCode` that travels on the wire.  The client
rebuilds the same class from the code alone (never from the message text), so
``except QueueFullError`` works identically in-process and across the network.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    """Numeric error codes; stable across versions (append only)."""

    INTERNAL = 1
    INVALID_ARGUMENT = 2
    MODEL_NOT_FOUND = 3
    VERSION_NOT_FOUND = 4
    UNKNOWN_OPERATION = 5
    INVALID_INPUT = 6
    MODEL_UNAVAILABLE = 7
    QUEUE_FULL = 8
    DEADLINE_EXCEEDED = 9
    PROTOCOL_ERROR = 10
    FRAME_TOO_LARGE = 11
    UNSUPPORTED_PROTOCOL = 12
    BACKEND_ERROR = 13
    NO_RESULT = 14
    UNAUTHENTICATED = 15
    PERMISSION_DENIED = 16
    RESOURCE_EXHAUSTED = 17
    SHUTTING_DOWN = 18
    CONFIG_ERROR = 19
    DEVICE_ERROR = 20
    CONNECTION_ERROR = 21


class TrtserveError(Exception):
    """Base of every trtserve error: a code, a message and structured details."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def name(self) -> str:
        return getattr(self.code, "name", f"CODE_{int(self.code)}")

    def to_wire(self) -> dict[str, Any]:
        return {
            "code": int(self.code),
            "name": self.name,
            "message": self.message,
            "details": _wire_safe(self.details),
        }

    def __reduce__(self):  # keep pickling (multiprocessing, pytest-xdist) working
        return (_rebuild, (type(self), self.message, self.details))


def _rebuild(cls, message, details):
    return cls(message, **details)


def _wire_safe(value: Any) -> Any:
    """Reduce details to msgpack-native types so encoding an error can never fail."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, dict):
        return {str(k): _wire_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire_safe(v) for v in value]
    return repr(value)


class InternalError(TrtserveError):
    code = ErrorCode.INTERNAL


class InvalidArgumentError(TrtserveError):
    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFoundError(TrtserveError):
    code = ErrorCode.MODEL_NOT_FOUND


class VersionNotFoundError(TrtserveError):
    code = ErrorCode.VERSION_NOT_FOUND


class UnknownOperationError(TrtserveError):
    code = ErrorCode.UNKNOWN_OPERATION


class InvalidInputError(TrtserveError):
    """Wrong input name, dtype or shape, a missing input, or a batch over the model's max."""

    code = ErrorCode.INVALID_INPUT


class ModelUnavailableError(TrtserveError):
    code = ErrorCode.MODEL_UNAVAILABLE


class QueueFullError(TrtserveError):
    code = ErrorCode.QUEUE_FULL


class DeadlineExceededError(TrtserveError):
    code = ErrorCode.DEADLINE_EXCEEDED


class ProtocolError(TrtserveError):
    code = ErrorCode.PROTOCOL_ERROR


class FrameTooLargeError(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class UnsupportedProtocolError(ProtocolError):
    code = ErrorCode.UNSUPPORTED_PROTOCOL


class BackendError(TrtserveError):
    """A backend raised while running a batch; every item of that batch gets this."""

    code = ErrorCode.BACKEND_ERROR


class NoResultError(TrtserveError):
    """The pipeline finished an item without a ``result`` (a soft failure, e.g. a bad JPEG)."""

    code = ErrorCode.NO_RESULT


class UnauthenticatedError(TrtserveError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(TrtserveError):
    code = ErrorCode.PERMISSION_DENIED


class ResourceExhaustedError(TrtserveError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class ShuttingDownError(TrtserveError):
    code = ErrorCode.SHUTTING_DOWN


class ConfigError(TrtserveError):
    """A model configuration is invalid: the message names the file, the key and the fix."""

    code = ErrorCode.CONFIG_ERROR


class DeviceError(TrtserveError):
    """A CUDA/TensorRT failure.  ``details['sticky']`` is true when the device is poisoned."""

    code = ErrorCode.DEVICE_ERROR


class ConnectionFailedError(TrtserveError):
    """Client side only: the connection to the server failed or was lost."""

    code = ErrorCode.CONNECTION_ERROR


_CLASS_BY_CODE: dict[int, type[TrtserveError]] = {}
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, TrtserveError):
        # The most derived class registered for a code wins; each code has exactly one.
        _CLASS_BY_CODE[int(_cls.code)] = _cls


def error_class(code: int) -> type[TrtserveError]:
    """The exception class for a wire code; unknown codes map to the base class."""
    return _CLASS_BY_CODE.get(int(code), TrtserveError)


def error_from_wire(obj: Any) -> TrtserveError:
    """Rebuild a typed exception from a wire error object, chosen by ``code`` alone."""
    if not isinstance(obj, dict) or not isinstance(obj.get("code"), int):
        return ProtocolError("malformed error object from peer", received=_wire_safe(obj))
    cls = error_class(obj["code"])
    details = obj.get("details")
    err = cls(str(obj.get("message", "")))
    # Set details after construction: a detail key named "message" must not clash with
    # the constructor's positional argument.
    err.details = {str(k): v for k, v in details.items()} if isinstance(details, dict) else {}
    if cls is TrtserveError:
        err.code = obj["code"]  # keep unknown future codes visible
    return err


# Literal, so that readers and type checkers see the names (a test checks it lists every class).
__all__ = [
    "ErrorCode", "TrtserveError", "error_class", "error_from_wire",
    "BackendError", "ConfigError", "ConnectionFailedError",
    "DeadlineExceededError", "DeviceError", "FrameTooLargeError",
    "InternalError", "InvalidArgumentError", "InvalidInputError",
    "ModelNotFoundError", "ModelUnavailableError", "NoResultError",
    "PermissionDeniedError", "ProtocolError", "QueueFullError",
    "ResourceExhaustedError", "ShuttingDownError", "UnauthenticatedError",
    "UnknownOperationError", "UnsupportedProtocolError", "VersionNotFoundError",
]
