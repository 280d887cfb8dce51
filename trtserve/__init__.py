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
from .errors import *  # noqa: F401,F403
from .errors import ErrorCode, TrtserveError
from .pipe import Pipe, pipe

__version__ = "0.2.0"
__all__ = ["Backend", "Completion", "ErrorCode", "Key", "Pipe", "TensorSpec", "TrtserveError", "pipe", "register", "registered_names"]
