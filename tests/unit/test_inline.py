"""Inline nodes (``inline = true``): batches run on the thread that dispatched them, one at a
time per instance, with the same batching rules; bursts held by ``held_dispatch`` form
batches.  Gated by events, as test_scheduler.py."""
from __future__ import annotations

import sys
import threading
import time

import pytest

import trtserve
from trtserve.errors import BackendError, ConfigError, QueueFullError, ShuttingDownError
from trtserve.hold import held_dispatch

def test_forward_runs_on_the_submitting_thread(make_pipe, probe):
    models = make_pipe(inline=True, max=4)
    item = {"data": 7}
    models(item)
    assert item["result"] == 7
    me = threading.get_ident()
    assert probe.init_threads[0] == me and probe.forward_threads[0] == {me}


def test_a_threaded_node_still_runs_on_its_instance_thread(make_pipe, probe):
    models = make_pipe(max=4)
    models({"data": 1})
    assert threading.get_ident() not in probe.forward_threads[0]


def test_a_list_forms_batches_within_max(make_pipe, probe):
    models = make_pipe(inline=True, max=4)
    items = [{"data": i} for i in range(10)]
    models(items)  # held as one burst, then run as batches of at most max
    assert [item["result"] for item in items] == list(range(10))
    assert [batch for _, batch in probe.batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lists_items_count_toward_max_queue_size(make_pipe, probe):
    models = make_pipe(inline=True, max=1, max_queue_size=2)
    items = [{"data": i} for i in range(3)]
    with pytest.raises(QueueFullError):
        models(items)
    assert [item.get("result") for item in items] == [0, 1, None]


def test_each_submit_from_one_thread_is_its_own_batch(make_pipe, probe, collector):
    models = make_pipe(inline=True, max=4)
    for key in range(3):
        models.pipeline.submit({"data": key}, collector.callback(key))
    collector.wait(0, 1, 2)
    assert probe.sizes() == [1, 1, 1]


def test_a_held_burst_forms_batches_when_it_ends(make_pipe, probe, collector):
    models = make_pipe(inline=True, max=4)
    with held_dispatch():
        for key in range(6):
            models.pipeline.submit({"data": key}, collector.callback(key))
        assert probe.sizes() == [] and models.pipeline.nodes[0].queue_depth() == 6
    collector.wait(*range(6))
    assert [batch for _, batch in probe.batches] == [[0, 1, 2, 3], [4, 5]]


def test_held_requests_count_toward_max_queue_size(make_pipe, probe, collector):
    models = make_pipe(inline=True, max=1, max_queue_size=2)
    with held_dispatch():
        models.pipeline.submit({"data": 0}, collector.callback(0))
        models.pipeline.submit({"data": 1}, collector.callback(1))
        with pytest.raises(QueueFullError):
            models.pipeline.submit({"data": 2}, collector.callback(2))
    collector.wait(0, 1)


def test_a_nested_hold_dispatches_the_node_at_its_own_end(make_pipe, probe):
    models = make_pipe(inline=True, max=8)
    done = []
    with held_dispatch():
        models.pipeline.submit({"data": "outer"}, lambda item, error: done.append(item["result"]))
        with held_dispatch():
            models.pipeline.submit({"data": "a"}, lambda item, error: done.append(item["result"]))
        assert done == ["outer", "a"] and probe.sizes() == [2]  # everything the node had queued


def test_a_drain_runs_what_a_burst_still_holds(probe):
    chain = trtserve.pipe({"backend": "Probe", "probe": probe.key, "inline": True})
    out = {}
    with held_dispatch():
        chain.pipeline.submit({"data": 1}, lambda item, error: out.__setitem__("held", (item.get("result"), error)))
        drainer = threading.Thread(target=chain.pipeline.close, kwargs={"drain": True})
        drainer.start()
        drainer.join(10)
    assert out == {"held": (1, None)}


def test_work_queued_behind_a_busy_instance_runs_on_the_thread_that_frees_it(make_pipe, probe, collector):
    models = make_pipe(inline=True, max=4)
    probe.gate.clear()
    runner = threading.Thread(target=lambda: models({"data": "A"}))
    runner.start()
    probe.wait_entered()  # A holds the only instance, on the runner thread
    for key, data in enumerate("BCD", start=1):
        models.pipeline.submit({"data": data}, collector.callback(key))  # queued: returns at once
    assert probe.sizes() == [1]
    probe.gate.set()
    collector.wait(1, 2, 3)
    runner.join(10)
    assert [batch for _, batch in probe.batches] == [["A"], ["B", "C", "D"]]
    assert probe.forward_threads[0] == {runner.ident}, "B..D run where A's batch ended"


def test_an_instance_never_runs_two_batches_at_once(make_pipe, probe):
    models = make_pipe(inline=True, max=3, instance_num=2)
    active, peak, lock = [0], [0], threading.Lock()
    original = probe.gate.wait

    def counting_wait(timeout=None):  # forward's gate: count who is inside forward
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(timeout)
        finally:
            with lock:
                active[0] -= 1

    probe.gate.wait = counting_wait
    errors = []

    def caller(seed: int) -> None:
        for n in range(60):
            items = [{"data": (seed, n, k)} for k in range(1 + (seed + n) % 3)]
            models(items if len(items) > 1 else items[0])
            if [item.get("result") for item in items] != [item["data"] for item in items]:
                errors.append(items)

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert peak[0] <= 2, f"{peak[0]} forwards ran at once on 2 instances"
    per_instance = {}
    for index, batch in probe.batches:
        per_instance[index] = per_instance.get(index, 0) + len(batch)
    assert sum(per_instance.values()) == sum(1 + (s + n) % 3 for s in range(12) for n in range(60))


def test_a_failing_batch_fails_its_callers_and_the_node_keeps_serving(make_pipe):
    models = make_pipe(inline=True, max=4)
    with pytest.raises(BackendError, match="probe asked to fail"):
        models([{"data": 1}, {"data": "raise"}])
    item = {"data": 2}
    models(item)
    assert item["result"] == 2


def test_close_waits_for_a_batch_running_on_another_thread(probe):
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "inline": True})
    probe.gate.clear()
    item = {"data": 1}
    runner = threading.Thread(target=lambda: models(item))
    runner.start()
    probe.wait_entered()
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (models.close(), closed.set()))
    closer.start()
    assert not closed.wait(0.2), "close returned while a batch was still running"
    probe.gate.set()
    assert closed.wait(10) and item["result"] == 1
    runner.join(10)
    closer.join(10)
    with pytest.raises(ShuttingDownError):
        models({"data": 2})


def test_close_from_the_nodes_own_callback_does_not_wait_for_itself(probe):
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "inline": True})
    finished = []

    def on_done(item, error):
        models.close()  # on the thread running this node's batch
        finished.append(item.get("result"))

    models.pipeline.submit({"data": 3}, on_done)
    assert finished == [3]
    with pytest.raises(ShuttingDownError):
        models({"data": 4})


@pytest.mark.parametrize("expression", ["SyncTensor[Identity]", "S[Identity,TorchScriptTensor]", "DecodeTensor"])
def test_backends_bound_to_their_instance_thread_refuse_inline(expression):
    with pytest.raises(ConfigError, match=r"inline = true .* binds per-thread state") as info:
        trtserve.pipe({"backend": expression, "inline": True})
    assert info.value.details["key"] == "inline"


def test_inline_must_be_a_boolean():
    with pytest.raises(ConfigError, match="inline must be true or false"):
        trtserve.pipe({"backend": "Identity", "inline": "yes"})


# --------------------------------------------------------------------------- found by review


class Recorder(trtserve.Backend):
    """Identity that logs its forwards and its close; data "block" waits for BLOCK."""

    log: list = []
    block = threading.Event()

    def init(self, context):
        super().init(context)
        self.index = context.instance_index

    def forward(self, items):
        for item in items:
            if item["data"] == "block":
                assert Recorder.block.wait(10)
            item["result"] = item["data"]
        Recorder.log.append(("forward ends", self.index))

    def close(self):
        Recorder.log.append(("close", self.index))


trtserve.register("Recorder", Recorder)


@pytest.fixture
def recorder():
    Recorder.log, Recorder.block = [], threading.Event()
    yield Recorder
    Recorder.block.set()


def test_pipe_called_from_an_inline_forward_runs_on_the_same_thread():
    """A forward may call another inline model's pipe(): it runs there and then."""
    inner = trtserve.pipe({"backend": "Identity", "inline": True, "max": 4})

    class Outer(trtserve.Backend):
        def forward(self, items):
            for item in items:
                nested = {"data": item["data"] * 10}
                inner(nested)
                item["result"] = nested["result"]

    trtserve.register("NestingOuter", Outer)
    with inner, trtserve.pipe({"backend": "NestingOuter", "inline": True, "max": 4}) as outer:
        items = [{"data": 1}, {"data": 2}]
        outer(items)
    assert [item["result"] for item in items] == [10, 20]


def test_close_from_a_callback_waits_for_batches_running_on_other_threads(recorder):
    models = trtserve.pipe({"backend": "Recorder", "inline": True, "instance_num": 2})
    runner = threading.Thread(target=lambda: models({"data": "block"}))
    runner.start()
    while not any(inst.running_on == runner.ident for inst in models.pipeline.nodes[0]._instances):
        assert runner.is_alive()
    threading.Timer(0.2, recorder.block.set).start()  # the other batch ends a while later
    models.pipeline.submit({"data": "go"}, lambda item, error: models.close())  # the free instance, here
    runner.join(10)
    # "block" ran on instance 0 (the runner's), "go" on instance 1 (here, where close ran)
    ends = recorder.log.index(("forward ends", 0))
    assert ("close", 0) in recorder.log and recorder.log.index(("close", 0)) > ends, recorder.log


def test_an_instance_is_marked_as_running_on_the_thread_that_runs_it():
    """A batch's end may hand the instance its next batch to another thread before the
    first thread's bookkeeping is done; the mark must stay the new runner's."""
    wrong = []
    holder = {}

    class Check(trtserve.Backend):
        def forward(self, items):
            inst = holder["models"].pipeline.nodes[0]._instances[0]
            for _ in range(50):  # let other threads run the previous batch's end meanwhile
                if inst.running_on != threading.get_ident():
                    wrong.append(inst.running_on)
                    break
            for item in items:
                item["result"] = item["data"]

    trtserve.register("RunningOnCheck", Check)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with trtserve.pipe({"backend": "RunningOnCheck", "inline": True, "max": 2}) as models:
            holder["models"] = models
            threads = [threading.Thread(target=lambda: [models({"data": n}) for n in range(400)]) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        sys.setswitchinterval(previous)
    assert wrong == []


def test_a_caller_runs_a_bounded_number_of_other_callers_batches():
    """Under sustained load from other threads, one pipe() call hands the rest of the
    node's work to the alarm thread after a few batches instead of running it all."""
    per_call = threading.local()

    class Count(trtserve.Backend):
        def forward(self, items):
            per_call.n = getattr(per_call, "n", 0) + 1
            time.sleep(0.0002)  # long enough for the other callers to queue behind it
            for item in items:
                item["result"] = item["data"]

    trtserve.register("ConvoyCount", Count)
    worst = [0]
    with trtserve.pipe({"backend": "ConvoyCount", "inline": True, "max": 4}) as models:

        def caller():
            for n in range(150):
                per_call.n = 0
                models({"data": n})
                worst[0] = max(worst[0], per_call.n)

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert 1 <= worst[0] <= 8
