"""ResNet-18 through SyncTensor[TorchScriptTensor] against the raw model (run_all.py step
``resnet``), and through ``trtserve serve`` against in-process and the transport's floors
(step ``server``).

The node: instance_num 2, max 8, batching_timeout 1 ms, each request one [1,3,224,224]
float32 tensor; once launched op by op (``eager``), once replayed from CUDA graphs
(``cuda_graph = true``, one graph per batch size and instance), each with and without
SyncTensor's ``overlap`` (the instance prepares its next batch while the GPU runs this one).

The references, measured in the same run on the same GPU:

* raw eager batch 8: the traced model called from one Python thread on its own stream,
  input already on the GPU (the main reference); measured before and after the pipes,
  the better of the two is used, so ratios are conservative;
* raw graph batch 8: the same batch replayed from one CUDA graph: the GPU's own ceiling;
* raw host I/O: one thread stacks 8 numpy requests, uploads them, runs the model and
  brings the result back, batch after batch: the same work as the pipe, without it.

The load: Python threads (one request in flight each) and one event-loop thread
(loop_load.py's PipeDriver, as the server drives a pipe); the server step drives
``trtserve serve`` from four client processes (bench_server says what it compares).
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
# A shorter run: RESNET_MODES=eager,cuda_graph+overlap.
if os.environ.get("RESNET_MODES"):
    MODES = {name: MODES[name] for name in os.environ["RESNET_MODES"].split(",")}
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


# --------------------------------------------------------------------------- the server step

REQUEST_BYTES = 3 * 224 * 224 * 4  # one [1,3,224,224] float32 tensor
ONE_LOOP = ("--io-threads", "1")  # against the default I/O loops (one per 4 cores, at most 4)


def jpeg_nodes(model_path: Path, support: Any, pre_max: int) -> dict[str, Any]:
    """The JPEG chain: ``pre_max`` images per decode call (1: one nvImageCodec call per image)."""
    pre = {"backend": "SyncTensor[S[DecodeTensor,FusedPreprocessTensor]]", "instance_num": 4, "max": pre_max,
           "batching_timeout": 1, "resize_h": 224, "resize_w": 224, "color": "rgb", "mean": list(support.MEAN),
           "std": list(support.STD), "overlap": True, "next": "model"}
    return {"pre": pre, "model": dict(NODE, model=str(model_path), cuda_graph=True, overlap=True)}


def server_node(models: dict[str, Any]) -> tuple[Path, dict[str, Any], list[np.ndarray]]:
    """The server steps' model file, node (cuda_graph + overlap) and 16 600 KB requests."""
    path = Path(models["paths"]["chw"])
    inputs = [np.random.default_rng(i).standard_normal((1, 3, 224, 224)).astype(np.float32) for i in range(16)]
    return path, dict(NODE, model=str(path), cuda_graph=True, overlap=True), inputs


def bench_server(seconds: float, models: dict[str, Any], support: Any) -> dict[str, Any]:
    """Through ``trtserve serve`` against in-process ``pipe()`` and against the transport's
    floors, in one run: ResNet-18 (cuda_graph + overlap) with 600 KB tensors, the echo server
    and the bare-socket echo with the same requests and client processes, and the JPEG
    chain with one image per decode call and with batched decoding."""
    path, config, inputs = server_node(models)
    workdir = path.parent
    out: dict[str, Any] = {"node": config}
    with trtserve.pipe(dict(config, warmup=[loop_load.TENSOR_WARMUP_DICT])) as pipe:
        closed_loop(lambda i: pipe({"data": inputs[i % 16]}), 16, 1.0)  # clocks up
        out["resnet_pipe"] = loop_load.loop_rows(pipe, inputs, [64], seconds, inputs="numpy")[0]
    repository = loop_load.write_repository(workdir / "repository-server", path, config)
    out["resnet_server"] = loop_load.process_rows(repository, 4, 16, seconds)
    out["resnet_server_one_loop"] = loop_load.process_rows(repository, 4, 16, seconds, server_args=ONE_LOOP)
    out["echo"] = loop_load.process_rows(None, 4, 16, seconds)
    out["echo_one_loop"] = loop_load.process_rows(None, 4, 16, seconds, server_args=ONE_LOOP)
    out["bare"] = loop_load.bare_rows(4, 16, seconds, REQUEST_BYTES)
    jpegs = [support.jpeg(support.photo(480, 640, seed=200 + i)) for i in range(16)]
    images = workdir / "jpegs"
    images.mkdir(exist_ok=True)
    for index, data in enumerate(jpegs):
        (images / f"{index:02d}.jpg").write_bytes(data)
    warm = {"inputs": {"image": {"file": str(images / "00.jpg"), "dtype": "bytes"}}}
    out["jpeg_mean_bytes"] = sum(map(len, jpegs)) / len(jpegs)
    for pre_max in (1, 8):
        with trtserve.pipe(dict(jpeg_nodes(path, support, pre_max), warmup=[warm])) as pipe:
            # the warm-up decodes one image; full batches meet the decoders' first batched
            # calls here, as the server rows meet them in the clients' --warmup-ms
            closed_loop(lambda i: pipe({"data": jpegs[i % 16]}), 64, 1.0)
            out[f"jpeg_pipe_max{pre_max}"] = loop_load.loop_rows(pipe, jpegs, [64], seconds, inputs="JPEG")[0]
    nodes = jpeg_nodes(path, support, 8)
    folder = workdir / "repository-jpeg-server"
    model_dir = folder / loop_load.MODEL
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, model_dir / "1" / "model.pt")
    (model_dir / "config.toml").write_text(
        f"[pre]\n{loop_load.toml_table(nodes['pre'])}\n\n[model]\n{loop_load.toml_table(nodes['model'])}\n\n"
        '[[input]]\nname = "image"\ndtype = "bytes"\nshape = [-1]\n\n'
        f'[[warmup]]\n[warmup.inputs.image]\ndtype = "bytes"\nfile = "{images / "00.jpg"}"\n')
    out["jpeg_server"] = loop_load.process_rows(folder, 4, 16, seconds, ("--input-data", str(images)))
    out["targets"] = server_targets(out)
    return out


def server_targets(out: dict[str, Any]) -> list[tuple[str, float, str, float]]:
    """(figure, measured, op, target): the ratios this step exists to check, from one run."""
    rows = [out["resnet_server"], out["jpeg_server"], out["echo"]]
    return [
        ("echo server / bare-socket echo, 600 KB requests", out["echo"]["per_s"] / out["bare"]["per_s"], ">=", 0.6),
        ("echo server req/s, 600 KB requests", out["echo"]["per_s"], ">=", 3 * 1063),
        ("ResNet-18 through trtserve serve / in-process pipe()", out["resnet_server"]["per_s"] / out["resnet_pipe"]["per_s"], ">=", 0.5),
        ("JPEG chain through trtserve serve / in-process pipe()", out["jpeg_server"]["per_s"] / out["jpeg_pipe_max8"]["per_s"], ">=", 0.8),
        ("worst p99 / p50 of the server rows", max(r["p99_ms"] / r["p50_ms"] for r in rows), "<=", 3.0),
        ("in-process JPEG chain, batched decode / one image per call", out["jpeg_pipe_max8"]["per_s"] / out["jpeg_pipe_max1"]["per_s"], ">=", 1.5),
    ]


def server_markdown(r: dict[str, Any]) -> list[str]:
    if "resnet_server" not in r:
        return []
    lines = ["", "## Through the server against in-process and the transport floors", "",
             f"ResNet-18 node {r['node']['backend']} x{r['node']['instance_num']}, max {r['node']['max']}, cuda_graph, "
             f"overlap; 600 KB requests. JPEG chain: 640x480 JPEGs ({r['jpeg_mean_bytes'] / 1e3:.0f} KB), GPU decode + "
             "fused preprocessing x4, then the same model. Server rows: 4 client processes x 16 in flight.", "",
             "| row | req/s | p50 ms | p99 ms | p99/p50 | mean batch |", "|---|---|---|---|---|---|"]
    names = [("resnet_pipe", "ResNet-18, in-process pipe(), event loop, c=64"),
             ("resnet_server", "ResNet-18 through trtserve serve (default I/O loops)"),
             ("resnet_server_one_loop", "ResNet-18 through trtserve serve --io-threads 1"),
             ("echo", "echo server (trtserve framing, no model; default I/O loops)"),
             ("echo_one_loop", "echo server --io-threads 1"),
             ("bare", "bare-socket echo (recv_into, no msgpack)"),
             ("jpeg_pipe_max1", "JPEG chain in-process, one image per decode call"),
             ("jpeg_pipe_max8", "JPEG chain in-process, batched decode (max 8)"),
             ("jpeg_server", "JPEG chain (batched decode) through trtserve serve")]
    return lines + rows_and_targets(r, names)


def rows_and_targets(r: dict[str, Any], names: list[tuple[str, str]]) -> list[str]:
    """The rows ``names`` (key, label) of a server-style step, then its targets, as markdown."""
    lines = []
    for key, name in names:
        row = r[key]
        batch = row.get("mean_batch")
        lines.append(f"| {name} | {row['per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                     f"{row['p99_ms'] / row['p50_ms']:.2f} | {'-' if batch is None else f'{batch:.2f}'} |")
    lines += ["", "| figure | measured | target | met |", "|---|---|---|---|"]
    for figure, value, op, target in r["targets"]:
        met = value >= target if op == ">=" else value <= target
        lines.append(f"| {figure} | {value:.3g} | {op} {target:g} | {'yes' if met else '**no**'} |")
    return lines


# --------------------------------------------------------------------------- the whole step


def bench(seconds: float, models: dict[str, Any]) -> dict[str, Any]:
    import torch

    path = Path(models["paths"]["chw"])
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
    out["pipes"] = {}
    for mode, extra in MODES.items():
        out["pipes"][mode] = pipe_rows(dict(NODE, model=str(path), **extra), inputs, seconds)
    out["raw_batch8_after"] = raw_eager(torch, net, stream, 8)
    out["raw_batch8_host_io"] = raw_host_io(torch, net, stream, inputs, 8, seconds)
    _add_ratios(out)
    return out


def _rows(out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for pipes in out["pipes"].values():
        for key in ("threads_numpy", "loop_numpy", "threads_device", "loop_device"):
            rows += pipes.get(key, [])
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
    return lines


def _line(mode: str, driver: str, inputs: str, row: dict[str, Any]) -> str:
    batch = row.get("mean_batch")
    return (f"| {mode} | {driver} | {inputs} | {row['concurrency']} | {row['per_s']:.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{'-' if batch is None else f'{batch:.2f}'} | {row.get('ratio_to_raw_b8', float('nan')):.2f} | "
            f"{row.get('ratio_to_raw_b8_graph', float('nan')):.2f} | {row.get('ratio_to_raw_b8_host_io', float('nan')):.2f} |")
