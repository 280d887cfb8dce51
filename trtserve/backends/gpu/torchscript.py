"""TorchScriptTensor: a TorchScript model (``model`` key), batched, on the instance stream.

On CUDA it must sit inside SyncTensor (``SyncTensor[TorchScriptTensor]``): the model runs
on the instance's stream through ``torch.cuda.ExternalStream``, so it overlaps with other
instances and SyncTensor's one wait covers it.  DeviceArray inputs (from the GPU image
backends) are read in place through ``__cuda_array_interface__``; numpy inputs go up
through a pinned tensor.  Results are numpy arrays by default, copied to pinned host
memory on the stream (complete when SyncTensor returns); ``result_device = "device"``
keeps them on the GPU as DeviceArrays for a following GPU node.

Without CUDA (``device = "cpu"``, or ``"auto"`` on a machine without a GPU) it runs on the
CPU with numpy in and out, no SyncTensor needed.  PyTorch is an optional extra
(``pip install 'trtserve[torch]'``) imported only when an instance initialises.

Batching: the items' inputs are concatenated along the first dimension, the model runs
once, and each output is split back by the items' row counts.  Items of different sample
shapes (a model with dynamic dimensions) run as one call per shape.  ``add_batch_dim = true``
is for items that are single samples without a batch dimension (HWC images from
ResizeTensor): each counts 1 toward ``max``, gets a leading dimension of 1, and its
results come back without it.  A dict input is passed positionally in key order; tuple
outputs become ``{"output0": ..., "output1": ...}``, dict outputs keep their names.

``cuda_graph = true`` replays the model from a CUDA graph per input signature instead of
launching it op by op (torchgraph.py); on a CPU-only machine with ``device = "auto"`` the
key does not apply and is ignored.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import cuda
from ...backend import Backend, BackendOptions, InstanceContext, Key, Signature, TensorSpec, option
from ...errors import ConfigError, InvalidInputError, ModelUnavailableError
from ..stacking import Prepared, check_rows, describe, group, split
from .torchgraph import GraphRunner


@dataclass(frozen=True)
class TorchScriptOptions(BackendOptions):
    model: str = ""  # the node's model file (required_keys)
    device: str = option(Key(str, "auto", "auto: cuda when PyTorch sees a GPU, else cpu", choices=("auto", "cuda", "cpu")))
    add_batch_dim: bool = option(Key(bool, False, "items are single samples: add (and remove) a batch dimension of 1"))
    result_device: str = option(
        Key(str, "host", "host: numpy results; device: DeviceArray results on the GPU", choices=("host", "device"))
    )
    cuda_graph: bool = option(Key(bool, False, "capture the model in a CUDA graph per input shape and replay it (CUDA only)"))

    def check(self) -> None:
        """CUDA-only keys on a node that says ``device = "cpu"``.  (With ``"auto"`` the
        machine decides: cuda_graph is then ignored on a CPU, result_device refused at init.)"""
        if self.device != "cpu":
            return
        if self.cuda_graph:
            raise ConfigError(
                'TorchScriptTensor: cuda_graph = true needs CUDA, and this node has device = "cpu"; '
                'remove cuda_graph or set device = "auto"',
                key="cuda_graph",
            )
        if self.result_device == "device":
            raise ConfigError(
                'TorchScriptTensor: result_device = "device" needs CUDA, and this node has device = "cpu"; '
                'remove result_device or set device = "auto"',
                key="result_device",
            )


class TorchScriptTensor(Backend):
    thread_bound = True  # runs on the instance's current stream
    Options = TorchScriptOptions
    required_keys = ("model",)

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        options = context.options(TorchScriptOptions)
        try:
            import torch
        except ImportError:
            raise ModelUnavailableError(
                "TorchScriptTensor needs PyTorch, which is not installed: pip install 'trtserve[torch]'",
                backend="TorchScriptTensor",
            ) from None
        self.torch = torch
        self._record_call = context.record_call
        path = self.path = options.model
        if not path:
            raise ConfigError("TorchScriptTensor needs the config key 'model' (a TorchScript .pt file)", key="model")
        self.add_batch_dim = options.add_batch_dim
        self.result_on_device = options.result_device == "device"
        self.stream: cuda.Stream | None = None  # the instance's, on CUDA
        self.torch_stream: Any = None  # torch's view of it (torch.cuda.ExternalStream)
        self.staging: list[cuda.HostStaging] = []  # pinned upload buffers, two per model input
        self._turn = 0
        self.graphs: GraphRunner | None = None
        choice = options.device
        use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
        if use_cuda:
            stream = self._bind_cuda(choice)
            self.device = torch.device("cuda", stream.device)
        else:
            self.device = torch.device("cpu")
            if self.result_on_device:
                raise ConfigError("TorchScriptTensor: result_device = \"device\" needs CUDA; this instance runs on the CPU", key="result_device")
        try:
            self.model = torch.jit.load(path, map_location=self.device)
        except Exception as exc:
            raise ModelUnavailableError(
                f"TorchScriptTensor: cannot load {path} as TorchScript ({type(exc).__name__}: {exc}); "
                "save it with torch.jit.save(torch.jit.trace(model, example), path)",
                backend="TorchScriptTensor",
                file=str(path),
            ) from None
        self.model.eval()
        self.graphs = self._graph_runner(options, context)

    def _graph_runner(self, options: TorchScriptOptions, context: InstanceContext) -> GraphRunner | None:
        """``cuda_graph = true``: the model replayed from CUDA graphs (torchgraph.py).  With
        ``device = "auto"`` on a machine without a GPU it does not apply and is ignored, so one
        repository serves on both (``device = "cpu"`` is refused at load: Options.check)."""
        if options.cuda_graph and self.device.type == "cuda":
            return GraphRunner(self.torch, self.model, context.where)
        return None

    def _bind_cuda(self, choice: str) -> cuda.Stream:
        """The instance's stream, bound for torch too."""
        torch = self.torch
        if not torch.cuda.is_available():
            raise ModelUnavailableError(
                f"no CUDA device: TorchScriptTensor has device = {choice!r} but PyTorch sees no GPU "
                "(torch.cuda.is_available() is False); use device = \"cpu\" or \"auto\"",
                backend="TorchScriptTensor",
            )
        stream = self.stream = cuda.current_stream()
        if stream is None:
            raise ConfigError(
                "TorchScriptTensor on CUDA runs on the instance's stream, and none is bound: "
                "wrap it, backend = \"SyncTensor[TorchScriptTensor]\" (or set device = \"cpu\")",
                backend="TorchScriptTensor",
            )
        torch.cuda.set_device(stream.device)
        self.torch_stream = torch.cuda.ExternalStream(stream.handle, device=torch.device("cuda", stream.device))
        return stream

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
        for staging in self.staging:
            staging.close()
        self.staging = []
        super().close()

    def signature(self) -> Signature:
        """What a saved TorchScript file tells: how many tensors ``forward`` takes (by position)
        and returns (``output0``, ``output1``, ... for a tuple).  It keeps no dtypes or shapes,
        even for a traced model, and a dict's keys only show when it runs."""
        schema = self.model.forward.schema
        inputs = tuple(TensorSpec(a.name, "", ()) for a in schema.arguments[1:] if not a.has_default_value())
        returned = schema.returns[0].type if len(schema.returns) == 1 else None
        outputs: tuple[TensorSpec, ...] | None = None
        if isinstance(returned, self.torch.TensorType):
            outputs = (TensorSpec("output0", "", ()),)
        elif isinstance(returned, self.torch.TupleType):
            outputs = tuple(TensorSpec(f"output{i}", "", ()) for i in range(len(returned.elements())))
        return Signature(str(self.path), inputs, outputs, typed=False, input_names=False)

    # -- item checks -------------------------------------------------------------------
    def request_size(self, item: dict[str, Any]) -> int:
        if self.add_batch_dim:
            return 1
        return super().request_size(item)

    def validate(self, item: dict[str, Any]) -> None:
        data = item.get("data")
        tensors = list(data.values()) if isinstance(data, dict) else [data]
        for tensor in tensors:
            shape = getattr(tensor, "shape", None)
            if shape is None or not (hasattr(tensor, "__cuda_array_interface__") or isinstance(tensor, np.ndarray) or self._is_torch(tensor)):
                raise InvalidInputError(
                    f"TorchScriptTensor takes a numpy array, a DeviceArray or a torch tensor (or a dict of them), "
                    f"got {describe(tensor)}",
                    backend="TorchScriptTensor",
                    received=describe(tensor),
                )
            if not self.add_batch_dim and len(shape) == 0:
                raise InvalidInputError(
                    "TorchScriptTensor inputs need a leading batch dimension; send shape (n, ...) "
                    "or set add_batch_dim = true",
                    backend="TorchScriptTensor",
                    received=describe(tensor),
                )

    def _is_torch(self, value: Any) -> bool:
        return isinstance(value, self.torch.Tensor)

    # -- forward -----------------------------------------------------------------------
    def forward(self, items: list[dict[str, Any]]) -> None:
        prepared = self._prepare(items)
        groups = group(prepared)
        if len(groups) == 1:  # the common batch: one sample shape
            self._run(items, prepared)
            return
        for indices, _ in groups:  # mixed sample shapes: one call per shape (docs/configuration.md)
            self._run([items[i] for i in indices], [prepared[i] for i in indices])

    def _prepare(self, items: list[dict[str, Any]]) -> list[Prepared]:
        """Per item, every model input (by name, ``input`` for a lone tensor) with its batch
        dimension; items batched together must have the same inputs."""
        first = items[0]["data"]
        if not isinstance(first, dict) and not self.add_batch_dim:
            # The common batch, one tensor per item: per-item Python is GIL time on every batch.
            unbatched = []
            for item in items:
                data = item["data"]
                if isinstance(data, dict):
                    raise self._mixed_inputs(["input"], first, data)
                unbatched.append(Prepared({"input": data}, int(data.shape[0]), False))
            return unbatched
        names = list(first) if isinstance(first, dict) else ["input"]
        prepared = []
        for item in items:
            data = item["data"]
            if isinstance(first, dict) != isinstance(data, dict) or (isinstance(data, dict) and list(data) != names):
                raise self._mixed_inputs(names, first, data)
            values: Iterable[Any] = data.values() if isinstance(data, dict) else (data,)
            if self.add_batch_dim:
                values = [self._with_batch_dim(value) for value in values]
            arrays = dict(zip(names, values))
            prepared.append(Prepared(arrays, int(next(iter(arrays.values())).shape[0]), self.add_batch_dim))
        return prepared

    @staticmethod
    def _mixed_inputs(names: list[str], first: Any, data: Any) -> InvalidInputError:
        return InvalidInputError(
            f"TorchScriptTensor: items batched together must have the same inputs; the first has "
            f"{names if isinstance(first, dict) else 'one tensor'}, another has {describe(data)}",
            backend="TorchScriptTensor",
        )

    def _with_batch_dim(self, value: Any) -> Any:
        """One sample as a batch of one, as a view (``add_batch_dim``)."""
        if isinstance(value, np.ndarray):
            return value[np.newaxis]
        if self._is_torch(value):
            return value.unsqueeze(0)
        if isinstance(value, cuda.DeviceArray):
            return value.reshape((1,) + tuple(value.shape))
        return self._as_tensor(value).unsqueeze(0)

    def _run(self, items: list[dict[str, Any]], prepared: list[Prepared]) -> None:
        """One model call for items of one sample shape."""
        torch = self.torch
        self._turn ^= 1  # which staging buffer of each input this batch packs into
        with torch.inference_mode(), (torch.cuda.stream(self.torch_stream) if self.torch_stream else contextlib.nullcontext()):
            columns = [[p.arrays[name] for p in prepared] for name in prepared[0].arrays]
            inputs = [self._batch(col, index) for index, col in enumerate(columns)]
            outputs = self._named_outputs((self.graphs or self.model)(*inputs))
            total = sum(p.rows for p in prepared)
            self._record_call(total)
            check_rows(outputs, total, f"TorchScriptTensor model {self.path}", str(self.path))
            wholes = {name: self._whole(out) for name, out in outputs.items()}
        for item, parts in zip(items, split(wholes, prepared)):
            item["result"] = parts["output0"] if list(parts) == ["output0"] else parts

    def _as_tensor(self, value: Any) -> Any:
        torch = self.torch
        if self._is_torch(value):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(value))
        if hasattr(value, "__cuda_array_interface__"):
            if self.device.type != "cuda":
                return torch.from_numpy(cuda.to_host(value))
            return torch.as_tensor(value, device=self.device)  # zero-copy view of device memory
        raise InvalidInputError(f"TorchScriptTensor cannot use {describe(value)} as a tensor", backend="TorchScriptTensor")

    def _batch(self, column: list[Any], index: int) -> Any:
        """One input tensor of the whole batch (every value with its batch dimension), on
        the model's device."""
        torch = self.torch
        if self.device.type == "cuda" and _numpy_rows(column):
            return self._upload(column, index)  # the common case: host requests
        column = [self._as_tensor(value) for value in column]
        if self.device.type == "cpu":
            return column[0] if len(column) == 1 else torch.cat(column)
        host = [t for t in column if t.device.type == "cpu"]
        if host:
            # Stage host rows in one pinned tensor so the upload is async on the stream;
            # torch's pinned allocator keeps it until that copy has run.
            shape = (sum(int(t.shape[0]) for t in host),) + tuple(host[0].shape[1:])
            pinned = torch.cat(host, out=torch.empty(shape, dtype=host[0].dtype, pin_memory=True))
            uploaded = pinned.to(self.device, non_blocking=True)
            parts, offset = [], 0
            for t in column:
                if t.device.type == "cpu":
                    n = int(t.shape[0])
                    parts.append(uploaded[offset : offset + n])
                    offset += n
                else:
                    parts.append(t)
            column = parts
        return column[0] if len(column) == 1 else torch.cat(column)

    def _upload(self, arrays: list[np.ndarray], index: int) -> Any:
        """numpy rows of one input -> one device tensor: one ``torch.cat`` packs the rows
        into this instance's pinned staging buffer (allocated once, grown on demand; fenced,
        though SyncTensor's wait at the end of each forward already frees it) and one
        asynchronous copy on the instance stream uploads them.

        One call for the packing: under load every call that releases the GIL costs the
        instance a wait to take it back (on the order of 100 us with 64 client threads in
        the process; bench/gpu/timeline.py measures it), and np.concatenate releases it once
        per row.
        """
        torch = self.torch
        stream = self.stream
        assert stream is not None, "uploads happen on CUDA only, where init binds the stream"
        first = arrays[0]
        shape = (sum(int(a.shape[0]) for a in arrays),) + tuple(first.shape[1:])
        # Two buffers per input, used in turn: with SyncTensor's overlap the next batch is
        # packed while the previous one may still be uploading from its buffer.
        slot = 2 * index + self._turn
        while len(self.staging) <= slot:
            self.staging.append(cuda.HostStaging(device=stream.device))
        staging = self.staging[slot]
        nbytes = math.prod(shape) * first.dtype.itemsize
        if nbytes == 0:  # rows with a zero-sized dimension: nothing to copy
            return torch.from_numpy(np.empty(shape, first.dtype)).to(self.device)
        buffer = staging.reserve(nbytes)
        assert buffer is not None  # None only for nbytes == 0, returned above
        packed = torch.from_numpy(buffer[:nbytes].view(first.dtype).reshape(shape))
        rows = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]  # no copy when contiguous
        torch.cat(rows, out=packed)
        batch = torch.empty(shape, dtype=packed.dtype, device=self.device)
        cuda.copy_async(batch.data_ptr(), staging.ptr, nbytes, "htod", stream)
        staging.fence_on(stream)
        return batch

    def _named_outputs(self, out: Any) -> dict[str, Any]:
        if isinstance(out, dict):
            return {str(k): v for k, v in out.items()}
        if isinstance(out, (tuple, list)):
            return {f"output{i}": v for i, v in enumerate(out)}
        return {"output0": out}

    def _whole(self, out: Any) -> Any:
        """One output of the batch where its items will read it: numpy on the host, or a
        DeviceArray on the GPU (``result_device = "device"``); stacking.split slices it."""
        torch = self.torch
        if self.device.type == "cuda" and out.device.type == "cpu":
            out = out.to(self.device)  # a model on CUDA that returned a host tensor
        out = out.contiguous()
        if self.device.type == "cpu":
            return out.numpy()
        if self.result_on_device:
            # Copy into stream-ordered memory of our own: torch's allocator could otherwise
            # hand the block to new work on this stream while a consumer still reads it.
            whole = cuda.DeviceArray.empty(tuple(out.shape), _numpy_dtype(out), self.stream)
            cuda.copy_async(whole.ptr, out.data_ptr(), whole.nbytes, "dtod", self.stream)
            return whole
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        # Through cuda-python, not host.copy_(): torch would remember the stream and, when
        # the result is freed, record an event on it, which crashes once the instance's
        # stream is destroyed (a result kept after its model was unloaded).  Complete once
        # SyncTensor's wait returns.
        cuda.copy_async(host.data_ptr(), out.data_ptr(), host.numel() * host.element_size(), "dtoh", self.stream)
        return host.numpy()


def _numpy_rows(column: list[Any]) -> bool:
    """Every value a numpy array with a batch dimension, of one dtype and one sample shape
    (so they stack)."""
    first = column[0]
    if type(first) is not np.ndarray or first.ndim == 0:
        return False
    dtype, sample = first.dtype, first.shape[1:]
    for value in column:
        if type(value) is not np.ndarray or value.dtype != dtype or value.shape[1:] != sample:
            return False
    return True


def _numpy_dtype(tensor: Any) -> np.dtype:
    return np.dtype(str(tensor.dtype).replace("torch.", ""))

