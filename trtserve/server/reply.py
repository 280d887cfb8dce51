"""The answer slot of one infer call: a minimal future whose callback runs when it is set.

``asyncio.Future`` schedules done-callbacks with ``call_soon``, so every answer waited one
more loop turn (an extra epoll round trip) before it was written.  Here everything runs on
the event loop thread and the protocol registers a single callback, so it is called at
once.  The interface is the subset of ``asyncio.Future`` the protocol uses.
"""
from __future__ import annotations

from typing import Any, Callable

_PENDING, _DONE, _CANCELLED = 0, 1, 2


class Reply:
    __slots__ = ("_state", "_result", "_exception", "_callback")

    def __init__(self) -> None:
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callback: Callable[[Reply], Any] | None = None

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> Any:
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self) -> BaseException | None:
        return self._exception

    def add_done_callback(self, callback: Callable[[Reply], Any]) -> None:
        if self._callback is not None:
            raise RuntimeError("a Reply takes one callback")
        self._callback = callback
        if self._state != _PENDING:
            callback(self)

    def set_result(self, result: Any) -> None:
        self._finish(_DONE, result, None)

    def set_exception(self, exception: BaseException) -> None:
        self._finish(_DONE, None, exception)

    def cancel(self) -> bool:
        if self._state != _PENDING:
            return False
        self._finish(_CANCELLED, None, None)
        return True

    def _finish(self, state: int, result: Any, exception: BaseException | None) -> None:
        if self._state != _PENDING:
            raise RuntimeError("this reply is already done")
        self._state, self._result, self._exception = state, result, exception
        if self._callback is not None:
            self._callback(self)
