"""The whole GPU path: JPEG bytes -> GPU preprocessing node -> SyncTensor[TorchScriptTensor]
ResNet-18 node, 16 threads mixing single and list calls, against PyTorch on the CPU."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import trtserve

from . import support

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TOLERANCE = 2e-2  # relative L2; cuDNN runs float32 convolutions in TF32 by default (~1e-3 seen)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    pytest.importorskip("torch")
    return support.build_models(tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def images():
    return [support.jpeg(support.photo(300 + 17 * i, 400 + 23 * i, seed=100 + i)) for i in range(8)]


def _cpu_reference(models, images, variant: str) -> list[np.ndarray]:
    import torch

    refs = []
    with torch.no_grad():
        for data in images:
            rgb = support.cpu_chain(data, 224, 224)
            if variant == "chw":
                refs.append(models["cpu_chw"](torch.from_numpy(support.normalize_chw(rgb))).numpy()[0])
            else:
                refs.append(models["cpu_hwc"](torch.from_numpy(rgb[None].copy())).numpy()[0])
    return refs


PIPELINES = {
    # GPU decode/resize/colour/normalise in one kernel, feeding the CHW model
    "fused": lambda path: {
        "pre": {"backend": "SyncTensor[S[DecodeTensor,FusedPreprocessTensor]]", "instance_num": 4, "resize_h": 224,
                "resize_w": 224, "decoder": "opencv", "color": "rgb", "mean": list(support.MEAN), "std": list(support.STD), "next": "model"},
        "model": {"backend": "SyncTensor[TorchScriptTensor]", "model": str(path), "instance_num": 2, "max": 8,
                  "batching_timeout": 2},
    },
    # TorchPipe's classic chain, in its own spelling (SyncTensor as the last stage): HWC
    # uint8 RGB images into a model that normalises inside
    "hwc": lambda path: {
        "pre": {"backend": "S[DecodeTensor,ResizeTensor,CvtColorTensor,SyncTensor]", "instance_num": 4,
                "resize_h": 224, "resize_w": 224, "decoder": "opencv", "color": "rgb", "next": "model"},
        "model": {"backend": "SyncTensor[TorchScriptTensor]", "model": str(path), "instance_num": 2, "max": 8,
                  "batching_timeout": 2, "add_batch_dim": True},
    },
}


@pytest.mark.parametrize("variant,cuda_graph,overlap", [("fused", False, False), ("hwc", False, False),
                                                         ("fused", True, False), ("hwc", True, False),
                                                         ("fused", True, True), ("hwc", False, True)])
def test_sixteen_threads_single_and_list_calls_match_cpu(models, images, variant, cuda_graph, overlap):
    """With cuda_graph the two model instances capture their batch sizes concurrently, while
    the other instance and the preprocessing node keep running.  With overlap the nodes in
    SyncTensor[X] form return before their stream is done and wait later."""
    path = models["paths"]["chw" if variant == "fused" else "hwc"]
    refs = _cpu_reference(models, images, "chw" if variant == "fused" else "hwc")
    failures, errors = [], []
    worst = [0.0]
    lock = threading.Lock()
    config = PIPELINES[variant](path)
    config["model"].update(cuda_graph=cuda_graph, overlap=overlap)
    if variant == "fused":  # the hwc chain ends in the leaf form S[...,SyncTensor], which always waits
        config["pre"]["overlap"] = overlap
    with trtserve.pipe(config) as pipe:

        def check(index: int, item: dict) -> None:
            result = item.get("result")
            expected_shape = (1, 1000) if variant == "fused" else (1000,)
            if result is None or result.shape != expected_shape:
                failures.append((index, None if result is None else result.shape))
                return
            err = support.rel_error(result.reshape(-1), refs[index])
            with lock:
                worst[0] = max(worst[0], err)
            if err > TOLERANCE:
                failures.append((index, err))

        def worker(t: int) -> None:
            rng = np.random.default_rng(t)
            try:
                for step in range(6):
                    if step % 2 == 0:
                        i = int(rng.integers(len(images)))
                        item = {"data": images[i]}
                        pipe(item)
                        check(i, item)
                    else:
                        picks = [int(i) for i in rng.integers(len(images), size=int(rng.integers(1, 5)))]
                        items = [{"data": images[i]} for i in picks]
                        pipe(items)
                        for i, item in zip(picks, items):
                            check(i, item)
            except Exception as exc:  # reported below with the thread's number
                errors.append((t, repr(exc)))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batch_sizes = pipe.pipeline.nodes[1].stats.snapshot()["batch_sizes"]
    print(f"{variant}{' (cuda_graph)' if cuda_graph else ''}{' (overlap)' if overlap else ''}: worst relative L2 error vs CPU {worst[0]:.2e}; "
          f"model batch sizes {batch_sizes}")
    assert not errors, errors[:3]
    assert not failures, failures[:5]
    assert any(int(size) > 1 for size in batch_sizes), f"no batching happened: {batch_sizes}"


def test_device_results_stay_on_the_gpu(models, images):
    path = models["paths"]["chw"]
    config = PIPELINES["fused"](path)
    config["model"]["result_device"] = "device"
    refs = _cpu_reference(models, images[:2], "chw")
    with trtserve.pipe(config) as pipe:
        items = [{"data": images[0]}, {"data": images[1]}]
        pipe(items)
    for item, ref in zip(items, refs):
        assert isinstance(item["result"], trtserve.cuda.DeviceArray)
        assert support.rel_error(item["result"].to_host().reshape(-1), ref) < TOLERANCE
