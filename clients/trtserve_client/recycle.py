"""Receive buffers for large frames, recycled once nothing references them.

A frame of a few hundred KB read into fresh memory costs a page fault for every 4 KiB page
the kernel writes: glibc returns large freed blocks to the system, so each new frame meets
new pages.  With 600 KB answers on a 2-vCPU VM that was about 110 faults per request and
half of the client's CPU time.  Frames are read into buffers from a ``BufferPool`` instead.

No caller gives a buffer back.  The numpy views and memoryviews a frame's tensors are made
of each hold a reference to the buffer's array, so an array that only the pool references is
free, and the next frame of its size class reuses it.  What counts as "only the pool" is
measured at import (``_FREE_REFS``), not assumed, since interpreters count temporary
references differently.
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

#: Memory the process keeps for recycling, in size classes (powers of two: a class's pages
#: past the frame's size are never touched, so they cost address space, not memory).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Frames larger than this get a buffer of their own (a pool of them would hold too much).
LARGEST_POOLED = 16 * 1024 * 1024


def _first_free(arrays: list[np.ndarray], free_refs: int) -> int:
    """Index of the first array referenced by ``arrays`` alone, or -1."""
    for index in range(len(arrays)):
        if sys.getrefcount(arrays[index]) <= free_refs:
            return index
    return -1


def _calibrated_free_refs() -> int:
    """The reference count ``_first_free`` sees for an array only a list holds."""
    alone = [np.empty(1, np.uint8)]
    return next(n for n in range(1, 16) if _first_free(alone, n) == 0)


_FREE_REFS = _calibrated_free_refs()


def size_class(size: int) -> int:
    return 1 << max(size - 1, 1).bit_length()


class BufferPool:
    """Buffers by size class, shared by every connection of the process (thread-safe)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._classes: dict[int, list[np.ndarray]] = {}
        self._bytes = 0

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def take(self, size: int) -> memoryview:
        """A writable buffer of exactly ``size`` bytes; its contents are undefined."""
        cls = size_class(size)
        if cls > LARGEST_POOLED:
            return np.empty(size, np.uint8).data
        with self._lock:
            arrays = self._classes.setdefault(cls, [])
            index = _first_free(arrays, _FREE_REFS)
            if index >= 0:
                array = arrays[index]
            else:
                array = np.empty(cls, np.uint8)
                if self._make_room(cls):
                    arrays.append(array)
                    self._bytes += cls
            return array[:size].data

    def _make_room(self, cls: int) -> bool:
        """True when ``cls`` more bytes fit, after dropping free buffers of other classes."""
        for other, arrays in self._classes.items():
            while self._bytes + cls > self.max_bytes and other != cls:
                index = _first_free(arrays, _FREE_REFS)
                if index < 0:
                    break
                del arrays[index]
                self._bytes -= other
        return self._bytes + cls <= self.max_bytes


    def forget(self) -> None:
        """Start empty with a new lock (a forked child: another thread may have held the
        lock at the fork, and would never release the child's copy)."""
        self._lock = threading.Lock()
        self._classes = {}
        self._bytes = 0


#: The pool FrameDecoder reads large frames into.
FRAME_BUFFERS = BufferPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=FRAME_BUFFERS.forget)
