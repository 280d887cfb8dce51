"""Scheduler semantics, gated by events: no test here depends on a sleep being long enough.

A large batching_timeout (60 s) is used wherever a test must show that something happened
*without* waiting: if the scheduler waited, the test would time out instead of passing.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import trtserve
from trtserve.errors import (
    BackendError,
    DeadlineExceededError,
    InvalidInputError,
    QueueFullError,
    ShuttingDownError,
)
from trtserve.request import Request

FOREVER_MS = 60_000


def submit(pipe, collector, key, data, **kw):
    return pipe.pipeline.submit({"data": data}, collector.callback(key), **kw)


def test_lone_item_is_sent_at_once_despite_a_long_timeout(make_pipe, probe):
    models = make_pipe(max=8, batching_timeout=FOREVER_MS)
    item = {"data": 1}
    done = threading.Event()
    threading.Thread(target=lambda: (models(item), done.set()), daemon=True).start()
    assert done.wait(10), "a lone item waited for the batching timeout"
    assert item["result"] == 1
    assert probe.sizes() == [1]


def test_batches_grow_while_the_instance_is_busy(make_pipe, probe, collector):
    models = make_pipe(max=4, batching_timeout=FOREVER_MS)
    probe.gate.clear()
    submit(models, collector, 0, "A")
    probe.wait_entered()  # A runs alone and holds the only instance
    for key, data in enumerate("BCDEF", start=1):
        submit(models, collector, key, data)
    assert probe.sizes() == [1], "nothing may be dispatched while the instance is busy"
    probe.gate.set()
    collector.wait(0, 1, 2, 3, 4, 5)
    # B..E fill max=4 and go at once; F is then a lone item with nothing running.
    assert [batch for _, batch in probe.batches] == [["A"], ["B", "C", "D", "E"], ["F"]]


def test_a_partial_batch_does_not_wait_out_the_window_once_arrivals_stop(make_pipe, probe, collector):
    """B and C queued while A ran, then nothing more came: waiting could not fill the
    batch, so it runs when the instance is free, not when the (endless) window ends."""
    models = make_pipe(max=4, batching_timeout=FOREVER_MS)
    probe.gate.clear()
    submit(models, collector, 0, "A")
    probe.wait_entered()
    submit(models, collector, 1, "B")
    submit(models, collector, 2, "C")
    time.sleep(0.05)  # far longer than the gap between B and C: arrivals have stopped
    probe.gate.set()
    collector.wait(0, 1, 2)
    assert [batch for _, batch in probe.batches] == [["A"], ["B", "C"]]


def test_timeout_sends_a_partial_batch(make_pipe, probe, collector):
    models = make_pipe(max=8, batching_timeout=30)
    probe.gate.clear()
    submit(models, collector, 0, "A")
    probe.wait_entered()
    submit(models, collector, 1, "B")
    submit(models, collector, 2, "C")
    probe.gate.set()
    collector.wait(1, 2)
    assert [batch for _, batch in probe.batches] == [["A"], ["B", "C"]]


def test_best_fit_prefers_the_smallest_max_that_holds_the_work(make_pipe, probe, collector):
    probe.ranges = {0: (1, 8), 1: (1, 2)}
    models = make_pipe(max=8, instance_num=2)
    probe.gate.clear()
    submit(models, collector, 0, np.zeros((1, 3)))
    probe.wait_entered()
    submit(models, collector, 1, np.zeros((5, 3)))  # only instance 0 holds 5 rows
    probe.wait_entered()
    probe.gate.set()
    collector.wait(0, 1)
    assert [(index, len(batch)) for index, batch in probe.batches] == [(1, 1), (0, 1)]


def test_free_instances_are_chosen_by_tightest_fit_and_filled_to_their_max(make_pipe, probe, collector):
    probe.ranges = {0: (1, 1), 1: (1, 4), 2: (1, 2)}
    models = make_pipe(max=4, instance_num=3)
    probe.gate.clear()
    # One item at a time while the others are busy: tightest fit first (max 1, then 2, then 4).
    for key in range(3):
        submit(models, collector, key, f"busy{key}")
        probe.wait_entered()
    assert [index for index, _ in probe.batches] == [0, 2, 1]
    for key in range(3, 12):
        submit(models, collector, key, key)
    probe.gate.set()
    collector.wait(*range(12))
    later = probe.batches[3:]
    assert sum(len(batch) for _, batch in later) == 9
    assert all(len(batch) <= probe.ranges[index][1] for index, batch in probe.batches)


def test_rows_count_toward_max(make_pipe, probe, collector):
    models = make_pipe(max=4, batching_timeout=FOREVER_MS)
    probe.gate.clear()
    submit(models, collector, 0, np.zeros((1, 2)))
    probe.wait_entered()
    submit(models, collector, 1, np.zeros((3, 2)))
    submit(models, collector, 2, np.zeros((2, 2)))  # 3 + 2 > 4: cannot join the first
    submit(models, collector, 3, np.zeros((1, 2)))
    submit(models, collector, 4, np.zeros((1, 2)))
    probe.gate.set()
    collector.wait(0, 1, 2, 3, 4)
    rows = [[d.shape[0] for d in batch] for _, batch in probe.batches]
    # [3] goes alone because [2] cannot join it; then 2 + 1 + 1 fills max exactly.
    assert rows == [[1], [3], [2, 1, 1]]


def test_request_larger_than_max_is_refused_at_submit(make_pipe, probe):
    models = make_pipe(max=4)
    with pytest.raises(InvalidInputError) as info:
        models({"data": np.zeros((5, 2))})
    assert info.value.details["request_size"] == 5 and info.value.details["max"] == 4
    assert "at most 4 rows" in info.value.message
    item = {"data": np.zeros((4, 2))}
    models(item)
    assert item["result"].shape == (4, 2) and probe.sizes() == [1]


class CountsRows(trtserve.Backend):
    """A custom request_size: data['rows'] as given (0 for an empty request, or a bug's value)."""

    def request_size(self, item):
        return item["data"]["rows"]

    def forward(self, items):
        for item in items:
            item["result"] = item["data"]


trtserve.register("CountsRows", CountsRows)


def test_a_request_of_size_zero_is_refused_at_submit_naming_request_size():
    """An empty request fits no batch: queued, it would wait for ever."""
    with trtserve.pipe({"backend": "CountsRows", "max": 4}) as models:
        with pytest.raises(InvalidInputError, match=r"CountsRows\.request_size gives 0") as info:
            models.pipeline.submit({"data": {"rows": 0}}, lambda item, error: None)
        assert info.value.details["request_size"] == 0
        assert models.pipeline.nodes[0].queue_depth() == 0


@pytest.mark.parametrize("rows", [2.0, "2", None])
def test_a_request_size_that_is_not_an_integer_is_the_backends_error(rows):
    with trtserve.pipe({"backend": "CountsRows", "max": 4}) as models:
        with pytest.raises(BackendError, match=r"CountsRows\.request_size returned .*it must return an int >= 1"):
            models({"data": {"rows": rows}})


def test_a_numpy_integer_request_size_counts_as_an_int():
    with trtserve.pipe({"backend": "CountsRows", "max": 4}) as models:
        item = {"data": {"rows": np.int64(3)}}
        models(item)
        assert item["result"] == {"rows": 3}


def test_an_exception_fails_every_item_of_its_batch_and_the_node_goes_on(make_pipe, probe, collector):
    models = make_pipe(max=4, batching_timeout=FOREVER_MS)
    probe.gate.clear()
    submit(models, collector, 0, "first")
    probe.wait_entered()
    for key, data in enumerate(["ok", "raise", "ok2", "ok3"], start=1):
        submit(models, collector, key, data)
    probe.gate.set()
    collector.wait(0, 1, 2, 3, 4)
    for key in (1, 2, 3, 4):
        item, error = collector.done[key]
        assert isinstance(error, BackendError) and "result" not in item
        assert "probe asked to fail" in error.message
    item = {"data": "after"}
    models(item)
    assert item["result"] == "after"


def test_a_callback_raising_system_exit_does_not_stop_the_instance(make_pipe, probe, collector):
    """The callback's SystemExit is logged; the instance is released and serves the next request."""
    models = make_pipe(max=1)

    def exits(item, error):
        raise SystemExit("a callback called sys.exit")

    models.pipeline.submit({"data": "A"}, exits)
    submit(models, collector, 1, "B")
    collector.wait(1)
    assert collector.done[1] == ({"data": "B", "result": "B"}, None)
    assert models.pipeline.nodes[0].busy_instances() == 0


def test_missing_result_fails_only_that_item(make_pipe, probe):
    models = make_pipe(max=4)
    items = [{"data": "a"}, {"data": "skip"}, {"data": "c"}]
    models(items)
    assert [it.get("result") for it in items] == ["a", None, "c"]
    assert "result" not in items[1]


def test_error_in_a_list_call_is_raised_after_all_items_finish(make_pipe, probe):
    models = make_pipe(max=1)
    items = [{"data": "a"}, {"data": "raise"}, {"data": "c"}]
    with pytest.raises(BackendError):
        models(items)
    assert items[0]["result"] == "a" and items[2]["result"] == "c" and "result" not in items[1]


def test_init_and_forward_run_on_the_instance_thread(make_pipe, probe):
    models = make_pipe(max=1, instance_num=3)
    probe.gate.clear()
    threads = [threading.Thread(target=models, args=({"data": i},)) for i in range(3)]
    for t in threads:
        t.start()
    probe.wait_entered(3)  # all three instances busy at once
    probe.gate.set()
    for t in threads:
        t.join(10)
    assert {i for i, _ in probe.batches} == {0, 1, 2}
    for index, idents in probe.forward_threads.items():
        assert idents == {probe.init_threads[index]}
    assert len(set(probe.init_threads.values())) == 3


def test_a_lone_requests_caller_is_woken_by_its_instance(make_pipe, probe):
    """Callers are woken on the thread that ran their batch: no extra thread hand-off."""
    models = make_pipe(max=4)
    woken_on = []
    done = threading.Event()
    models.pipeline.submit({"data": 1}, lambda item, error: (woken_on.append(threading.get_ident()), done.set()))
    assert done.wait(10)
    assert woken_on == list(probe.forward_threads[0])


class Payload:
    """Weak-referenceable data, to see when the node lets go of an item."""


def test_an_instance_lets_go_of_a_batch_once_its_callbacks_ran(make_pipe, probe, collector):
    """A finished batch is released at once, not when the next one comes: its items may
    hold GPU buffers that must be freed while their instance's stream exists."""
    import gc
    import weakref

    models = make_pipe(max=1)
    payload = Payload()
    alive = weakref.ref(payload)
    submit(models, collector, 0, payload)
    collector.wait(0)
    assert collector.done[0][1] is None
    del payload
    collector.done.clear()
    probe.batches.clear()  # the probe's own record of what it ran
    gc.collect()
    assert alive() is None, "something in the node still holds the finished batch"


def test_close_returns_after_every_callback_ran(probe, collector):
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "max": 1})
    hold = threading.Event()
    finished = []
    models.pipeline.submit({"data": "A"}, lambda item, error: (hold.wait(20), finished.append(item["result"])))
    probe.wait_entered()
    closer = threading.Thread(target=models.pipeline.close, kwargs={"drain": True})
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "close returned while a callback was still running"
    hold.set()
    closer.join(10)
    assert not closer.is_alive() and finished == ["A"]


class Sleepy(trtserve.Backend):
    """Takes 1 ms a batch, echoes data."""

    def forward(self, items):
        time.sleep(0.001)
        for item in items:
            item["result"] = item["data"]


trtserve.register("Sleepy", Sleepy)


def test_a_callback_waiting_for_another_request_of_its_node_is_served_by_the_other_instance():
    """The outer callback holds its instance while it waits for a nested request of the same
    node: the node's other instance runs it."""
    with trtserve.pipe({"backend": "Sleepy", "instance_num": 2, "max": 1}) as models:
        seen = {}
        answered = threading.Event()

        def outer(item, error):
            nested = threading.Event()
            models.pipeline.submit({"data": "nested"}, lambda i, e: nested.set())
            for n in range(6):  # queued behind it
                models.pipeline.submit({"data": n}, lambda i, e: None)
            seen["nested answered"] = nested.wait(5)
            answered.set()

        models.pipeline.submit({"data": "outer"}, outer)
        for n in range(4):
            models.pipeline.submit({"data": n}, lambda i, e: None)
        assert answered.wait(20)
        assert seen["nested answered"], "the nested request waited behind its waiter"


def test_slow_callers_still_fill_the_queue_so_max_queue_size_refuses():
    """An instance wakes its callers before it takes new work: slow callers slow the intake
    and the queue fills."""
    with trtserve.pipe({"backend": "Sleepy", "max": 1, "max_queue_size": 2}) as models:
        release = threading.Event()
        a_called = threading.Event()
        models.pipeline.submit({"data": "A"}, lambda i, e: (a_called.set(), release.wait(20)))
        assert a_called.wait(10)
        models.pipeline.submit({"data": "B"}, lambda i, e: None)  # the instance is inside A's callback
        models.pipeline.submit({"data": "C"}, lambda i, e: None)
        assert models.pipeline.nodes[0].queue_depth() == 2
        with pytest.raises(QueueFullError):
            models.pipeline.submit({"data": "D"}, lambda i, e: None)
        release.set()


def test_close_from_a_callback_returns(make_pipe, probe, collector):
    models = make_pipe(max=1)
    probe.gate.clear()
    closed = threading.Event()
    models.pipeline.submit({"data": "A"}, lambda item, error: (models.close(), closed.set()))
    probe.wait_entered()
    submit(models, collector, 1, "B")
    probe.gate.set()
    assert closed.wait(10), "close() called from a callback did not return"
    collector.wait(1)
    assert isinstance(collector.done[1][1], ShuttingDownError)


def test_queue_full_is_raised_at_submit(make_pipe, probe, collector):
    models = make_pipe(max=1, max_queue_size=1)
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    submit(models, collector, 1, "queued")
    with pytest.raises(QueueFullError) as info:
        submit(models, collector, 2, "refused")
    assert info.value.details["max_queue_size"] == 1
    probe.gate.set()
    collector.wait(0, 1)
    assert 2 not in collector.done


def test_queue_timeout_fires_while_the_instance_is_still_busy(make_pipe, probe, collector):
    models = make_pipe(max=1, queue_timeout=50)
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    submit(models, collector, 1, "waits too long")
    collector.wait(1, timeout=10)  # answered before the gate opens
    assert isinstance(collector.done[1][1], DeadlineExceededError)
    probe.gate.set()
    collector.wait(0)
    assert probe.sizes() == [1]


def _expired_behind_a_running_batch(make_pipe, probe, collector, queue_timeout: int, timeout_s: float):
    """The error of a request queued behind a batch that does not end (max 1, one instance)."""
    models = make_pipe(max=1, queue_timeout=queue_timeout)
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    submit(models, collector, 1, "waits too long", deadline=time.monotonic() + timeout_s)
    collector.wait(1, timeout=10)
    return collector.done[1][1]


def test_deadline_exceeded_names_the_queue_timeout_that_expired(make_pipe, probe, collector):
    error = _expired_behind_a_running_batch(make_pipe, probe, collector, queue_timeout=50, timeout_s=60)
    assert isinstance(error, DeadlineExceededError)
    assert "queue_timeout = 50 ms expired" in error.message and "raise queue_timeout" in error.message
    assert "add instances" in error.message and "reduce the load" in error.message
    assert error.details["limit"] == "queue_timeout" and error.details["queue_timeout_ms"] == 50


def test_deadline_exceeded_names_the_requests_own_timeout(make_pipe, probe, collector):
    error = _expired_behind_a_running_batch(make_pipe, probe, collector, queue_timeout=60_000, timeout_s=0.05)
    assert isinstance(error, DeadlineExceededError)
    assert "the request's own timeout expired" in error.message and "longer timeout" in error.message
    assert error.details["limit"] == "request timeout"


def test_cancelled_requests_are_dropped_unrun(make_pipe, probe, collector):
    models = make_pipe(max=4, batching_timeout=FOREVER_MS)
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    dropped = submit(models, collector, 1, "cancelled")
    dropped.cancel()
    submit(models, collector, 2, "kept")
    probe.gate.set()
    collector.wait(0, 2)
    assert [batch for _, batch in probe.batches] == [["running"], ["kept"]]
    assert 1 not in collector.done
    assert dropped.cancelled


def test_a_request_cancelled_with_a_reason_is_finished_with_it_and_counted(make_pipe, probe, collector):
    models = make_pipe(max=4, batching_timeout=FOREVER_MS)
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    dropped = submit(models, collector, 1, "given up")
    reason = DeadlineExceededError("the caller's own deadline passed")
    dropped.cancel(reason)
    collector.wait(1, timeout=10)  # finished at once, while the instance is still busy
    assert collector.done[1][1] is reason
    probe.gate.set()
    collector.wait(0)
    assert [batch for _, batch in probe.batches] == [["running"]]
    stats = models.pipeline.stats.snapshot()
    assert stats["success_count"] == 1 and stats["failure_by_reason"] == {"DEADLINE_EXCEEDED": 1}
    dropped.cancel(reason)  # cancelling again, or after the end, finishes nothing twice
    assert models.pipeline.stats.snapshot()["failure_count"] == 1


def test_a_request_cancelled_before_it_is_queued_never_counts_toward_min(make_pipe, probe, collector):
    """A cancel that runs before the node queues the request (between two nodes) has no node
    to withdraw it from; the node must not queue it, or it would count toward min and its
    batch run below min once it is dropped."""
    models = make_pipe(min=2, max=2)
    node = models.pipeline.nodes[0]
    gone = Request({"data": "gone"}, collector.callback(0))
    gone.cancel()
    node.submit(gone)
    node.submit(Request({"data": "kept"}, collector.callback(1)))
    assert node.queue_depth() == 1 and probe.sizes() == []  # "kept" waits for a second request
    node.submit(Request({"data": "pair"}, collector.callback(2)))
    collector.wait(1, 2)
    assert [batch for _, batch in probe.batches] == [["kept", "pair"]]
    assert 0 not in collector.done  # cancelled without a reason: never finished


def test_a_request_cancelled_with_a_reason_before_it_is_queued_is_finished_with_it(make_pipe, probe, collector):
    models = make_pipe(max=1)
    gone = Request({"data": "gone"}, collector.callback(0))
    reason = DeadlineExceededError("the caller's own deadline passed")
    gone.cancel(reason)
    models.pipeline.nodes[0].submit(gone)
    collector.wait(0)
    assert collector.done[0][1] is reason and probe.batches == []


def test_close_fails_queued_requests_and_refuses_new_ones(probe, collector):
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "max": 1})
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    submit(models, collector, 1, "queued")
    closer = threading.Thread(target=models.close)
    closer.start()
    collector.wait(1)
    assert isinstance(collector.done[1][1], ShuttingDownError)
    probe.gate.set()
    closer.join(10)
    assert collector.done[0][0]["result"] == "running"  # in-flight work finished
    with pytest.raises(ShuttingDownError):
        models({"data": "late"})


def test_pipe_is_safe_from_many_threads(make_pipe, probe):
    models = make_pipe(max=8, instance_num=2, batching_timeout=1)
    results, errors = {}, []

    def worker(tid):
        try:
            for i in range(50):
                if i % 2:
                    item = {"data": (tid, i)}
                    models(item)
                    results[(tid, i)] = item["result"]
                else:
                    items = [{"data": (tid, i, j)} for j in range(3)]
                    models(items)
                    for it in items:
                        results[it["data"]] = it["result"]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 16 * (25 + 25 * 3)
    assert all(key == value for key, value in results.items())


def test_higher_priority_is_served_first(make_pipe, probe, collector):
    models = make_pipe(max=1, priority_levels=3)
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    for key, (data, priority) in enumerate([("low", 3), ("default", 0), ("high", 1), ("mid", 2)], start=1):
        submit(models, collector, key, data, priority=priority)
    probe.gate.set()
    collector.wait(0, 1, 2, 3, 4)
    # FIFO within a level; the default level is the lowest (3).
    assert [batch[0] for _, batch in probe.batches] == ["running", "high", "mid", "low", "default"]


@pytest.mark.parametrize("priority", [4, -1, "1", True, None, False, 0.0, ""])
def test_priority_out_of_range_is_refused(make_pipe, probe, collector, priority):
    models = make_pipe(priority_levels=3)
    with pytest.raises(trtserve.InvalidArgumentError, match="priority .* is out of range"):
        submit(models, collector, 0, "x", priority=priority)


def test_drain_runs_queued_work_before_closing(probe, collector):
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "max": 1})
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    submit(models, collector, 1, "queued")
    closer = threading.Thread(target=models.pipeline.close, kwargs={"drain": True})
    closer.start()
    probe.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert [collector.done[k][0].get("result") for k in (0, 1)] == ["running", "queued"]
    with pytest.raises(ShuttingDownError):
        models({"data": "late"})


def test_drain_sends_partial_batches_without_waiting_for_the_timeout(probe, collector):
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "max": 4, "batching_timeout": FOREVER_MS})
    probe.gate.clear()
    submit(models, collector, 0, "running")
    probe.wait_entered()
    submit(models, collector, 1, "a")
    submit(models, collector, 2, "b")
    closer = threading.Thread(target=models.pipeline.close, kwargs={"drain": True})
    closer.start()
    probe.gate.set()
    closer.join(10)
    assert not closer.is_alive(), "drain waited for the batching timeout"
    assert [batch for _, batch in probe.batches] == [["running"], ["a", "b"]]


def two_nodes(probe):
    """Probe (gated) -> Identity, each node with its own scheduler."""
    return trtserve.pipe({"first": {"backend": "Probe", "probe": probe.key, "next": "second"},
                          "second": {"backend": "Identity"}})


def test_a_request_cancelled_while_a_stage_runs_never_enters_the_next(probe, collector):
    models = two_nodes(probe)
    try:
        probe.gate.clear()
        req = submit(models, collector, 0, "given up mid-way")
        probe.wait_entered()
        reason = DeadlineExceededError("the caller's own deadline passed")
        req.cancel(reason)
        probe.gate.set()
        collector.wait(0)
        item, error = collector.done[0]
        assert error is reason and "result" not in item
        assert models.pipeline.nodes[1].stats.snapshot()["batches"] == 0, "the second node ran it"
        assert models.pipeline.stats.snapshot()["failure_by_reason"] == {"DEADLINE_EXCEEDED": 1}
    finally:
        probe.gate.set()
        models.close()


def test_a_request_whose_deadline_passed_in_a_stage_fails_at_the_next(probe, collector):
    """Even when the next node is idle with an empty queue (its fast start path)."""
    models = two_nodes(probe)
    try:
        probe.gate.clear()
        submit(models, collector, 0, "late", deadline=time.monotonic() + 0.05)
        probe.wait_entered()
        time.sleep(0.1)  # the deadline passes while the first stage runs
        probe.gate.set()
        collector.wait(0)
        assert isinstance(collector.done[0][1], DeadlineExceededError)
        assert models.pipeline.nodes[1].stats.snapshot()["batches"] == 0, "the second node ran it"
    finally:
        probe.gate.set()
        models.close()


def test_queue_and_compute_time_are_measured(make_pipe, probe, collector):
    """B waits in the queue while A's forward is held: the statistics' queue time covers at
    least B's wait and the compute time at least A's hold, both measured by the test."""
    models = make_pipe(max=1)
    probe.gate.clear()
    submit(models, collector, 0, "A")
    probe.wait_entered()
    held_from = time.monotonic()
    submit(models, collector, 1, "B")
    queued_from = time.monotonic()
    time.sleep(0.05)
    held_for = time.monotonic() - held_from
    queued_for = time.monotonic() - queued_from
    probe.gate.set()
    collector.wait(0, 1)
    stats = models.pipeline.stats.snapshot()
    assert stats["queue_ns"] >= queued_for * 1e9, stats
    assert stats["compute_ns"] >= held_for * 1e9, stats
    assert stats["queue_ns"] < 10e9 and stats["compute_ns"] < 10e9, stats  # not garbage either


def test_a_cancel_racing_a_dispatch_is_still_finished_once(make_pipe, probe, collector):
    """The canceller sets the flag, then a dispatch pops the request before withdraw runs:
    the dispatch finishes it with the reason (else nobody would, and it would go uncounted)."""
    models = make_pipe(max=1, batching_timeout=FOREVER_MS)
    node = models.pipeline.nodes[0]
    probe.gate.clear()
    submit(models, collector, 0, "A")
    probe.wait_entered()
    b = submit(models, collector, 1, "B")
    go, withdraw = threading.Event(), node.withdraw
    node.withdraw = lambda req: (go.wait(10), withdraw(req))  # the canceller stalls here
    reason = DeadlineExceededError("the caller gave up")
    canceller = threading.Thread(target=b.cancel, args=(reason,))
    canceller.start()
    while not b.cancelled:
        time.sleep(0.001)
    probe.gate.set()  # A finishes; its dispatch pops B, cancelled
    collector.wait(0, 1)
    go.set()
    canceller.join(10)
    assert collector.done[1][1] is reason
    assert [batch for _, batch in probe.batches] == [["A"]]
    assert models.pipeline.stats.snapshot()["failure_by_reason"] == {"DEADLINE_EXCEEDED": 1}
