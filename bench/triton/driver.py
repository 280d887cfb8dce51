"""Load generator drivers for Triton (PyTriton): the same measurement code, another protocol.

Both speak KServe v2 through ``tritonclient``'s asyncio clients; ``connections`` clients
(gRPC channels, or aiohttp sessions) share the load the way trtserve's driver spreads it over
sockets.  Statistics are mapped onto trtserve's statistics shape so the queue/compute
breakdown comes out of the same code.
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from trtserve_bench.drivers import Driver

# KServe datatypes -> numpy names, for metadata in trtserve's shape.
DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "UINT16": "uint16", "INT16": "int16",
    "UINT32": "uint32", "INT32": "int32", "UINT64": "uint64", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "bytes",
}


def trtserve_metadata(triton: dict[str, Any], max_batch: int) -> dict[str, Any]:
    """Triton's model metadata in trtserve's shape (a -1 leading dim for batched models)."""
    def spec(tensor: dict[str, Any]) -> dict[str, Any]:
        shape = [int(d) for d in tensor["shape"]]
        return {"name": tensor["name"], "dtype": DATATYPES[tensor["datatype"]], "shape": shape}

    return {"name": triton["name"], "inputs": [spec(t) for t in triton["inputs"]], "outputs": [spec(t) for t in triton["outputs"]], "max_batch_size": max_batch}


def trtserve_statistics(triton: dict[str, Any]) -> dict[str, Any] | None:
    """Triton's inference statistics in trtserve's shape (cumulative counters, ns)."""
    stats = (triton.get("model_stats") or [None])[0]
    if stats is None:
        return None
    inference = stats.get("inference_stats", {})

    def ns(key: str) -> int:
        return int(inference.get(key, {}).get("ns", 0))

    batch_sizes = {
        int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0)) for b in stats.get("batch_stats", [])
    }
    return {
        "name": stats.get("name"),
        "success_count": int(inference.get("success", {}).get("count", 0)),
        "failure_count": int(inference.get("fail", {}).get("count", 0)),
        "queue_ns": ns("queue"),
        "compute_ns": ns("compute_input") + ns("compute_infer") + ns("compute_output"),
        "batch_sizes": batch_sizes,
    }


class _TritonDriver(Driver):
    """One driver for both tritonclient protocols; subclasses name what differs."""

    client_module = ""  # "tritonclient.grpc" or "tritonclient.http" (its .aio holds the client)
    data_kwargs: dict[str, Any] = {}  # extra InferInput.set_data_from_numpy arguments
    json_kwargs: dict[str, Any] = {}  # what makes the client answer with plain dicts
    config_wrapped = False  # the model config comes as {"config": {...}}

    def __init__(self, url: str, model: str, connections: int = 4) -> None:
        self.url, self.model, self.connection_count = url, model, connections
        self.clients: list[Any] = []

    async def open(self) -> None:
        client_class = importlib.import_module(f"{self.client_module}.aio").InferenceServerClient
        self.clients = [client_class(self.url) for _ in range(self.connection_count)]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        self.clients = []

    def prepare(self, values: dict[str, Any]) -> list[Any]:
        from tritonclient.utils import np_to_triton_dtype

        infer_input = importlib.import_module(self.client_module).InferInput
        inputs = []
        for name, array in values.items():
            tensor = infer_input(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array), **self.data_kwargs)
            inputs.append(tensor)
        return inputs

    async def infer(self, slot: int, prepared: list[Any]) -> None:
        result = await self.clients[slot % len(self.clients)].infer(self.model, prepared)
        result.as_numpy("y")  # decode, as the trtserve drivers decode their outputs

    async def metadata(self, model: str) -> dict[str, Any] | None:
        meta = await self.clients[0].get_model_metadata(model, **self.json_kwargs)
        config = await self.clients[0].get_model_config(model, **self.json_kwargs)
        if self.config_wrapped:
            config = config["config"]
        return _with_batch_dim(trtserve_metadata(meta, int(config.get("max_batch_size", 0))))

    async def statistics(self, model: str) -> dict[str, Any] | None:
        return trtserve_statistics(await self.clients[0].get_inference_statistics(model, **self.json_kwargs))

    async def server_info(self) -> dict[str, Any]:
        return await self.clients[0].get_server_metadata(**self.json_kwargs)


class TritonGrpcDriver(_TritonDriver):
    name = "triton-grpc"
    client_module = "tritonclient.grpc"
    json_kwargs = {"as_json": True}  # protobuf messages otherwise
    config_wrapped = True


class TritonHttpDriver(_TritonDriver):
    name = "triton-http"
    client_module = "tritonclient.http"
    data_kwargs = {"binary_data": True}


def _with_batch_dim(metadata: dict[str, Any]) -> dict[str, Any]:
    """Triton omits the batch dim from batched models' shapes (gRPC) or reports it as -1 (HTTP)."""
    if metadata.get("max_batch_size"):
        for spec in metadata["inputs"] + metadata["outputs"]:
            if not spec["shape"] or spec["shape"][0] != -1:
                spec["shape"] = [-1, *spec["shape"]]
    return metadata
