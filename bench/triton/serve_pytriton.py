"""Serve the tensor_mlp ONNX model through PyTriton, configured like trtserve's tensor_mlp.

A bound Python function runs onnxruntime with the same session options as trtserve's
OnnxRuntime backend (1 intra-op and 1 inter-op thread per instance), behind Triton's
dynamic batcher with the same max batch (8) and a max queue delay equal to trtserve's
``batching_timeout`` (2 ms).  Listens on 127.0.0.1 only.  Prints
``pytriton listening on 127.0.0.1:GRPC_PORT`` once the model is ready; SIGINT/SIGTERM stop it.

Run it with the PyTriton environment (see docs/performance.md):

    .venv-triton/bin/python bench/triton/serve_pytriton.py --grpc-port 8101 --http-port 8100
"""
from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

MODEL = Path(__file__).resolve().parents[2] / "model_repository" / "tensor_mlp" / "1" / "model.onnx"


def make_infer(model_path: Path):
    """One onnxruntime session per bound function (= per Triton model instance)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # trtserve's OnnxRuntime default: parallelism comes from instances
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    @batch
    def infer(x: np.ndarray):
        (y,) = session.run(None, {input_name: x})
        return {"y": y}

    return infer


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--name", default="tensor_mlp")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--instances", type=int, default=1)
    return p.parse_args()


def main() -> None:
    args = parse()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_metrics=False,
        exit_timeout_secs=5,
        log_verbose=0,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # PyTriton 0.7 puts statistics and metadata behind an access token by default; this
    # server listens on 127.0.0.1 only and the load generator reads statistics, so lift it.
    security = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=[make_infer(args.model) for _ in range(args.instances)],
            inputs=[Tensor(name="x", dtype=np.float32, shape=(16,))],
            outputs=[Tensor(name="y", dtype=np.float32, shape=(4,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        triton.run()
        print(f"pytriton listening on 127.0.0.1:{args.grpc_port}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
