"""run_all.py step ``shm``: ResNet-18 through ``trtserve serve`` with the inputs in shared
memory, against in-process ``pipe()`` with the same inputs, in one run.

The node is the server step's (resnet.py: SyncTensor[TorchScriptTensor] x2, max 8,
cuda_graph, overlap); each request one [1,3,224,224] float32 tensor (600 KB).  Rows:

* in-process: the pipe driven from one event loop (PipeDriver), 64 in flight, with numpy
  inputs and with DeviceArray inputs already on the GPU;
* through the server, 4 trtserve-bench processes x 16 in flight (loop_load.process_rows):
  inputs in every request (TCP), in system shared memory (``--shared-memory system``), and
  in each client's device memory shared through CUDA IPC (``--shared-memory cuda``).

Targets: system shm / pipe(numpy) >= 0.85, CUDA IPC / pipe(DeviceArray) >= 0.85,
p99/p50 <= 3 in these rows.
"""
from __future__ import annotations

from typing import Any

import loop_load
import trtserve
from closed_loop import closed_loop
from resnet import rows_and_targets, server_node
from trtserve import cuda

ROWS = [("pipe_numpy", "ResNet-18, in-process pipe(), event loop, c=64, numpy inputs"),
        ("pipe_device", "ResNet-18, in-process pipe(), event loop, c=64, DeviceArray inputs"),
        ("server_tcp", "through trtserve serve, inputs in the request (TCP)"),
        ("server_system", "through trtserve serve, inputs in system shared memory"),
        ("server_cuda", "through trtserve serve, inputs in device memory (CUDA IPC)")]
SERVER_ROWS = ("server_tcp", "server_system", "server_cuda")


def bench_shm(seconds: float, models: dict[str, Any]) -> dict[str, Any]:
    path, config, inputs = server_node(models)
    out: dict[str, Any] = {"node": config}
    with trtserve.pipe(dict(config, warmup=[loop_load.TENSOR_WARMUP_DICT])) as pipe:
        closed_loop(lambda i: pipe({"data": inputs[i % 16]}), 16, 1.0)  # clocks up
        out["pipe_numpy"] = loop_load.loop_rows(pipe, inputs, [64], seconds, inputs="numpy")[0]
        with cuda.Stream() as up:
            on_device = [cuda.to_device(x, up) for x in inputs]
            up.synchronize()
            out["pipe_device"] = loop_load.loop_rows(pipe, on_device, [64], seconds, inputs="DeviceArray")[0]
    repository = loop_load.write_repository(path.parent / "repository-shm", path, config)
    for key, extra in (("server_tcp", ()), ("server_system", ("--shared-memory", "system")),
                       ("server_cuda", ("--shared-memory", "cuda"))):
        out[key] = loop_load.process_rows(repository, 4, 16, seconds, loop_load.TENSOR_INPUT + extra)
    out["targets"] = targets(out)
    return out


def targets(out: dict[str, Any]) -> list[tuple[str, float, str, float]]:
    return [
        ("ResNet-18 through the server, inputs in system shm / in-process pipe() (numpy)",
         out["server_system"]["per_s"] / out["pipe_numpy"]["per_s"], ">=", 0.85),
        ("ResNet-18 through the server, CUDA IPC inputs / in-process pipe() (DeviceArray)",
         out["server_cuda"]["per_s"] / out["pipe_device"]["per_s"], ">=", 0.85),
        ("worst p99 / p50 of the shared-memory rows", max(out[k]["p99_ms"] / out[k]["p50_ms"] for k in SERVER_ROWS[1:]),
         "<=", 3.0),
    ]


def markdown(r: dict[str, Any]) -> list[str]:
    if "server_cuda" not in r:
        return []
    lines = ["", "## Shared memory: ResNet-18 through the server vs in-process", "",
             f"Node {r['node']['backend']} x{r['node']['instance_num']}, max {r['node']['max']}, cuda_graph, overlap; "
             "600 KB requests. Server rows: 4 trtserve-bench processes x 16 in flight, one connection each.", "",
             "| row | req/s | p50 ms | p99 ms | p99/p50 | mean batch |", "|---|---|---|---|---|---|"]
    return lines + rows_and_targets(r, ROWS)
