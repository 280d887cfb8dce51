"""ResNet-18 through SyncTensor[TorchScriptTensor] against the raw model (run_all.py step 4).

The node: instance_num 2, max 8, batching_timeout 1 ms, each request one [1,3,224,224]
float32 tensor; once launched op by op (``eager``), once replayed from CUDA graphs
(``cuda_graph = true``, one graph per batch size and instance), each with and without
SyncTensor's ``overlap`` (the instance prepares its next batch while the GPU runs this one).

The references, measured in the same run on the same GPU:

* raw eager batch 8: the traced model called from one Python thread on its own stream,
  input already on the GPU (the issue's reference); measured before and after the pipes,
  the better of the two is used, so ratios are conservative;
* raw graph batch 8: the same batch replayed from one CUDA graph: the GPU's own ceiling;
* raw host I/O: one thread stacks 8 numpy requests, uploads them, runs the model and
  brings the result back, batch after batch: the same work as the pipe, without it.

The load: Python threads (one request in flight each), one event-loop thread
(loop_load.py's PipeDriver, as the server drives a pipe), and ``trtserve serve`` over TCP
driven from this process and from several client processes.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "clients")]

import trtserve  # noqa: E402
from trtserve import cuda  # noqa: E402

import loop_load  # noqa: E402
from closed_loop import closed_loop  # noqa: E402

# TorchScriptTensor's cuda_graph key, SyncTensor's overlap key (docs/configuration.md)
MODES = {"eager": {}, "cuda_graph": {"cuda_graph": True}, "overlap": {"overlap": True},
         "cuda_graph+overlap": {"cuda_graph": True, "overlap": True}}
SERVER_MODES = ("eager", "cuda_graph+overlap")
# A shorter run: RESNET_MODES=eager,cuda_graph+overlap and RESNET_SERVER=0 (no TCP rows).
if os.environ.get("RESNET_MODES"):
    MODES = {name: MODES[name] for name in os.environ["RESNET_MODES"].split(",")}
if os.environ.get("RESNET_SERVER") == "0":
    SERVER_MODES = ()
NODE = {"backend": "SyncTensor[TorchScriptTensor]", "instance_num": 2, "max": 8, "batching_timeout": 1}


# --------------------------------------------------------------------------- the raw model


def _event_ms(torch: Any, stream: Any, body: Callable[[], None], inner: int = 50, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(inner):
            body()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def _rate(batch: int, ms: float) -> dict[str, float]:
    return {"ms_per_batch": ms, "images_per_s": batch * 1e3 / ms}


def raw_eager(torch: Any, net: Any, stream: Any, batch: int) -> dict[str, float]:
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(20):
            net(x)
        stream.synchronize()
        return _rate(batch, _event_ms(torch, stream, lambda: net(x)))


def raw_graph(torch: Any, net: Any, stream: Any, batch: int) -> dict[str, float]:
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):
            net(x)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            net(x)
        return _rate(batch, _event_ms(torch, stream, graph.replay))


def raw_host_io(torch: Any, net: Any, stream: Any, inputs: list[np.ndarray], batch: int, seconds: float) -> dict[str, float]:
    with torch.inference_mode(), torch.cuda.stream(stream):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            rows = [inputs[(n * batch + i) % len(inputs)] for i in range(batch)]
            net(torch.from_numpy(np.concatenate(rows)).to("cuda")).cpu().numpy()
            n += 1
        elapsed = time.perf_counter() - start
    return {"ms_per_batch": elapsed / n * 1e3, "images_per_s": n * batch / elapsed}


# --------------------------------------------------------------------------- the pipe


def _capture_every_size(pipe: Any, inputs: list[np.ndarray]) -> None:
    """Two threads of list calls of 1..8 requests, four rounds: each instance sees (and, with
    cuda_graph, captures) most batch sizes before anything is measured."""
    def sizes(i: int) -> None:
        for _ in range(4):
            for n in range(1, 9):
                pipe([{"data": inputs[(i + k) % len(inputs)]} for k in range(n)])

    threads = [threading.Thread(target=sizes, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def pipe_rows(config: dict[str, Any], inputs: list[np.ndarray], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with trtserve.pipe(config) as pipe:
        _capture_every_size(pipe, inputs)
        closed_loop(lambda i: pipe({"data": inputs[i % 16]}), 16, 1.0)  # cuDNN settles, clocks up
        node = pipe.pipeline.nodes[0]
        threads = []
        for concurrency in (1, 8, 16, 32, 64):
            before = node.stats.snapshot()["batches"]
            row = closed_loop(lambda i: pipe({"data": inputs[i % 16]}), concurrency, seconds)
            row.update(concurrency=concurrency, mean_batch=row["count"] / max(node.stats.snapshot()["batches"] - before, 1))
            threads.append(row)
        out["threads_numpy"] = threads
        out["loop_numpy"] = loop_load.loop_rows(pipe, inputs, [32, 64], seconds, inputs="numpy")
        with cuda.Stream() as up:  # inputs already on the GPU: no H2D in the serving path
            dev_inputs = [cuda.to_device(x, up) for x in inputs]
            up.synchronize()
            out["threads_device"] = [dict(closed_loop(lambda i: pipe({"data": dev_inputs[i % 16]}), c, seconds), concurrency=c)
                                     for c in (64,)]
            out["loop_device"] = loop_load.loop_rows(pipe, dev_inputs, [64], seconds, inputs="DeviceArray")
        runners = [getattr(instance.backend.children[0], "graphs", None) for instance in node._instances]
        out["graphs_captured_per_instance"] = [None if r is None else r.captured for r in runners]
    return out


def server_rows(workdir: Path, mode: str, config: dict[str, Any], model_path: Path, inputs: list[np.ndarray],
                seconds: float) -> dict[str, Any]:
    repository = loop_load.write_repository(workdir / f"repository-{mode}", model_path, config)
    return {"in_process_client": loop_load.server_rows(repository, inputs, [64], seconds),
            "four_client_processes": loop_load.process_rows(repository, 4, 16, seconds)}


def jpeg_rows(seconds: float, model_path: Path, support: Any, workdir: Path) -> dict[str, Any]:
    """The deployment this is for: JPEG bytes in (640x480, ~50 KB), GPU decode + fused
    resize/normalise (4 instances), ResNet-18 with cuda_graph and overlap; in-process and
    through ``trtserve serve`` with four client processes sending the files."""
    jpegs = [support.jpeg(support.photo(480, 640, seed=200 + i)) for i in range(16)]
    pre = {"backend": "SyncTensor[S[DecodeTensor,FusedPreprocessTensor]]", "instance_num": 4, "resize_h": 224,
           "resize_w": 224, "color": "rgb", "mean": list(support.MEAN), "std": list(support.STD), "overlap": True,
           "next": "model"}
    model = dict(NODE, model=str(model_path), cuda_graph=True, overlap=True)
    out: dict[str, Any] = {"jpeg_mean_bytes": sum(map(len, jpegs)) / len(jpegs), "pre": pre, "model": model}
    with trtserve.pipe({"pre": pre, "model": model}) as pipe:
        _capture_every_size(pipe, jpegs)
        out["pipe_threads"] = [dict(closed_loop(lambda i: pipe({"data": jpegs[i % 16]}), 64, seconds), concurrency=64)]
        out["pipe_loop"] = loop_load.loop_rows(pipe, jpegs, [64], seconds, inputs="JPEG")
    folder = workdir / "repository-jpeg"
    model_dir = folder / loop_load.MODEL
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, model_dir / "1" / "model.pt")
    (model_dir / "config.toml").write_text(f"[pre]\n{loop_load.toml_table(pre)}\n\n[model]\n{loop_load.toml_table(model)}\n\n"
                                           '[[input]]\nname = "image"\ndtype = "bytes"\nshape = [-1]\n')
    images = workdir / "jpegs"
    images.mkdir(exist_ok=True)
    for index, data in enumerate(jpegs):
        (images / f"{index:02d}.jpg").write_bytes(data)
    out["server_four_processes"] = loop_load.process_rows(folder, 4, 16, seconds, ("--input-data", str(images)))
    return out


# --------------------------------------------------------------------------- the whole step


def bench_jpeg(seconds: float, models: dict[str, Any], support: Any) -> dict[str, Any]:
    path = Path(models["paths"]["chw"])
    return jpeg_rows(seconds, path, support, path.parent)


def bench(seconds: float, models: dict[str, Any]) -> dict[str, Any]:
    import torch

    path = Path(models["paths"]["chw"])
    workdir = path.parent
    out: dict[str, Any] = {"model": models["source"], "precision": "float32 (cuDNN TF32 default)", "node": dict(NODE)}
    net = torch.jit.load(str(path), map_location="cuda").eval()
    stream = torch.cuda.Stream()
    warm = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.inference_mode(), torch.cuda.stream(stream):
        t_end = time.perf_counter() + 3.0  # bring the clocks up and let cuDNN settle first
        while time.perf_counter() < t_end:
            net(warm)
            stream.synchronize()
    out["raw_batch1"] = raw_eager(torch, net, stream, 1)
    out["raw_batch8"] = raw_eager(torch, net, stream, 8)
    out["raw_batch8_cuda_graph"] = raw_graph(torch, net, stream, 8)
    with trtserve.pipe({"backend": "Identity"}) as pipe:  # the in-process serving ceiling
        small = np.zeros((1, 4), np.float32)
        out["identity_pipe_64_threads_per_s"] = closed_loop(lambda i: pipe({"data": small}), 64, seconds)["per_s"]
    inputs = [np.random.default_rng(i).standard_normal((1, 3, 224, 224)).astype(np.float32) for i in range(16)]
    out["pipes"], out["servers"] = {}, {}
    for mode, extra in MODES.items():
        config = dict(NODE, model=str(path), **extra)
        out["pipes"][mode] = pipe_rows(config, inputs, seconds)
        if mode not in SERVER_MODES:
            continue
        try:
            out["servers"][mode] = server_rows(workdir, mode, config, path, inputs, seconds)
        except Exception as exc:
            out["servers"][mode] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        if SERVER_MODES:
            out["echo_floor_four_client_processes"] = loop_load.process_rows(None, 4, 16, seconds)
    except Exception as exc:
        out["echo_floor_four_client_processes"] = {"error": f"{type(exc).__name__}: {exc}"}
    out["raw_batch8_after"] = raw_eager(torch, net, stream, 8)
    out["raw_batch8_host_io"] = raw_host_io(torch, net, stream, inputs, 8, seconds)
    _add_ratios(out)
    return out


def _rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for pipes in out["pipes"].values():
        for key in ("threads_numpy", "loop_numpy", "threads_device", "loop_device"):
            rows += pipes.get(key, [])
    for servers in out["servers"].values():
        rows += servers.get("in_process_client", [])
        if "per_s" in servers.get("four_client_processes", {}):
            rows.append(servers["four_client_processes"])
    return rows


def _add_ratios(out: dict[str, Any]) -> None:
    eager = max(out["raw_batch8"]["images_per_s"], out["raw_batch8_after"]["images_per_s"])
    out["raw_batch8_reference_images_per_s"] = eager
    for row in _rows(out):
        row["ratio_to_raw_b8"] = row["per_s"] / eager
        row["ratio_to_raw_b8_graph"] = row["per_s"] / out["raw_batch8_cuda_graph"]["images_per_s"]
        row["ratio_to_raw_b8_host_io"] = row["per_s"] / out["raw_batch8_host_io"]["images_per_s"]


# --------------------------------------------------------------------------- report


def markdown(r: dict[str, Any]) -> list[str]:
    if "pipes" not in r:
        return []
    lines = ["", f"## ResNet-18 ({r['model']}, {r['precision']})", "",
             f"Raw traced model on its own stream, input on the GPU: eager batch 1 {r['raw_batch1']['images_per_s']:.0f} img/s; "
             f"eager batch 8 {r['raw_batch8']['images_per_s']:.0f} img/s before and {r['raw_batch8_after']['images_per_s']:.0f} after "
             f"the pipes (reference: {r['raw_batch8_reference_images_per_s']:.0f}); batch 8 from one CUDA graph "
             f"{r['raw_batch8_cuda_graph']['images_per_s']:.0f} img/s; eager with host I/O (stack 8 numpy requests, upload, "
             f"model, download) {r['raw_batch8_host_io']['images_per_s']:.0f} img/s.", "",
             f"Node: {r['node']}; each request one [1,3,224,224] float32 tensor.  Identity through trtserve.pipe with 64 "
             f"threads: {r['identity_pipe_64_threads_per_s']:.0f} req/s.", "",
             "| mode | driver | inputs | concurrency | req/s | p50 ms | p99 ms | mean batch | of raw eager b8 | of raw graph b8 | of raw host I/O |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, pipes in r["pipes"].items():
        for key, driver, inputs in (("threads_numpy", "threads", "numpy"), ("loop_numpy", "event loop", "numpy"),
                                    ("threads_device", "threads", "DeviceArray"), ("loop_device", "event loop", "DeviceArray")):
            lines += [_line(mode, driver, inputs, row) for row in pipes.get(key, [])]
        lines.append(f"| {mode} | graphs captured per instance: {pipes.get('graphs_captured_per_instance')} | | | | | | | | | |")
    for mode, servers in r["servers"].items():
        if "error" in servers:
            lines.append(f"| {mode} | server: **failed** `{servers['error']}` | | | | | | | | | |")
            continue
        lines += [_line(mode, "server, in-process client", "numpy", row) for row in servers["in_process_client"]]
        lines.append(_line(mode, "server, 4 client processes", "numpy", servers["four_client_processes"]))
    echo = r.get("echo_floor_four_client_processes", {})
    if "per_s" in echo:
        lines += ["", f"Echo floor (bench/echo_server.py, no model), the same 4 client processes and 600 KB requests: "
                      f"{echo['per_s']:.0f} req/s, p50 {echo['p50_ms']:.2f} ms."]
    return lines


def _line(mode: str, driver: str, inputs: str, row: dict[str, Any]) -> str:
    batch = row.get("mean_batch")
    return (f"| {mode} | {driver} | {inputs} | {row['concurrency']} | {row['per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{'-' if batch is None else f'{batch:.2f}'} | {row.get('ratio_to_raw_b8', float('nan')):.2f} | "
            f"{row.get('ratio_to_raw_b8_graph', float('nan')):.2f} | {row.get('ratio_to_raw_b8_host_io', float('nan')):.2f} |")


def jpeg_markdown(r: dict[str, Any]) -> list[str]:
    if "pipe_loop" not in r:
        return []
    lines = ["", "## JPEG -> GPU decode + fused preprocessing -> ResNet-18 (cuda_graph, overlap)", "",
             f"640x480 JPEGs, {r['jpeg_mean_bytes'] / 1e3:.0f} KB on average; pre node {r['pre']['backend']} x{r['pre']['instance_num']}, "
             f"model node instance_num {r['model']['instance_num']}, max {r['model']['max']}.", "",
             "| driver | concurrency | images/s | p50 ms | p99 ms | mean batch |", "|---|---|---|---|---|---|"]
    rows = [("pipe, threads", x) for x in r["pipe_threads"]] + [("pipe, event loop", x) for x in r["pipe_loop"]]
    rows.append(("`trtserve serve`, 4 client processes", r["server_four_processes"]))
    for driver, row in rows:
        batch = row.get("mean_batch")
        lines.append(f"| {driver} | {row['concurrency']} | {row['per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                     f"{'-' if batch is None else f'{batch:.2f}'} |")
    return lines
