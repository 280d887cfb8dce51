"""Inline nodes (``inline = true``): batches run on the thread that dispatched them, one at a
time per instance, with the same batching rules; bursts held by ``held_dispatch`` form
batches.  Gated by events, as test_scheduler.py."""
from __future__ import annotations

import threading

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
    models(items)  # held as one burst, then dispatched as batches of at most max
    assert [item["result"] for item in items] == list(range(10))
    assert [batch for _, batch in probe.batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_without_a_hold_each_submit_is_its_own_batch(make_pipe, probe, collector):
    models = make_pipe(inline=True, max=4)
    for key in range(3):
        models.pipeline.submit({"data": key}, collector.callback(key))
    collector.wait(0, 1, 2)
    assert probe.sizes() == [1, 1, 1]


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


def test_the_batching_timeout_runs_a_partial_batch_on_the_timer_thread(make_pipe, probe):
    models = make_pipe(inline=True, max=4, batching_timeout=20)
    items = [{"data": 1}, {"data": 2}]
    models(items)  # two held requests below max: due only when the timeout passes
    assert [item["result"] for item in items] == [1, 2]
    assert probe.sizes() == [2]
    (thread,) = probe.forward_threads[0]
    assert thread != threading.get_ident()
    assert any(t.ident == thread and t.name.endswith("-timer") for t in threading.enumerate())


def test_held_requests_count_toward_max_queue_size(make_pipe, probe):
    models = make_pipe(inline=True, max=1, max_queue_size=2)
    items = [{"data": i} for i in range(3)]
    with pytest.raises(QueueFullError):
        models(items)
    assert [item.get("result") for item in items] == [0, 1, None]


def test_nested_holds_join_the_outer_one(make_pipe, probe):
    models = make_pipe(inline=True, max=8)
    done = []
    with held_dispatch():
        with held_dispatch():
            models.pipeline.submit({"data": "a"}, lambda item, error: done.append(item["result"]))
        assert done == [] and probe.sizes() == []  # the inner exit releases nothing
        models.pipeline.submit({"data": "b"}, lambda item, error: done.append(item["result"]))
    assert done == ["a", "b"] and probe.sizes() == [2]


def test_a_chain_of_inline_nodes_keeps_its_batches(probe):
    config = {
        "first": {"backend": "Probe", "probe": probe.key, "inline": True, "max": 8, "next": "second"},
        "second": {"backend": "Probe", "probe": probe.key, "inline": True, "max": 8},
    }
    with trtserve.pipe(config) as models:
        items = [{"data": i} for i in range(5)]
        models(items)
    assert [item["result"] for item in items] == list(range(5))
    assert probe.sizes() == [5, 5], "the second node got the first node's batch as one burst"


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
