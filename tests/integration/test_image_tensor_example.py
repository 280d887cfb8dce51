"""The classifier_nchw example: JPEG bytes -> CPU stages (Mat2Tensor) -> a float32 NCHW ONNX
model, through trtserve.pipe() and through the server, checked against OpenCV + numpy +
onnxruntime by hand, and against the classifier example (same weights, preprocessing in
its graph)."""
from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

import trtserve
from trtserve_client import Client

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2] / "model_repository"
SIZE = 64
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TOLERANCE = dict(rtol=1e-4, atol=1e-6)  # float32 normalisation in two orders of operations


def jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(11)
    out = []
    for _ in range(count):
        h, w = rng.integers(24, 160, size=2)
        out.append(cv2.imencode(".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))[1].tobytes())
    return out


class ByHand:
    def __init__(self) -> None:
        self.nchw = ort.InferenceSession(str(REPO / "classifier_nchw" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    def probs(self, jpeg: bytes) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        rgb = cv2.cvtColor(cv2.resize(bgr, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        x = ((rgb / 255.0 - MEAN) / STD).transpose(2, 0, 1)[np.newaxis].astype(np.float32)
        return self.nchw.run(None, {"x": x})[0][0]


@pytest.fixture(scope="module")
def cases() -> list[tuple[bytes, np.ndarray]]:
    by_hand = ByHand()
    return [(jpeg, by_hand.probs(jpeg)) for jpeg in jpegs(24)]


def test_pipe_matches_the_computation_by_hand_and_the_in_graph_classifier(cases):
    with trtserve.pipe(REPO / "classifier_nchw" / "config.toml") as nchw, trtserve.pipe(REPO / "classifier" / "config.toml") as classic:
        def call(index: int) -> tuple[np.ndarray, np.ndarray]:
            group = [cases[(index + k) % len(cases)][0] for k in range(1 + index % 3)]
            items, others = [{"data": j} for j in group], [{"data": j} for j in group]
            nchw(items)
            classic(others)
            return items, others, group

        with ThreadPoolExecutor(8) as pool:
            runs = list(pool.map(call, range(48)))
        expected = dict(cases)
        for items, others, group in runs:
            for item, other, jpeg in zip(items, others, group):
                assert item["result"].shape == (10,)
                np.testing.assert_allclose(item["result"], expected[jpeg], **TOLERANCE)
                np.testing.assert_allclose(item["result"], other["result"], **TOLERANCE)
        stats = nchw.pipeline.nodes[-1].stats.snapshot()
        assert stats["model_calls"] == stats["batches"]  # one shape: one call per batch
        assert max(int(size) for size in stats["call_rows"]) > 1, stats  # batches formed


def test_server_serves_it_with_checked_metadata_and_honest_statistics(server_factory, cases):
    server = server_factory(REPO, metrics_port=0)
    with Client(server.host, server.port, timeout=30) as client:
        meta = client.model_metadata("classifier_nchw")
        assert meta["inputs"] == [{"name": "image", "dtype": "bytes", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "probs", "dtype": "float32", "shape": [10]}]
        model_node = meta["nodes"][1]
        assert model_node["model_file"] == "1/model.onnx"
        assert model_node["model_inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 3, SIZE, SIZE]}]
        for jpeg, expected in cases[:12]:
            np.testing.assert_allclose(client.infer("classifier_nchw", {"image": jpeg})["probs"], expected, **TOLERANCE)
        (stats,) = client.statistics("classifier_nchw")["models"]
    assert stats["success_count"] == 12
    assert stats["model_calls"] == stats["nodes"]["model"]["model_calls"] == sum(stats["call_rows"].values())
    assert sum(int(rows) * n for rows, n in stats["call_rows"].items()) == 12  # every image in exactly one call
    assert stats["nodes"]["preprocess"]["model_calls"] == 0  # image stages run no model
    url = f"http://{server.host}:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    counts = [s.value for s in families["trtserve_model_call_rows"].samples
              if s.name.endswith("_count") and s.labels == {"model": "classifier_nchw", "version": "1", "node": "model"}]
    assert counts == [stats["model_calls"]]
