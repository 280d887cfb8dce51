"""``--shared-memory system|cuda``: the load's input tensors live in one region that the
server maps, and every request carries references to them instead of their bytes.

The inputs are written into the region once, before the load starts (each prepared request
points at its own bytes); the server only reads them, so any number of requests in flight
may share them.  Outputs still come back in the answers.  A CUDA region holds tensors
only: raw-bytes inputs (--input-data) stay in the request.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from trtserve_client.regions import Region, SystemSharedMemory

KINDS = ("system", "cuda")
REGION = "trtserve-bench-inputs"
_ALIGN = 256  # each tensor starts where cudaMalloc's allocations would


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _shared(value: Any, kind: str) -> bool:
    return isinstance(value, np.ndarray) or (kind == "system" and isinstance(value, (bytes, bytearray)))


def region_bytes(values: list[dict[str, Any]], kind: str) -> int:
    """Room for every value that goes into the region (at least one byte)."""
    sizes = [_aligned(len(v) if isinstance(v, (bytes, bytearray)) else v.nbytes)
             for inputs in values for v in inputs.values() if _shared(v, kind)]
    return max(1, sum(sizes))


def new_region(kind: str, byte_size: int) -> Region:
    """A region of this process, not yet registered anywhere."""
    if kind == "cuda":
        from trtserve_client.cuda_regions import CudaSharedMemory  # needs cuda-python

        return CudaSharedMemory(REGION, byte_size)
    return SystemSharedMemory(REGION, byte_size)


def place(region: Region, values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write the values into ``region``; each request's inputs with references in their place."""
    offset, placed = 0, []
    for inputs in values:
        request = {}
        for name, value in inputs.items():
            if _shared(value, region.kind):
                request[name] = region.write(value, offset)  # type: ignore[attr-defined]
                offset += _aligned(len(value) if isinstance(value, (bytes, bytearray)) else value.nbytes)
            else:
                request[name] = value
        placed.append(request)
    return placed
