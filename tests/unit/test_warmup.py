"""Warm-up through ``trtserve.pipe``: the same [[warmup]] semantics as the server's load."""
from __future__ import annotations

import numpy as np
import pytest

import trtserve
from trtserve.errors import ModelUnavailableError


class Sizes(trtserve.Backend):
    """Records the batch sizes each instance ran."""

    def init(self, context):
        super().init(context)
        self.seen = []

    def forward(self, items):
        self.seen.append(len(items))
        for item in items:
            if item["data"].sum() < 0:
                raise RuntimeError("negative samples are refused")
            item["result"] = item["data"] * 2


trtserve.register("WarmupSizes", Sizes)


def config(fill: str = "zeros", **extra):
    warm = {"count": 2, "inputs": {"x": {"dtype": "float32", "shape": [1, 3], "fill": fill}}}
    return {"backend": "WarmupSizes", "instance_num": 2, "max": 3, "warmup": [warm], **extra}


def test_pipe_warms_every_instance_at_every_batch_size_count_times():
    with trtserve.pipe(config()) as models:
        seen = models.pipeline.nodes[0].on_each_instance(lambda inst: list(inst.backend.seen))
        assert seen == [[1, 1, 2, 2, 3, 3]] * 2
        item = {"data": np.ones((1, 3), np.float32)}
        models(item)
        assert item["result"].tolist() == [[2, 2, 2]]


def test_a_failing_warmup_fails_pipe(tmp_path):
    bad = config()
    bad["warmup"][0]["inputs"]["x"] = {"dtype": "float32", "shape": [1, 3], "file": "missing.npy"}
    with pytest.raises(trtserve.ConfigError):
        trtserve.pipe(bad)
    np.save(tmp_path / "negative.npy", -np.ones((1, 3), np.float32))
    bad["warmup"][0]["inputs"]["x"] = {"file": str(tmp_path / "negative.npy")}
    with pytest.raises(ModelUnavailableError, match="negative samples are refused"):
        trtserve.pipe(bad)


def test_each_node_warms_with_what_the_node_before_made_of_the_sample():
    nodes = {"a": dict(config(), next="b"), "b": {"backend": "WarmupSizes", "max": 2}}
    nodes["warmup"] = nodes["a"].pop("warmup")
    with trtserve.pipe(nodes) as models:
        first, second = models.pipeline.nodes
        assert second.on_each_instance(lambda inst: inst.backend.seen) == [[1, 1, 2, 2]]
        assert first.on_each_instance(lambda inst: len(inst.backend.seen)) == [6, 6]
