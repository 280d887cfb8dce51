"""The example model repository through trtserve.pipe(), checked against direct onnxruntime + OpenCV."""
from __future__ import annotations

import importlib.util
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

import trtserve
from trtserve.errors import BackendError, InvalidInputError
from trtserve.repository import ModelRepository

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2] / "model_repository"
SIZE = 64  # the classifier's input side, as configured in classifier/config.toml
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # batched vs single-row kernels may round differently


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(REPO / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def _random_jpeg(rng: np.random.Generator) -> bytes:
    h, w = rng.integers(24, 160, size=2)
    ok, encoded = cv2.imencode(".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert ok
    return encoded.tobytes()


class Reference:
    """What the example models must return, computed without trtserve."""

    def __init__(self) -> None:
        self.classifier = _session("classifier")
        self.mlp = _session("tensor_mlp")

    def probs(self, jpeg: bytes) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(cv2.resize(bgr, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        return self.classifier.run(None, {"image": rgb[np.newaxis]})[0][0]

    def y(self, x: np.ndarray) -> np.ndarray:
        batch = x if x.ndim == 2 else x[np.newaxis]
        out = self.mlp.run(None, {"x": batch})[0]
        return out if x.ndim == 2 else out[0]


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="module")
def classifier():
    with trtserve.pipe(REPO / "classifier" / "config.toml") as models:
        yield models


@pytest.fixture(scope="module")
def tensor_mlp():
    with trtserve.pipe(REPO / "tensor_mlp" / "config.toml") as models:
        yield models


@pytest.fixture(scope="module")
def pool(reference):
    """Inputs with their expected results: 48 JPEGs and 48 tensors (1-3 rows, some unbatched)."""
    rng = np.random.default_rng(2024)
    jpegs = [_random_jpeg(rng) for _ in range(48)]
    tensors = []
    for i in range(48):
        shape = (16,) if i % 4 == 0 else (int(rng.integers(1, 4)), 16)
        tensors.append(rng.standard_normal(shape).astype(np.float32))
    return {
        "classifier": [(j, reference.probs(j)) for j in jpegs],
        "tensor_mlp": [(t, reference.y(t)) for t in tensors],
    }


# --------------------------------------------------------------------------- (a) consistency


def test_concurrent_mixed_calls_match_direct_inference(classifier, tensor_mlp, pool):
    pipes = {"classifier": classifier, "tensor_mlp": tensor_mlp}
    threads, calls_each = 16, 63  # 1,008 calls
    start = threading.Barrier(threads)

    def worker(seed: int) -> int:
        rnd = random.Random(seed)
        start.wait()  # all threads hit the pipelines at once, so batches form
        checked = 0
        for _ in range(calls_each):
            name = rnd.choice(list(pipes))
            cases = [rnd.choice(pool[name]) for _ in range(rnd.choice([1, 1, 2, 3, 4]))]
            items = [{"data": data} for data, _ in cases]
            pipes[name](items[0] if len(items) == 1 else items)
            for item, (data, expected) in zip(items, cases):
                assert item["data"] is data  # the caller's input comes back as it went in
                np.testing.assert_allclose(item["result"], expected, **TOLERANCE)
                checked += 1
        return checked

    with ThreadPoolExecutor(threads) as executor:
        checked = sum(executor.map(worker, range(threads)))
    assert checked >= threads * calls_each
    for models in pipes.values():  # the load really exercised dynamic batching
        sizes = models.pipeline.nodes[-1].stats.snapshot()["batch_sizes"]
        assert max(int(s) for s in sizes) > 1, sizes


# --------------------------------------------------------------------------- (b) soft failure


def test_broken_jpeg_in_a_list_has_no_result_and_the_others_succeed(classifier, pool):
    good = [data for data, _ in pool["classifier"][:3]]
    broken = [good[0][: len(good[0]) // 3], b"", b"GIF89a not really"]
    items = [{"data": d} for d in (good[0], broken[0], good[1], broken[1], good[2], broken[2])]
    classifier(items)  # soft failures raise nothing
    for item, (_, expected) in zip(items[0::2], pool["classifier"][:3]):
        np.testing.assert_allclose(item["result"], expected, **TOLERANCE)
        assert item["result"].shape == (10,) and item["color"] == "rgb"
    assert all("result" not in item for item in items[1::2])


# --------------------------------------------------------------------------- (c) typed input errors


@pytest.mark.parametrize(
    "data, offending",
    [
        (np.zeros((2, 16), np.float64), "float64"),
        (np.zeros((2, 17), np.float32), "(2, 17)"),
        (np.zeros((2, 2, 16), np.float32), "(2, 2, 16)"),
        ({"inputs": np.zeros((1, 16), np.float32)}, "'inputs'"),
        (np.zeros((9, 16), np.float32), "9"),  # more rows than max = 8
    ],
    ids=["dtype", "dim", "rank", "name", "over-max"],
)
def test_bad_tensor_inputs_raise_invalid_input(tensor_mlp, data, offending):
    with pytest.raises(InvalidInputError) as info:
        tensor_mlp({"data": data})
    assert offending in info.value.message


def test_bad_item_in_a_list_raises_after_the_good_ones_finish(tensor_mlp, classifier, pool):
    (x, expected), = pool["tensor_mlp"][1:2]
    items = [{"data": x}, {"data": x.astype(np.float64)}, {"data": x}]
    with pytest.raises(InvalidInputError, match="float64"):
        tensor_mlp(items)
    for item in (items[0], items[2]):
        np.testing.assert_allclose(item["result"], expected, **TOLERANCE)
    assert "result" not in items[1]
    with pytest.raises(InvalidInputError, match="DecodeMat"):  # a decoded array is not image bytes
        classifier({"data": np.zeros((64, 64, 3), np.uint8)})


# --------------------------------------------------------------------------- (d) a failing backend


class ExplodesOnMarker(trtserve.Backend):
    """Identity that raises for a batch holding b"boom", as a buggy user backend would."""

    def forward(self, items):
        if any(item["data"] == b"boom" for item in items):
            raise RuntimeError("user backend bug")
        for item in items:
            item["result"] = item["data"]


def test_a_raising_backend_fails_its_batch_and_the_node_keeps_serving():
    trtserve.register("ExplodesOnMarker", ExplodesOnMarker)
    config = {"backend": "ExplodesOnMarker", "max": 4, "batching_timeout": 1, "instance_num": 1}
    with trtserve.pipe(config) as models:
        for _round in range(3):
            with pytest.raises(BackendError) as info:
                models({"data": b"boom"})
            assert info.value.details["exception"] == "RuntimeError" and "user backend bug" in info.value.message
            items = [{"data": b"ok %d" % i} for i in range(4)]
            models(items)
            assert [item["result"] for item in items] == [b"ok %d" % i for i in range(4)]
        stats = models.pipeline.nodes[0].stats.snapshot()
    assert stats["failed_batches"] == 3


# --------------------------------------------------------------------------- the repository itself


def test_identity_example_returns_its_input():
    with trtserve.pipe(REPO / "identity" / "config.toml") as models:
        item = {"data": b"\x00payload"}
        models(item)
        assert item["result"] == b"\x00payload"


def test_identity_example_serves_concurrent_callers_batches_a_list_and_refuses_more_than_64_rows():
    """The example identity is inline: 16 threads each run their own requests (batches of
    whatever queued meanwhile), and a list call is one burst, so it runs as one batch."""
    with trtserve.pipe(REPO / "identity" / "config.toml") as models:
        inputs = [np.full((1 + i % 3, 4), i, np.float32) for i in range(400)]

        def call(x: np.ndarray) -> np.ndarray:
            item = {"data": x}
            models(item)
            return item["result"]

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, inputs))
        assert all(result is x for result, x in zip(results, inputs))  # each caller gets its own
        sizes = {int(k): v for k, v in models.pipeline.nodes[0].stats.snapshot()["batch_sizes"].items()}
        assert sum(k * v for k, v in sizes.items()) == sum(len(x) for x in inputs)
        items = [{"data": x} for x in inputs[:21]]  # 42 rows
        models(items)
        assert all(item["result"] is x for item, x in zip(items, inputs))
        after = {int(k): v for k, v in models.pipeline.nodes[0].stats.snapshot()["batch_sizes"].items()}
        assert after.get(42, 0) == sizes.get(42, 0) + 1, "the list ran as one batch of its 42 rows"
        with pytest.raises(InvalidInputError) as excinfo:
            models({"data": np.zeros((65, 4), np.float32)})
        assert excinfo.value.details["max"] == 64


def test_every_example_loads_ready_with_metadata():
    repository = ModelRepository(REPO)
    try:
        repository.load_all()
        states = {row["name"]: (row["state"], row["reason"]) for row in repository.index()}
        assert states == {name: ("READY", None) for name in ("classifier", "classifier_nchw", "identity", "tensor_mlp")}
        meta = repository.get("classifier").metadata()
        assert meta["inputs"] == [{"name": "image", "dtype": "bytes", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "probs", "dtype": "float32", "shape": [10]}]
        mlp_inputs = repository.get("tensor_mlp").metadata()["inputs"]
        assert mlp_inputs == [{"name": "x", "dtype": "float32", "shape": [-1, 16]}]
    finally:
        repository.close()


def test_make_examples_regenerates_the_committed_models_byte_for_byte(tmp_path):
    spec = importlib.util.spec_from_file_location("make_examples", REPO / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write_all(tmp_path)
    assert written
    for path in written:
        committed = REPO / path.relative_to(tmp_path)
        assert path.read_bytes() == committed.read_bytes(), f"{committed} is stale: rerun make_examples.py"
        assert committed.stat().st_size < 1_000_000
