"""trtserve.cuda on a real GPU: streams, events, buffers, DeviceArray interop, NVRTC."""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from trtserve import cuda

from . import support

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]


def test_device_info_and_context():
    info = cuda.device_info(0)
    assert info.compute_capability >= (7, 0) and info.multiprocessors > 0 and info.name
    assert cuda.ensure_device() == 0


def test_streams_are_non_blocking_distinct_and_close_idempotently():
    from cuda.bindings import runtime

    with cuda.Stream() as a, cuda.Stream() as b:
        assert a.handle != b.handle
        assert cuda.check(runtime.cudaStreamGetFlags(a.raw)) == runtime.cudaStreamNonBlocking
        assert a.query() is True
    assert a.closed and b.closed
    a.close()  # idempotent
    blocking = cuda.Stream(non_blocking=False)
    assert cuda.check(runtime.cudaStreamGetFlags(blocking.raw)) == runtime.cudaStreamDefault
    blocking.close()


def test_event_timing_query_and_wait(stream):
    start, end = cuda.Event(timing=True), cuda.Event(timing=True)
    start.record(stream)
    support.kernel("spin").launch(1, 1, [support.spin_cycles(20)], stream)
    end.record(stream)
    assert end.query() is False  # still spinning: the event wait below must block
    end.synchronize()
    assert end.query() is True and stream.query() is True
    elapsed = start.elapsed_ms(end)
    assert 5.0 < elapsed < 2000.0
    untimed = cuda.Event()
    untimed.record(stream)
    with pytest.raises(ValueError, match="timing=True"):
        start.elapsed_ms(untimed)
    for e in (start, end, untimed):
        e.close()
        e.close()


def test_stream_wait_event_orders_two_streams():
    with cuda.Stream() as a, cuda.Stream() as b, cuda.PinnedBuffer(4) as flag:
        view = flag.as_numpy(np.float32)
        view[0] = 0.0
        done_a = cuda.Event()
        support.kernel("write_after_spin").launch(1, 1, [support.spin_cycles(20), ctypes.c_void_p(flag.ptr), ctypes.c_float(1.0)], a)
        done_a.record(a)
        b.wait_event(done_a)
        support.kernel("write_after_spin").launch(1, 1, [ctypes.c_int64(0), ctypes.c_void_p(flag.ptr), ctypes.c_float(2.0)], b)
        b.synchronize()
        assert view[0] == 2.0  # b's write ran after a's, never before
        done_a.close()


def test_current_stream_is_thread_local():
    with cuda.Stream() as s:
        seen = []
        with cuda.use_stream(s):
            assert cuda.current_stream() is s
            t = threading.Thread(target=lambda: seen.append(cuda.current_stream()))
            t.start()
            t.join()
            with cuda.use_stream(None):
                assert cuda.current_stream() is None
            assert cuda.current_stream() is s
        assert seen == [None] and cuda.current_stream() is None


@pytest.mark.parametrize("nbytes", [1, 4096 + 3, 64 << 20])
def test_pinned_and_device_roundtrip(nbytes, stream):
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    with cuda.PinnedBuffer(nbytes) as pinned, cuda.DeviceBuffer(nbytes, stream=stream) as dev:
        pinned.as_numpy()[:] = data
        cuda.copy_async(dev.ptr, pinned.ptr, nbytes, "htod", stream)
        pinned.as_numpy()[:] = 0
        out = cuda.to_host(cuda.DeviceArray(dev.ptr, (nbytes,), np.uint8, stream, owner=dev))
        np.testing.assert_array_equal(out, data)


def test_staged_and_pageable_uploads(stream):
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 5), (1, 3, 224, 224), (1000,))]
    staging = cuda.HostStaging()
    try:
        for _ in range(3):  # the staging buffer is reused (and grows) across calls
            for a, d in zip(arrays, staging.upload(arrays)):
                assert d.shape == a.shape and d.dtype == a.dtype and d.stream is stream
                np.testing.assert_array_equal(d.to_host(), a)
    finally:
        staging.close()
    np.testing.assert_array_equal(cuda.to_device(arrays[1]).to_host(), arrays[1])


def test_device_array_is_read_without_copy_by_torch_and_cupy(stream):
    torch = pytest.importorskip("torch")
    host = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    dev = cuda.to_device(host)
    t = torch.as_tensor(dev, device="cuda")
    assert t.data_ptr() == dev.ptr and tuple(t.shape) == (2, 3, 4) and t.dtype == torch.float32
    stream.synchronize()
    t.mul_(2)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(dev.to_host(), host * 2)  # same memory
    cupy = pytest.importorskip("cupy")
    c = cupy.asarray(dev)
    assert c.data.ptr == dev.ptr and c.shape == (2, 3, 4)
    rows = dev.rows(1, 2)
    assert torch.as_tensor(rows, device="cuda").data_ptr() == dev.ptr + 12 * 4


def test_freeing_on_another_thread_and_pool_reuse(stream):
    arrays = [cuda.DeviceArray.empty((1 << 20,), np.uint8, stream) for _ in range(8)]
    stream.synchronize()  # the contract SyncTensor keeps: arrays leave their thread complete
    t = threading.Thread(target=arrays.clear)  # last references dropped off the instance thread
    t.start()
    t.join()
    for _ in range(100):  # stream-ordered allocations are cheap and reuse the pool
        cuda.DeviceArray.empty((1 << 20,), np.uint8, stream)
    stream.synchronize()


def test_nvrtc_compile_cache_launch_and_errors(stream):
    saxpy = support.kernel("saxpy")
    assert support.kernel("saxpy") is saxpy  # cached per process and device
    n = 10_000
    x, y = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32)
    dx, dy = cuda.to_device(x), cuda.to_device(y)
    saxpy.launch((n + 255) // 256, 256, [ctypes.c_float(2.0), dx, dy, ctypes.c_int32(n)])
    np.testing.assert_allclose(dy.to_host(), 2.0 * x + y, rtol=1e-6)
    with pytest.raises(cuda.CudaError) as info:
        cuda.compile_kernel('extern "C" __global__ void broken() { undefined_thing; }', "broken")
    assert info.value.details["api"] == "nvrtc" and "undefined_thing" in info.value.details["log"]
    assert not info.value.sticky
    with pytest.raises(cuda.CudaError) as bad_launch:  # 4096 threads per block: refused at enqueue
        saxpy.launch(1, 4096, [ctypes.c_float(1.0), dx, dy, ctypes.c_int32(n)])
    assert not bad_launch.value.sticky and not cuda.is_poisoned()
