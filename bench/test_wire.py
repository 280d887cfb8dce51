"""Wire codec throughput: encode + frame + decode a float32 tensor, against numpy's own copy.

One round trip is what a request costs the two ends together: ``encode_tensor`` + ``pack``
(client), ``FrameDecoder.feed`` + ``decode_tensor`` (server).  The reference is the least
any byte protocol must do: ``tobytes`` (one copy out) and ``frombuffer`` (a view back in).
Reported as MB/s (1 MB = 1e6 bytes of tensor data) and as a ratio to that reference.
"""
from __future__ import annotations

import timeit

import numpy as np
import pytest

from trtserve_client.frames import FrameDecoder, pack
from trtserve_client.wire import DEFAULT_MAX_FRAME, decode_tensor, encode_tensor

pytestmark = pytest.mark.timeout(120)

SIZES = {"1KB": 1024, "150KB": 150 * 1024, "4MB": 4 * 1024 * 1024}


def round_trip(array: np.ndarray) -> np.ndarray:
    frame = pack({"v": 2, "id": 1, "op": "infer", "model": "m", "inputs": {"x": encode_tensor(array)}})
    (message,) = FrameDecoder(DEFAULT_MAX_FRAME).feed(frame)
    return decode_tensor(message["inputs"]["x"])


def numpy_floor(array: np.ndarray) -> np.ndarray:
    return np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)


def seconds_per_call(fn, arg, budget_s: float = 0.5) -> float:
    """Best-of-5 mean time per call, each repeat running about budget_s / 5."""
    timer = timeit.Timer(lambda: fn(arg))
    number, elapsed = timer.autorange()
    number = max(1, int(number * budget_s / 5 / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=5, number=number)) / number


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_wire_codec(benchmark, target, size):
    nbytes = SIZES[size]
    array = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    assert np.array_equal(round_trip(array), array)
    benchmark(round_trip, array)
    codec_s = benchmark.stats.stats.median
    floor_s = seconds_per_call(numpy_floor, array)
    codec_mb_s, floor_mb_s = nbytes / codec_s / 1e6, nbytes / floor_s / 1e6
    benchmark.extra_info.update(
        bytes=nbytes,
        codec_us=round(codec_s * 1e6, 3),
        codec_mb_s=round(codec_mb_s, 1),
        numpy_us=round(floor_s * 1e6, 3),
        numpy_mb_s=round(floor_mb_s, 1),
        ratio_to_numpy=round(codec_mb_s / floor_mb_s, 4),
    )
