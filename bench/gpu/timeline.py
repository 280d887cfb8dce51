"""Where an instance's time goes: ResNet-18 as SyncTensor[TorchScriptTensor] under load.

    python3 bench/gpu/timeline.py [--seconds 3] [--concurrency 16,32,64] [--modes eager,cuda_graph] [--json OUT.json]

Wraps the instance's steps with timers (no change to the code under test beyond the
wrapping) and reports, per batch and per instance thread: the instance's whole batch (``_serve``),
TorchScriptTensor's forward split into staging (before the model call), the model call
(TorchScript launches, GIL released) and the split (after it), SyncTensor's wait for the
stream, the callbacks and dispatch after forward, and the gap until the same thread's next
batch.  With the raw model's batch-8 rate measured in the same run, the numbers say which
step keeps the pipeline below the raw rate.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import closed_loop, cuda, np, support, trtserve  # noqa: E402  (puts the repo on sys.path)

CLOCK = time.perf_counter_ns


class Recorder:
    """Per thread, per step: durations in microseconds; ``marks`` keeps execute spans."""

    def __init__(self) -> None:
        self.steps: dict[str, list[float]] = defaultdict(list)
        self.spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self.on = False

    def timed(self, name: str, fn: Callable[..., Any], span: bool = False) -> Callable[..., Any]:
        """``fn`` with its duration recorded under ``name``; with ``span`` also the start and
        end per thread (for the gaps between one thread's batches)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = CLOCK()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    end = CLOCK()
                    self.steps[name].append((end - start) / 1e3)
                    if span:
                        self.spans[threading.get_ident()].append((start, end))

        return wrapper

    def summary(self) -> dict[str, Any]:
        out = {name: {"n": len(v), "mean_us": statistics.fmean(v), "p50_us": statistics.median(v)} for name, v in self.steps.items() if v}
        gaps = [(b[0] - a[1]) / 1e3 for spans in self.spans.values() for a, b in zip(spans, spans[1:])]
        if gaps:
            out["gap_between_batches"] = {"n": len(gaps), "mean_us": statistics.fmean(gaps), "p50_us": statistics.median(gaps)}
        return out


def instrument(pipe: Any, rec: Recorder) -> None:
    node = pipe.pipeline.nodes[0]
    node._finish_batch = rec.timed("callbacks_on_the_instance", node._finish_batch)
    for inst in node._instances:
        inst._serve = rec.timed("execute", inst._serve, span=True)  # one batch, forward to release
        sync = inst.backend
        child = sync.children[0]
        sync.done.synchronize = rec.timed("sync_wait", sync.done.synchronize)
        child.forward = rec.timed("forward_enqueue", child.forward)
        child._batch = rec.timed("staging", child._batch)
        if child.graphs is not None:  # cuda_graph = true: the model call is a replay (or a capture)
            child.graphs = _TimedModel(child.graphs, rec)
        else:
            child.model = _TimedModel(child.model, rec)
        child._whole = rec.timed("split", child._whole)  # the copy out of the batch's outputs
        child.torch = _TimedTorch(child.torch, rec)


class _TimedTorch:
    """The torch module as TorchScriptTensor sees it, with ``cat`` (the packing of host rows
    into the staging buffer) timed on its own."""

    def __init__(self, torch: Any, rec: Recorder) -> None:
        self._torch, self.cat = torch, rec.timed("staging_torch_cat", torch.cat)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)


class _TimedModel:
    def __init__(self, model: Any, rec: Recorder) -> None:
        self.model, self.rec = model, rec

    def __call__(self, *args: Any) -> Any:
        return self.rec.timed("model_call", self.model)(*args)

    def __getattr__(self, name: str) -> Any:  # close(), captured, ... of a GraphRunner
        return getattr(self.model, name)


def raw_rate(torch: Any, net: Any, batch: int, host: bool) -> float:
    """One thread, batch 8 back to back on its own stream; ``host``: upload from pinned."""
    stream = torch.cuda.Stream()
    x_dev = torch.randn(batch, 3, 224, 224, device="cuda")
    x_host = torch.randn(batch, 3, 224, 224).pin_memory()
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(20):
            net(x_dev)
        stream.synchronize()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 2.0:
            out = net(x_host.to("cuda", non_blocking=True) if host else x_dev)
            if host:
                out.cpu()
            n += 1
        stream.synchronize()
        return n * batch / (time.perf_counter() - start)


def run_levels(torch: Any, config: dict[str, Any], inputs: list[Any], args: Any, report: dict[str, Any], tag: str) -> None:
    with trtserve.pipe(config) as pipe, cuda.Stream() as up:
        dev_inputs = [cuda.to_device(x, up) for x in inputs]
        up.synchronize()
        for row in dev_inputs:
            row.stream = None  # complete, as SyncTensor marks the results it hands on
        rec = Recorder()
        instrument(pipe, rec)
        closed_loop(lambda i: pipe({"data": inputs[i % 16]}), 16, 1.0)  # warm-up: cuDNN picks kernels
        levels = [("host_inputs", inputs, c) for c in args.concurrency] + [("device_inputs", dev_inputs, args.concurrency[-1])]
        for label, source, concurrency in levels:
            rec.steps.clear()
            rec.spans.clear()
            rec.on = True
            row = closed_loop(lambda i, source=source: pipe({"data": source[i % 16]}), concurrency, args.seconds)
            rec.on = False
            row["steps"] = rec.summary()
            row["ratio_to_raw_b8_device_inputs"] = row["per_s"] / report["raw_b8_device_inputs_img_s"]
            report[f"{tag}_{label}_c{concurrency}"] = row
            print(f"{tag} {label} c={concurrency}: {row['per_s']:.0f} img/s, ratio {row['ratio_to_raw_b8_device_inputs']:.2f}; "
                  + ", ".join(f"{k} {v['mean_us']:.0f}" for k, v in row["steps"].items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=lambda v: [int(c) for c in v.split(",")], default=[16, 32, 64])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--modes", default="eager", help="comma list of eager, cuda_graph (TorchScriptTensor's cuda_graph key)")
    parser.add_argument("--torch-threads", type=lambda v: [int(t) for t in v.split(",")], default=[0],
                        help="torch intra-op threads per run, 0 = torch's default (comma list)")
    args = parser.parse_args()
    faulthandler.enable()
    import torch

    models = support.build_models(Path(tempfile.mkdtemp(prefix="trtserve-timeline-")))
    path = models["paths"]["chw"]
    net = torch.jit.load(str(path), map_location="cuda").eval()
    report: dict[str, Any] = {"raw_b8_device_inputs_img_s": raw_rate(torch, net, 8, host=False),
                              "raw_b8_host_inputs_img_s": raw_rate(torch, net, 8, host=True)}
    inputs = [np.random.default_rng(i).standard_normal((1, 3, 224, 224)).astype(np.float32) for i in range(16)]
    config = {"backend": "SyncTensor[TorchScriptTensor]", "model": str(path), "instance_num": 2, "max": 8, "batching_timeout": 1}
    default_threads = torch.get_num_threads()
    for mode in args.modes.split(","):
        for threads in args.torch_threads:
            torch.set_num_threads(threads or default_threads)
            run_levels(torch, dict(config, cuda_graph=mode == "cuda_graph"), inputs, args, report,
                       f"{mode}_torch_threads_{threads or default_threads}")
    torch.set_num_threads(default_threads)
    report["raw_b8_device_inputs_img_s_after"] = raw_rate(torch, net, 8, host=False)
    text = json.dumps(report, indent=1)
    print(f"raw b8: {report['raw_b8_device_inputs_img_s']:.0f} img/s (device inputs), {report['raw_b8_host_inputs_img_s']:.0f} (host inputs), "
          f"{report['raw_b8_device_inputs_img_s_after']:.0f} after")
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
