"""trtserve's error tree; the single definition lives in the client package so that the
server, the in-process runtime and every client raise the very same classes."""
from trtserve_client.errors import *  # noqa: F401,F403
from trtserve_client.errors import ErrorCode, TrtserveError, error_class, error_from_wire  # noqa: F401
