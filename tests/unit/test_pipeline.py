"""Sequential stages, multi-node pipelines, item lifecycle and model-folder backend.py."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import trtserve
from trtserve.errors import BackendError, ConfigError


class AddOne(trtserve.Backend):
    def forward(self, items):
        for item in items:
            item["result"] = item["data"] + 1


class DropOdd(trtserve.Backend):
    """Leaves no result for odd numbers: they must leave the chain."""

    seen: list = []

    def forward(self, items):
        DropOdd.seen.extend(item["data"] for item in items)
        for item in items:
            if item["data"] % 2 == 0:
                item["result"] = item["data"]


class Ranged(trtserve.Backend):
    config_keys = {"lo": trtserve.Key(int, 1), "hi": trtserve.Key(int, 1)}

    def min(self):
        return self.config["lo"]

    def max(self):
        return self.config["hi"]

    def forward(self, items):
        for item in items:
            item["result"] = item["data"]


class Mark(trtserve.Backend):
    """Adds a side key, as DecodeMat adds 'color'."""

    def forward(self, items):
        for item in items:
            item["marked"] = True
            item["result"] = item["data"] * 10


for cls in (AddOne, DropOdd, Ranged, Mark):
    trtserve.register(cls.__name__, cls)


def test_sequential_moves_result_to_data_between_stages():
    with trtserve.pipe({"backend": "S[AddOne,AddOne,AddOne]"}) as models:
        item = {"data": 1}
        models(item)
        assert item == {"data": 1, "result": 4}


def test_item_without_result_leaves_the_chain_while_others_go_on():
    DropOdd.seen = []
    with trtserve.pipe({"backend": "S[AddOne,DropOdd,AddOne]", "max": 4}) as models:
        items = [{"data": i} for i in range(4)]
        models(items)
        stats = models.pipeline.stats.snapshot()
    assert [it.get("result") for it in items] == [None, 3, None, 5]
    assert sorted(DropOdd.seen) == [1, 2, 3, 4]
    assert (stats["success_count"], stats["failure_by_reason"]) == (2, {"NO_RESULT": 2})


def test_sequential_range_is_the_intersection_of_non_trivial_ranges():
    models = trtserve.pipe({"backend": "S[Identity,Ranged]", "hi": 6, "lo": 2, "max": 1})
    node = models.pipeline.nodes[0]
    backend = node.backend
    assert (backend.min(), backend.max()) == (2, 6)
    models.close()
    with pytest.raises(ConfigError, match="disjoint batch ranges"):
        # Identity follows the node's max (8); Ranged says [9, 12]: no overlap.
        trtserve.pipe({"backend": "S[Identity,Ranged]", "max": 8, "lo": 9, "hi": 12})


class HoldFirst(trtserve.Backend):
    """AddOne whose first batch waits for the test, so later work queues up behind it."""

    release = threading.Event()

    def forward(self, items):
        HoldFirst.release.wait(30)
        for item in items:
            item["result"] = item["data"] + 1


trtserve.register("HoldFirst", HoldFirst)


def test_multi_node_pipeline_batches_in_the_model_node():
    HoldFirst.release.clear()
    config = {
        "pre": {"backend": "S[AddOne,Mark]", "instance_num": 4, "next": "model"},
        "model": {"backend": "HoldFirst", "max": 8, "batching_timeout": 5},
    }
    with trtserve.pipe(config) as models:
        assert [n.name for n in models.pipeline.nodes] == ["pre", "model"]
        results = {}

        def worker(base):
            for i in range(40):
                item = {"data": np.array([base + i])}
                models(item)
                results[base + i] = (item["result"][0], item["marked"], item["data"][0])

        threads = [threading.Thread(target=worker, args=(t * 1000,)) for t in range(8)]
        for t in threads:
            t.start()
        model_node = models.pipeline.nodes[1]
        deadline = time.monotonic() + 10
        while model_node.queue_depth() < 4 and time.monotonic() < deadline:
            time.sleep(0.001)  # polling a condition, not timing: the assertion below needs a queue
        HoldFirst.release.set()
        for t in threads:
            t.join(60)
        stats = model_node.stats.snapshot()
    assert len(results) == 320
    assert all(res == ((key + 1) * 10 + 1, True, key) for key, res in results.items())
    assert max(int(size) for size in stats["batch_sizes"]) >= 4, stats


def test_stale_result_is_removed_and_original_data_restored():
    with trtserve.pipe({"backend": "S[AddOne,DropOdd]"}) as models:
        item = {"data": 2, "result": "stale"}
        models(item)
        assert item == {"data": 2}


def test_error_in_a_later_node_reaches_the_caller():
    class Boom(trtserve.Backend):
        def forward(self, items):
            raise ValueError("late failure")

    trtserve.register("Boom", Boom)
    config = {"a": {"backend": "AddOne", "next": "b"}, "b": {"backend": "Boom"}}
    with trtserve.pipe(config) as models:
        item = {"data": 1}
        with pytest.raises(BackendError, match="late failure"):
            models(item)
        assert item == {"data": 1}
        stats = models.pipeline.stats.snapshot()
    assert stats["failure_by_reason"] == {"BACKEND_ERROR": 1}


class Nap(trtserve.Backend):
    """Echoes data after sleeping data['sleep'] seconds."""

    def forward(self, items):
        time.sleep(items[0]["data"]["sleep"])
        for item in items:
            item["result"] = item["data"]


class BuggyValidate(trtserve.Backend):
    """A later stage whose validate has a bug: a plain exception, not InvalidInputError."""

    def validate(self, item):
        if item["data"] == "bad":
            raise KeyError("shape")

    def forward(self, items):
        for item in items:
            item["result"] = item["data"]


trtserve.register("Nap", Nap)
trtserve.register("BuggyValidate", BuggyValidate)


def test_a_nodes_queue_timeout_does_not_apply_at_the_next_node():
    """queue_timeout limits the wait in its own node's queue.  The request never waits in any
    queue here (every node idle); the first node's 50 ms limit must not fail it at the second
    after a 200 ms first stage."""
    config = {"first": {"backend": "Nap", "queue_timeout": 50, "next": "second"}, "second": {"backend": "Identity"}}
    with trtserve.pipe(config) as models:
        item = {"data": {"sleep": 0.2}}
        models(item)
        assert item["result"] == {"sleep": 0.2}


def test_a_plain_exception_admitting_at_a_later_node_fails_the_request_naming_both_nodes():
    """At the entry node the exception reaches the caller of submit; at a later node the
    request must still finish (BackendError naming the producer and the refusing node)."""
    config = {"first": {"backend": "Identity", "next": "second"}, "second": {"backend": "BuggyValidate"}}
    with trtserve.pipe(config) as models:
        done = threading.Event()
        errors = []
        models.pipeline.submit({"data": "bad"}, lambda item, error: (errors.append(error), done.set()))
        assert done.wait(10), "the request was lost: its callback never ran"
        (error,) = errors
        assert isinstance(error, BackendError)
        assert "'second'" in error.message and "'first'" in error.message and "KeyError" in error.message
        assert error.details["producer"] == "first"


def test_init_failure_is_a_typed_load_error():
    class BadInit(trtserve.Backend):
        def init(self, context):
            raise OSError("device missing")

    trtserve.register("BadInit", BadInit)
    with pytest.raises(trtserve.ModelUnavailableError, match="BadInit failed to initialise: OSError: device missing"):
        trtserve.pipe({"backend": "BadInit", "instance_num": 2})


def test_model_folder_backend_py_registers_its_backends(tmp_path):
    folder = tmp_path / "custom"
    (folder / "1").mkdir(parents=True)
    (folder / "backend.py").write_text(
        "import trtserve\n"
        "class Double(trtserve.Backend):\n"
        "    def forward(self, items):\n"
        "        for item in items:\n"
        "            item['result'] = item['data'] * 2\n"
        "trtserve.register('FolderDouble', Double)\n"
    )
    (folder / "config.toml").write_text('backend = "FolderDouble"\n')
    with trtserve.pipe(folder / "config.toml") as models:
        item = {"data": 21}
        models(item)
        assert item["result"] == 42


def test_broken_backend_py_is_a_config_error_naming_the_file(tmp_path):
    (tmp_path / "backend.py").write_text("raise ImportError('needs a package')\n")
    (tmp_path / "config.toml").write_text('backend = "Identity"\n')
    with pytest.raises(ConfigError) as info:
        trtserve.pipe(tmp_path / "config.toml")
    assert str(tmp_path / "backend.py") in info.value.message and "needs a package" in info.value.message


def test_stats_listeners_see_every_request_and_batch():
    with trtserve.pipe({"backend": "S[AddOne,DropOdd]", "max": 4}) as models:
        requests, batches = [], []
        models.pipeline.stats.add_listener(lambda q, c, err: requests.append(err))
        models.pipeline.nodes[0].stats.add_listener(lambda size, c, failed: batches.append((size, failed)))
        models([{"data": 1}, {"data": 2}])
    assert sorted(requests, key=str) == ["NO_RESULT", None]
    assert sum(size for size, _ in batches) == 2 and not any(failed for _, failed in batches)


def test_sequential_initialises_stages_last_to_first():
    order = []

    class Stage(trtserve.Backend):
        def init(self, context):
            super().init(context)
            order.append(self.name)

        def forward(self, items):
            for item in items:
                item["result"] = item["data"] + [self.name]

    for name in ("First", "Second", "Third"):
        trtserve.register(name, type(name, (Stage,), {"name": name}))
    with trtserve.pipe({"backend": "S[First,Second,Third]"}) as models:
        item = {"data": []}
        models(item)
    # TorchPipe's order: a trailing SyncTensor binds the stream before the stages use it.
    assert order == ["Third", "Second", "First"]
    assert item["result"] == ["First", "Second", "Third"]


def test_synctensor_has_a_leaf_and_a_wrapper_form():
    from trtserve.expression import ExpressionError, parse, resolve

    resolve(parse("S[DecodeTensor,ResizeTensor,CvtColorTensor,SyncTensor]"))
    resolve(parse("SyncTensor[TorchScriptTensor]"))
    with pytest.raises(ExpressionError, match="takes 0 or 1 inner backends, got 2"):
        resolve(parse("SyncTensor[Identity,Identity]"))
