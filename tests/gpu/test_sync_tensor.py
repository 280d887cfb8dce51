"""SyncTensor on a real GPU: one stream per instance, results complete on return, sticky errors."""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import trtserve
from trtserve import cuda
from trtserve.errors import DeviceError

from . import support

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]


class StreamProbe(trtserve.Backend):
    """Spins ~2 ms on the current stream, then writes item value into pinned host memory.

    If SyncTensor waited on anything but this instance's stream, the caller would read the
    slot before the kernel wrote it.
    """

    def init(self, context):
        super().init(context)
        self.kernel = support.kernel("write_after_spin")
        self.init_stream = cuda.current_stream().handle

    def forward(self, items):
        stream = cuda.current_stream()
        for item in items:
            slot, value = item["data"]["slot"], item["data"]["value"]
            self.kernel.launch(1, 1, [support.spin_cycles(2), ctypes.c_void_p(slot), ctypes.c_float(value)], stream)
            item["result"] = {"stream": stream.handle, "init_stream": self.init_stream, "thread": threading.get_ident()}


@pytest.mark.parametrize("overlap", [False, True])
def test_instances_own_distinct_streams_and_results_are_complete_on_return(overlap):
    """With overlap, forward returns before the kernel ran; the caller's call must still
    return only once the instance has waited for the stream."""
    trtserve.register("StreamProbe", StreamProbe)
    threads_n, calls = 16, 8
    with cuda.PinnedBuffer(4 * threads_n * calls) as pinned, trtserve.pipe(
        {"backend": "SyncTensor[StreamProbe]", "instance_num": 2, "overlap": overlap}
    ) as models:
        slots = pinned.as_numpy(np.float32)
        slots[:] = -1.0
        seen, bad = [], []

        def worker(t: int) -> None:
            for c in range(calls):
                index = t * calls + c
                item = {"data": {"slot": pinned.ptr + 4 * index, "value": float(index)}}
                models(item)
                if slots[index] != float(index):  # read at once: no sync of our own
                    bad.append((index, float(slots[index])))
                seen.append(item["result"])

        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not bad, f"results not complete when SyncTensor returned: {bad[:5]}"
    streams = {r["stream"] for r in seen}
    assert len(streams) == 2  # two instances, two streams
    assert all(r["stream"] == r["init_stream"] for r in seen)  # the stream X saw at init
    by_thread: dict[int, set] = {}
    for r in seen:
        by_thread.setdefault(r["thread"], set()).add(r["stream"])
    assert len(by_thread) == 2 and all(len(s) == 1 for s in by_thread.values())


def test_bad_device_id_is_a_typed_error():
    with pytest.raises(DeviceError, match="does not exist"):
        trtserve.pipe({"backend": "SyncTensor[Identity]", "device_id": 99})


STICKY_SCRIPT = textwrap.dedent(
    """
    import ctypes, json, sys
    sys.path[:0] = [{root!r}, {root!r} + "/clients"]
    import trtserve
    from trtserve import cuda
    from trtserve.errors import DeviceError

    SOURCE = 'extern "C" __global__ void illegal_write(float* p) {{ p[threadIdx.x] = 1.0f; }}'

    class IllegalWrite(trtserve.Backend):
        def forward(self, items):
            k = cuda.compile_kernel(SOURCE, "illegal_write")
            k.launch(1, 32, [ctypes.c_void_p(8)])  # address 8: never mapped
            if {via_torch!r}:
                import torch  # torch sees the fault first and raises its own exception type
                torch.cuda.synchronize()
            for item in items:
                item["result"] = 1

    trtserve.register("IllegalWrite", IllegalWrite)
    report = {{}}
    models = trtserve.pipe({{"backend": "SyncTensor[IllegalWrite]", "overlap": {overlap!r}}})
    try:
        models({{"data": 1}})
        report["first"] = "no error"
    except DeviceError as exc:
        report["first"] = [type(exc).__name__, exc.details.get("sticky"), exc.details.get("error")]
    report["poisoned"] = cuda.is_poisoned()
    try:
        models({{"data": 2}})
        report["second"] = "no error"
    except DeviceError as exc:
        report["second"] = [type(exc).__name__, exc.details.get("poisoned"), exc.message]
    print(json.dumps(report))
    sys.stdout.flush()
    import os
    os._exit(0)  # the context is dead: skip teardown that would only report the same error
    """
)


@pytest.mark.parametrize("overlap", [False, True], ids=["wait-in-forward", "overlap-waits-later"])
@pytest.mark.parametrize("via_torch", [False, True], ids=["cuda-python-wait", "torch-raises-first"])
def test_sticky_error_poisons_and_later_work_is_refused_in_a_subprocess(via_torch, overlap):
    if via_torch:
        pytest.importorskip("torch")
    script = STICKY_SCRIPT.format(root=str(ROOT), via_torch=via_torch, overlap=overlap)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["first"][0] == "CudaError" and report["first"][1] is True
    assert report["first"][2] in ("cudaErrorIllegalAddress", "CUDA_ERROR_ILLEGAL_ADDRESS")
    assert report["poisoned"] is True
    assert report["second"][0] == "CudaError" and report["second"][1] is True
    assert "Restart the server process" in report["second"][2]
