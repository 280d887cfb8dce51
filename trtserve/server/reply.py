"""A pending operation's answer slot: set once on the event loop thread, and the
protocol's callback runs at once.

``asyncio.Future`` schedules done-callbacks with ``call_soon``, so with it every answer
would wait one more loop turn (an extra epoll round trip) before it is written, and the
protocol would bind the request id into a ``functools.partial`` per request.  A Reply takes exactly one
callback plus one argument (the request id) and calls ``callback(arg, reply)`` when it is
set.  The protocol reads the outcome from the public slots: ``cancelled``, ``error``
(a BaseException, or None) and ``value``.

Pending operations subclass it (infer.InferCall, handlers.Deferred), so a request in flight
is one object, and ``cancel()`` is where a subclass also stops its work.

A value of type ``Framed`` is an answer framed already, with the request's own id (a Ray
front door relays its replicas' answers so: scaleout/forwarder.py); the protocol writes it
as it is.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Framed:
    """A whole answer frame, as a list of buffers to write in order (frames.frame_parts)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts


class Reply:
    __slots__ = ("done", "cancelled", "value", "error", "_callback", "_arg")  # subclasses add theirs

    def __init__(self) -> None:
        self.done = False
        self.cancelled = False
        self.value: Any = None
        self.error: BaseException | None = None
        self._callback: Callable[[Any, Reply], Any] | None = None
        self._arg: Any = None

    def add_done_callback(self, callback: Callable[[Any, Reply], Any], arg: Any) -> None:
        """``callback(arg, reply)`` runs once, when the reply is set (at once if it is)."""
        if self._callback is not None:
            raise RuntimeError("a Reply takes one callback")
        self._callback, self._arg = callback, arg
        if self.done:
            callback(arg, self)

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def cancel(self) -> bool:
        if self.done:
            return False
        self.cancelled = True
        self._finish(None, None)
        return True

    def _finish(self, value: Any, error: BaseException | None) -> None:
        if self.done:
            raise RuntimeError("this reply is already done")
        self.done, self.value, self.error = True, value, error
        if self._callback is not None:
            self._callback(self._arg, self)
