"""trtserve's client library: needs only msgpack and numpy."""
from .errors import *  # noqa: F401,F403
from .errors import ErrorCode, TrtserveError
from .wire import PROTOCOL_VERSION

__all__ = ["ErrorCode", "PROTOCOL_VERSION", "TrtserveError"]
