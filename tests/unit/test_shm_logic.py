"""Shared-memory pieces that need no server: the CUDA IPC handle's bytes, references on the
client side, a referenced input as the server hands it to a model (a read-only view of the
mapping, never a copy), and that a CPU-only server path never imports cuda-python."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from trtserve_client.errors import InvalidArgumentError
from trtserve_client.regions import SystemSharedMemory, decode_outputs
from trtserve_client.wire import decode_value, encode_value

pytestmark = pytest.mark.timeout(60)


def test_an_ipc_handle_survives_the_trip_through_cuda_bindings():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed (pip install -e '.[gpu]')")
    from trtserve.cuda.ipc import HANDLE_BYTES, IpcMemory, handle_bytes, handle_struct

    raw = bytes(range(7, 7 + HANDLE_BYTES))
    assert handle_bytes(handle_struct(raw)) == raw
    with pytest.raises(ValueError):
        IpcMemory.open(b"\x00" * 10, 0)


def test_region_references_are_checked_before_sending_and_pass_through_the_encoder():
    region = SystemSharedMemory("r", 64)
    try:
        ref = region.write(np.arange(4, dtype=np.int32), offset=8)
        assert ref == {"dtype": "int32", "shape": [4], "shm": {"region": "r", "offset": 8, "byte_size": 16}}
        assert encode_value(ref) is ref  # a reference travels as it is
        assert region.slot(32) == {"region": "r", "offset": 32, "byte_size": 32}
        for bad in (lambda: region.tensor((17,), np.float32), lambda: region.slot(60, 8), lambda: region.raw(1, -1)):
            with pytest.raises(InvalidArgumentError):
                bad()
        answer = {"o": dict(ref), "inline": {"dtype": "int32", "shape": [1], "data": b"\x05\x00\x00\x00"}}
        outputs = decode_outputs(answer, {"r": region}, decode_value)
        np.testing.assert_array_equal(outputs["o"], np.arange(4))
        assert np.shares_memory(outputs["o"], region.ndarray((64,), np.uint8))
        np.testing.assert_array_equal(outputs["inline"], [5])
    finally:
        region.close()


def test_a_referenced_input_is_a_read_only_view_of_the_mapping_not_a_copy():
    from trtserve.server.shm import RegionTable, ShmLimits, SystemRegion
    from trtserve.server.shm_io import ShmRequest

    client = SystemSharedMemory("c", 4096)
    try:
        table = RegionTable(ShmLimits())
        table.add(SystemRegion("r", client.key, 0, 4096))
        ref = client.write(np.arange(6, dtype=np.float32).reshape(2, 3), offset=256)
        use = ShmRequest(table)
        values = [use.input({**ref, "shm": {**ref["shm"], "region": "r"}}, "inputs['x']") for _ in range(2)]
        assert [r.in_use for r in table.regions.values()] == [1]  # one lease per request, not per reference
        for value in values:
            assert type(value) is np.ndarray and value.shape == (2, 3) and value.dtype == np.float32
            assert not value.flags.writeable and value.flags.c_contiguous
        client.ndarray((2, 3), np.float32, offset=256)[1, 2] = 42.0  # the client writes after the view was made
        assert values[0][1, 2] == 42.0 and values[1][1, 2] == 42.0  # the server's view sees it: no copy
        with pytest.raises(ValueError):
            values[0][0, 0] = 1.0
        use.release()
        assert [r.in_use for r in table.regions.values()] == [0]
        table.close()
    finally:
        client.close()


def test_the_server_path_does_not_import_cuda_python():
    code = ("import sys, trtserve.server.app, trtserve.server.shm_io, trtserve.server.shm_ops; "
            "print([m for m in sys.modules if m.startswith('cuda')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
