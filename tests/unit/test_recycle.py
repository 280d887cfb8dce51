"""Recycled receive buffers: reused only when nothing references them, bounded, thread-safe."""
from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest
from trtserve_client.frames import FrameDecoder, OutOfBand, pack
from trtserve_client.recycle import FRAME_BUFFERS, LARGEST_POOLED, BufferPool, size_class


def address(buffer: memoryview) -> int:
    return np.frombuffer(buffer, np.uint8).ctypes.data


def test_a_dropped_buffer_is_reused_for_its_size_class():
    pool = BufferPool()
    first = pool.take(120_000)
    where = address(first)
    del first
    again = pool.take(100_000)  # same class (128 KiB)
    assert address(again) == where and len(again) == 100_000


def holder(keep: str, buffer: memoryview) -> object:
    """Something a caller might keep of a frame's buffer."""
    if keep == "memoryview":
        return buffer
    if keep == "slice":
        return buffer[4:]
    if keep == "tensor":
        return np.frombuffer(buffer, np.uint8)
    return np.frombuffer(buffer[:400], np.float32).reshape(10, 10)[2:]


@pytest.mark.parametrize("keep", ["memoryview", "slice", "tensor", "tensor_view"])
def test_a_buffer_still_referenced_is_not_reused(keep):
    pool = BufferPool()
    buffer = pool.take(600_000)
    buffer[:8] = b"ABCDEFGH"
    held = holder(keep, buffer)
    where = address(buffer)
    del buffer
    gc.collect()
    for _ in range(3):
        other = pool.take(600_000)
        assert address(other) != where
        other[:8] = b"XXXXXXXX"
    del held
    assert address(pool.take(600_000)) == where


def test_every_buffer_of_a_class_is_scanned_not_only_the_first():
    pool = BufferPool()
    buffers = [pool.take(70_000) for _ in range(4)]
    third = address(buffers[2])
    del buffers[2]
    assert address(pool.take(70_000)) == third


def test_the_pool_holds_at_most_max_bytes_and_gives_free_classes_up_for_new_ones():
    pool = BufferPool(max_bytes=4 * 1024 * 1024)
    small = [pool.take(200_000) for _ in range(8)]  # 8 x 256 KiB: 2 MiB pooled
    assert pool.held_bytes == 2 * 1024 * 1024
    large = [pool.take(900_000) for _ in range(3)]  # 1 MiB each: the third does not fit
    assert pool.held_bytes == 4 * 1024 * 1024
    del small
    more = [pool.take(900_000) for _ in range(3)]  # room made by dropping the free 256 KiB ones
    assert pool.held_bytes <= pool.max_bytes
    assert len({address(b) for b in large + more}) == 6
    del large, more


def test_frames_above_the_largest_pooled_size_get_their_own_buffer():
    pool = BufferPool()
    big = pool.take(LARGEST_POOLED + 1)
    assert len(big) == LARGEST_POOLED + 1 and pool.held_bytes == 0


def test_size_classes_are_powers_of_two_at_or_above_the_size():
    assert [size_class(n) for n in (1, 2, 3, 65_536, 65_537, 600_000)] == [2, 2, 4, 65_536, 131_072, 1_048_576]


def test_threads_taking_at_once_never_share_a_buffer():
    pool = BufferPool(max_bytes=8 * 1024 * 1024)
    failures: list[str] = []

    def worker(tag: int) -> None:
        for round_ in range(200):
            buffer = pool.take(100_000 + round_)
            view = np.frombuffer(buffer, np.uint8)
            view[:] = tag
            if not (view == tag).all():  # another thread wrote into a buffer this one holds
                failures.append(f"thread {tag} round {round_}")

    threads = [threading.Thread(target=worker, args=(tag,)) for tag in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_decoded_tensor_keeps_its_bytes_while_later_frames_arrive():
    """The receive path's guarantee: a tensor handed out stays intact while the connection
    reads more large frames, and its buffer is reused only after it is dropped."""
    decoder = FrameDecoder(1 << 26)
    first = np.arange(150_000, dtype=np.float32)
    [message] = decoder.feed(pack({"id": 1, "data": OutOfBand(first.data)}))
    kept = np.frombuffer(message.pop("data"), np.float32)
    del message
    for index in range(4):
        [later] = decoder.feed(pack({"id": 2 + index, "data": OutOfBand(np.full(150_000, -1.0, np.float32).data)}))
        assert np.frombuffer(later["data"], np.float32)[0] == -1.0
    np.testing.assert_array_equal(kept, first)
    where = kept.ctypes.data
    del kept, later
    [last] = decoder.feed(pack({"id": 9, "data": OutOfBand(first.data)}))
    assert np.frombuffer(last["data"], np.float32).ctypes.data == where  # the first frame's buffer, reused


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_the_lock_is_held_can_still_take_buffers():
    with FRAME_BUFFERS._lock:  # as if another thread were inside take() at the fork
        pid = os.fork()
        if pid == 0:  # the child: take() must not wait for a lock nobody will release
            try:
                FRAME_BUFFERS.take(100_000)
            finally:
                os._exit(0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on the pool's lock")
