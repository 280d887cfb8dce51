"""Deferred completion (trtserve/completion.py): a forward that returns a Completion before
its batch is done.  The "device" here is a real worker thread per instance that finishes
each batch a few milliseconds later, as a GPU stream would; SyncTensor's ``overlap`` is the
production user (tests/gpu)."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

import trtserve
from trtserve import Backend, Completion
from trtserve.errors import BackendError, ConfigError, InvalidInputError, ModelUnavailableError

pytestmark = pytest.mark.timeout(60)
DEVICE_MS = 4.0
SLOW_MS = 300.0  # LateDouble's device time for inputs >= 1000


class LateDouble(Backend):
    """Doubles ``data`` on a worker thread DEVICE_MS after forward returns.  Records how many
    of its batches are in flight, and whether a forward started before the previous batch
    finished (the overlap this is for).  ``data`` < 0 makes the batch fail on the worker."""

    def init(self, context):
        super().init(context)
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        self.worker = threading.Thread(target=self._device, daemon=True)
        self.worker.start()
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.overlapped = 0
        self.closed_with_work_in_flight = False

    def _device(self):
        while (job := self.work.get()) is not None:
            items, done, outcome = job
            slow = any(float(np.max(i["data"])) >= 1000 for i in items)
            time.sleep((SLOW_MS if slow else DEVICE_MS) / 1e3)
            if any(float(np.min(i["data"])) < 0 for i in items):
                outcome["error"] = RuntimeError("the device rejected a negative input")
            else:
                for item in items:
                    item["result"] = item["data"] * 2
            with self.lock:
                self.in_flight -= 1
            done.set()

    def forward(self, items):
        with self.lock:
            self.overlapped += self.in_flight > 0
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        done, outcome = threading.Event(), {}
        self.work.put((items, done, outcome))

        def finish():
            assert done.wait(10), "the device never finished"
            if "error" in outcome:
                raise outcome["error"]

        return Completion(finish)

    def close(self):
        with self.lock:
            self.closed_with_work_in_flight = self.in_flight > 0
        self.work.put(None)
        super().close()


trtserve.register("LateDouble", LateDouble)


def backends(models):
    return [inst.backend for inst in models.pipeline.nodes[0]._instances]


def call_from_threads(models, threads=16, calls=20):
    failures = []

    def worker(t):
        for step in range(calls):
            x = np.full((1, 3), float(t * 10 + step), np.float32)
            item = {"data": x}
            models(item)
            if not np.array_equal(item.get("result"), x * 2):
                failures.append((t, step, item.get("result")))

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return failures


def test_each_caller_gets_its_own_result_and_instances_overlap_at_most_two_batches():
    with trtserve.pipe({"backend": "LateDouble", "instance_num": 2, "max": 4, "batching_timeout": 1}) as models:
        failures = call_from_threads(models)
        parts = backends(models)
        stats = models.pipeline.nodes[0].stats.snapshot()
    assert not failures, failures[:3]
    assert all(b.most_in_flight <= 2 for b in parts), [b.most_in_flight for b in parts]
    assert sum(b.overlapped for b in parts) > 0, "no forward ever started while the previous batch ran"
    # compute time runs from the enqueue to the completion, so it includes the device time
    assert stats["compute_ns"] / stats["batches"] >= DEVICE_MS * 0.9e6, stats


def test_a_failed_completion_fails_its_batch_with_a_backend_error_and_later_batches_run():
    with trtserve.pipe({"backend": "LateDouble", "max": 4}) as models:
        with pytest.raises(BackendError, match="negative input") as caught:
            models({"data": -np.ones((1, 3), np.float32)})
        assert caught.value.details["exception"] == "RuntimeError"
        good = {"data": np.ones((1, 3), np.float32)}
        models(good)
        assert np.array_equal(good["result"], good["data"] * 2)
        assert models.pipeline.nodes[0].stats.snapshot()["failed_batches"] == 1


def test_a_typed_error_from_a_completion_reaches_the_caller_unchanged():
    class Refuses(LateDouble):
        def forward(self, items):
            super().forward(items)

            def finish():
                raise InvalidInputError("refused late", backend="Refuses")

            return Completion(finish)

    trtserve.register("RefusesLate", Refuses)
    with trtserve.pipe({"backend": "RefusesLate"}) as models:
        with pytest.raises(InvalidInputError, match="refused late"):
            models({"data": np.ones((1, 3), np.float32)})


def test_close_waits_for_the_batches_in_flight_before_closing_the_backend():
    models = trtserve.pipe({"backend": "LateDouble", "instance_num": 1, "max": 1})
    (backend,) = backends(models)
    outcomes = []
    for _ in range(4):  # no waiting: close comes while batches are still on the "device"
        models.pipeline.submit({"data": np.ones((1, 3), np.float32)}, lambda item, error: outcomes.append((item, error)))
    models.pipeline.close(drain=True)
    assert not backend.closed_with_work_in_flight
    assert len(outcomes) == 4 and all(error is None and item["result"][0, 0] == 2 for item, error in outcomes)


def test_an_inline_node_waits_for_its_completion_on_the_calling_thread():
    with trtserve.pipe({"backend": "LateDouble", "inline": True, "max": 4}) as models:
        assert not call_from_threads(models, threads=4, calls=5)
        (backend,) = backends(models)
    assert backend.most_in_flight == 1  # nothing overlaps: each batch ends where it ran


def test_completion_wait_runs_finish_once_and_repeats_its_outcome():
    calls = []

    def finish():
        calls.append(1)
        raise BackendError("gone", backend="x")

    completion = Completion(finish)
    for _ in range(3):
        with pytest.raises(BackendError, match="gone"):
            completion.wait()
    assert calls == [1]


def test_completion_repeats_a_base_exception_to_every_waiter():
    """A SystemExit from finish is the batch's outcome too: a later wait() must not read as success."""
    def finish():
        raise SystemExit("device lost")

    completion = Completion(finish)
    for _ in range(2):
        with pytest.raises(SystemExit, match="device lost"):
            completion.wait()


@pytest.mark.parametrize("backend", ["S[Identity,SyncTensor]", "S[SyncTensor[Identity],Identity]"])
def test_sync_tensor_overlap_needs_the_wrapper_form_as_the_whole_node(backend):
    """A config error on any machine: the check runs before SyncTensor looks for a GPU."""
    with pytest.raises(ConfigError, match="overlap = true needs SyncTensor to wrap the whole node") as caught:
        trtserve.pipe({"backend": backend, "overlap": True})
    assert caught.value.details["key"] == "overlap"


def test_sync_tensor_overlap_in_the_right_form_is_only_unavailable_without_a_gpu():
    from trtserve import cuda

    if cuda.is_available():
        pytest.skip("a CUDA device is present: tests/gpu runs overlap for real")
    with pytest.raises(ModelUnavailableError, match="no CUDA device"):
        trtserve.pipe({"backend": "SyncTensor[Identity]", "overlap": True})


def test_a_callback_calling_the_same_model_is_served_by_the_other_instance():
    """The instance wakes its callers before it counts as free, as on the plain path, so a
    nested call from a callback goes to the other instance instead of waiting behind it."""
    with trtserve.pipe({"backend": "LateDouble", "instance_num": 2, "max": 1}) as models:
        nested_done = threading.Event()

        def callback(item, error):
            models({"data": np.ones((1, 3), np.float32)})
            nested_done.set()

        models.pipeline.submit({"data": np.ones((1, 3), np.float32)}, callback)
        assert nested_done.wait(5), "the nested call never ran"


def test_a_slow_batch_on_one_instance_does_not_delay_the_callers_of_another():
    with trtserve.pipe({"backend": "LateDouble", "instance_num": 2, "max": 1}) as models:
        fast_done = threading.Event()
        models.pipeline.submit({"data": np.full((1, 3), 1000.0, np.float32)}, lambda item, error: None)
        time.sleep(0.02)  # the slow batch is on the device
        started = time.monotonic()
        models.pipeline.submit({"data": np.ones((1, 3), np.float32)}, lambda item, error: fast_done.set())
        assert fast_done.wait(5)
        waited_ms = (time.monotonic() - started) * 1e3
    assert waited_ms < SLOW_MS / 2, f"the fast request waited {waited_ms:.0f} ms behind the slow batch"


def test_slow_callers_still_slow_the_intake_so_max_queue_size_keeps_its_meaning():
    """Each instance wakes its own callers before it takes more work: with callbacks slower
    than the device, the queue fills and submits are refused instead of piling up answers."""
    from trtserve.errors import QueueFullError

    refused, backlog = 0, []
    with trtserve.pipe({"backend": "LateDouble", "max": 1, "max_queue_size": 4}) as models:
        def slow_callback(item, error):
            time.sleep(0.01)

        for _ in range(60):
            try:
                models.pipeline.submit({"data": np.ones((1, 3), np.float32)}, slow_callback)
            except QueueFullError:
                refused += 1
            backlog.append(models.pipeline.nodes[0].queue_depth())
            time.sleep(0.002)
    assert refused > 0 and max(backlog) <= 4, (refused, max(backlog))


def test_sync_tensor_overlap_must_be_a_bool():
    with pytest.raises(ConfigError, match="overlap") as caught:
        trtserve.pipe({"backend": "SyncTensor[Identity]", "overlap": "yes"})
    assert caught.value.details["key"] == "overlap"


class GatedDevice(Backend):
    """A device the test drives: batch ``x``'s forward (``data`` = x) returns at once, but
    batch 1's forward first waits for ``go`` (so the test queues batches behind it), and
    batch ``x`` finishes only when ``finish[x]`` is set.  ``log`` records the order."""

    def init(self, context):
        super().init(context)
        self.log: list[tuple[str, int]] = []
        self.entered, self.go = threading.Event(), threading.Event()
        self.finish = {x: threading.Event() for x in (1, 2, 3)}

    def forward(self, items):
        x = int(items[0]["data"][0, 0])
        self.log.append(("forward", x))
        if x == 1:
            self.entered.set()
            assert self.go.wait(10), "the test never let batch 1 go"

        def finish():
            assert self.finish[x].wait(10), f"the test never finished batch {x}"
            self.log.append(("finished", x))
            for item in items:
                item["result"] = item["data"]

        return Completion(finish)


trtserve.register("GatedDevice", GatedDevice)


def wait_for(condition, what):
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def test_with_batches_queued_an_instance_launches_the_next_before_waiting_for_the_previous():
    with trtserve.pipe({"backend": "GatedDevice", "instance_num": 1, "max": 1}) as models:
        (device,) = backends(models)
        done = []
        for x in (1, 2, 3):
            models.pipeline.submit({"data": np.full((1, 1), x, np.float32)}, lambda item, error: done.append(item["data"][0, 0]))
            if x == 1:
                assert device.entered.wait(10)  # 2 and 3 queue behind a running batch 1
        device.go.set()
        wait_for(lambda: ("forward", 2) in device.log, "batch 2's forward")
        assert ("finished", 1) not in device.log  # launched while batch 1 is still on the device
        time.sleep(0.05)
        assert ("forward", 3) not in device.log  # at most two batches of an instance in flight
        device.finish[1].set()
        wait_for(lambda: ("forward", 3) in device.log, "batch 3's forward")
        assert ("finished", 2) not in device.log  # again: 3 launched before 2 is waited for
        assert done == [1]  # batch 1's caller was woken before the instance took batch 3
        device.finish[2].set()
        device.finish[3].set()
        wait_for(lambda: len(done) == 3, "every caller")
    assert device.log == [("forward", 1), ("forward", 2), ("finished", 1), ("forward", 3), ("finished", 2), ("finished", 3)]
