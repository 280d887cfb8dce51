"""Reproductions from a line-by-line review of the runtime core (node, instances, batching,
alarm, hold, queues, request, completion, pipeline).  Each test states the intended
behaviour (docs/ARCHITECTURE.md, docs/configuration.md) and fails on main at the time of
the review.  Hangs are turned into failures with joins that time out (daemon threads)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

import trtserve
from trtserve import Backend, Completion
from trtserve.errors import DeadlineExceededError, ShuttingDownError, TrtserveError
from trtserve.request import Request

pytestmark = pytest.mark.timeout(60)


class Echo(Backend):
    """Echoes data; sleeps ``data['sleep']`` seconds when data is a dict with that key."""

    def forward(self, items):
        for item in items:
            data = item["data"]
            if isinstance(data, dict) and "sleep" in data:
                time.sleep(data["sleep"])
            item["result"] = data


class SlowEcho(Backend):
    """Echoes data after 1 ms per batch: "light post-processing" on an inline node."""

    def forward(self, items):
        data = items[0]["data"]
        time.sleep(data["sleep"] if isinstance(data, dict) else 0.001)
        for item in items:
            item["result"] = item["data"]


class Picky(Backend):
    """A later stage whose validate has a bug: a plain exception, not InvalidInputError."""

    def validate(self, item):
        if item["data"] == "bad":
            raise KeyError("shape")

    def forward(self, items):
        for item in items:
            item["result"] = item["data"]


class ZeroRows(Backend):
    """A custom request_size that says 0 for an empty batch of rows."""

    def request_size(self, item):
        return len(item["data"])

    def forward(self, items):
        for item in items:
            item["result"] = item["data"]


class Gated(Backend):
    """Records batch sizes; the first forward waits on the class gate."""

    gate = threading.Event()
    entered = threading.Event()
    sizes: list[int] = []

    def forward(self, items):
        type(self).sizes.append(len(items))
        type(self).entered.set()
        assert type(self).gate.wait(30)
        for item in items:
            item["result"] = item["data"]


for _name, _cls in [("ReviewEcho", Echo), ("ReviewSlowEcho", SlowEcho), ("ReviewPicky", Picky),
                    ("ReviewZeroRows", ZeroRows), ("ReviewGated", Gated)]:
    trtserve.register(_name, _cls)


def finished_event():
    done = threading.Event()
    box = {}

    def on_done(item, error):
        box.setdefault("calls", []).append(error)
        done.set()

    return done, box, on_done


# -- 1. close(drain=True) never returns while a queued request is below every min --------------
@pytest.mark.parametrize("inline", [False, True])
def test_drain_returns_when_queued_requests_are_below_min(inline):
    """min = 2: a lone request waits for a second one.  A drain ("every queued request
    still runs first", "no more work is coming") cannot make it a batch of 2; it must
    still return and finish the request (run it or fail it), not wait forever."""
    models = trtserve.pipe({"backend": "ReviewEcho", "min": 2, "max": 4, "inline": inline})
    done, box, on_done = finished_event()
    models.pipeline.submit({"data": 1}, on_done)
    assert models.pipeline.nodes[0].queue_depth() == 1  # waiting for a second request
    closer = threading.Thread(target=models.pipeline.close, kwargs={"drain": True}, daemon=True)
    closer.start()
    closer.join(3)
    assert not closer.is_alive(), "close(drain=True) hangs: the queued request is below min forever"
    assert done.wait(1), "the queued request was never finished"


# -- 2. close(drain=True) from a threaded node's own callback deadlocks ----------------------
def test_drain_from_a_callback_of_a_threaded_node_returns():
    """close() from a callback returns (test_close_from_a_callback_returns); with drain=True
    on a threaded node it waits for busy == 0 while its own instance is busy running it."""
    models = trtserve.pipe({"backend": "ReviewEcho", "max": 1})
    closed = threading.Event()

    def on_done(item, error):
        models.pipeline.close(drain=True)
        closed.set()

    models.pipeline.submit({"data": 1}, on_done)
    assert closed.wait(3), "close(drain=True) from the node's own callback deadlocked its instance thread"


# -- 3. queue_timeout of one node becomes a deadline at the next -----------------------------
def test_a_nodes_queue_timeout_does_not_expire_the_request_at_the_next_node():
    """queue_timeout is "ms a request may wait in the queue" of its node.  Here the request
    never waits in any queue (every node idle), but the first node's queue deadline is
    written into req.deadline and the second node fails it after the first's compute."""
    models = trtserve.pipe({
        "first": {"backend": "ReviewEcho", "queue_timeout": 50, "next": "second"},
        "second": {"backend": "ReviewEcho"},
    })
    try:
        item = {"data": {"sleep": 0.2}}  # the first stage computes for 200 ms
        models(item)  # raises DeadlineExceededError on main
        assert item["result"] == {"sleep": 0.2}
    finally:
        models.close()


# -- 4. Completion: a BaseException from finish is not repeated to later waiters ------------
def test_completion_repeats_a_base_exception_to_every_waiter():
    """"later callers get the same outcome": after finish raised SystemExit, a second
    wait() returns normally, as if the batch had succeeded."""
    def finish():
        raise SystemExit("device lost")

    completion = Completion(finish)
    with pytest.raises(SystemExit):
        completion.wait()
    with pytest.raises(BaseException):
        completion.wait()  # returns None on main: the failure reads as success


# -- 5. a plain exception in a later node's validate loses the request ----------------------
def test_a_plain_exception_in_a_later_stages_validate_still_finishes_the_request():
    """At the entry node the exception reaches the caller; at a later node it escapes
    Pipeline._stage_done into Node._finish, which logs it, and the caller is never called."""
    models = trtserve.pipe({
        "first": {"backend": "ReviewEcho", "next": "second"},
        "second": {"backend": "ReviewPicky"},
    })
    try:
        done, box, on_done = finished_event()
        models.pipeline.submit({"data": "bad"}, on_done)
        assert done.wait(3), "the request was lost: its callback never ran"
        assert isinstance(box["calls"][0], TrtserveError)
    finally:
        models.close()


# -- 6. request_size 0 hangs a request forever ------------------------------------------------
def test_a_request_of_size_zero_is_refused_or_run_not_stranded():
    """A custom request_size of 0 (an empty array of rows) passes the `size > max` check,
    fits no instance's [min, max] and best_fit skips it (size < lo): it waits in the queue
    forever, with no error for the caller or the backend author."""
    with trtserve.pipe({"backend": "ReviewZeroRows", "max": 4}) as models:
        done, box, on_done = finished_event()
        try:
            models.pipeline.submit({"data": []}, on_done)
        except TrtserveError:
            return  # refused at submit, naming request_size: fine
        assert done.wait(3), (f"a request of size 0 is stranded in the queue "
                              f"(queue depth {models.pipeline.nodes[0].queue_depth()})")


# -- 7. a cancelled request still queued counts toward min -----------------------------------
def test_a_cancelled_request_does_not_make_a_batch_below_min():
    """cancel() that runs before the request is queued (the window in Pipeline._stage_done
    between its `cancelled` check and the next node's submit) leaves it in the queue; it
    counts toward min, then is dropped from the batch, which runs below min."""
    Gated.sizes.clear()
    Gated.gate.set()
    with trtserve.pipe({"backend": "ReviewGated", "min": 2, "max": 2}) as models:
        node = models.pipeline.nodes[0]
        gone = Request({"data": "gone"}, lambda r, e: None)
        gone.cancel()  # owner is None: nothing withdraws it later
        node.submit(gone)
        done, box, on_done = finished_event()
        node.submit(Request({"data": "kept"}, on_done))
        done.wait(2)
        assert 1 not in Gated.sizes, f"forward got a batch of 1 on a node with min = 2: {Gated.sizes}"


# -- 8. SystemExit in a callback kills a threaded instance and leaks it as busy ---------------
def test_system_exit_in_a_callback_does_not_leak_the_instance_as_busy():
    """Node._finish catches Exception only; a SystemExit from on_done ends the instance
    thread with the instance marked busy, and every later request of the node waits forever."""
    with trtserve.pipe({"backend": "ReviewEcho", "max": 1}) as models:
        node = models.pipeline.nodes[0]

        def exits(item, error):
            raise SystemExit("a callback called sys.exit")

        models.pipeline.submit({"data": 1}, exits)
        done, box, on_done = finished_event()
        models.pipeline.submit({"data": 2}, on_done)
        assert done.wait(3), (f"the next request never ran: busy instances = {node.busy_instances()}, "
                              f"queue depth = {node.queue_depth()}")


# -- 9. a BaseException on the alarm thread stops every node's deadlines ---------------------
def test_the_alarm_thread_survives_a_base_exception_in_a_callback():
    """A request that expires is failed on the alarm thread (Node.wake -> _fail_expired ->
    on_done).  Alarm._run catches Exception only: a callback raising SystemExit ends the
    process-wide thread, and no queued request of any node ever expires again."""
    script = textwrap.dedent("""
        import threading, time, sys
        import trtserve
        from trtserve import Backend

        gate = threading.Event()

        class Hold(Backend):
            def forward(self, items):
                gate.wait(30)
                for i in items:
                    i["result"] = i["data"]

        trtserve.register("Hold", Hold)
        a = trtserve.pipe({"backend": "Hold", "max": 1})
        a.pipeline.submit({"data": "busy"}, lambda i, e: None)
        time.sleep(0.05)

        def exits(item, error):
            raise SystemExit("callback exits")

        a.pipeline.submit({"data": "x"}, exits, deadline=time.monotonic() + 0.05)
        time.sleep(0.3)
        expired = threading.Event()
        a.pipeline.submit({"data": "y"}, lambda i, e: expired.set(), deadline=time.monotonic() + 0.05)
        ok = expired.wait(2)
        gate.set()
        from trtserve.alarm import ALARM
        print("EXPIRED" if ok else "NEVER-EXPIRED", "alarm alive:", ALARM._thread.is_alive())
        sys.stdout.flush()
        import os; os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert "EXPIRED" in out.stdout and "NEVER" not in out.stdout, (out.stdout, out.stderr[-2000:])


# -- 10. the alarm thread is monopolised by one inline node's backlog -----------------------
def test_an_inline_backlog_does_not_hold_the_alarm_thread_from_other_nodes():
    """Node.wake runs run_due(limit=None) on the shared alarm thread.  Once an inline node's
    backlog is handed to the alarm (COMBINE_LIMIT reached), the alarm runs all of it before
    it wakes anyone else: another node's queued request passes its deadline unnoticed."""
    inline = trtserve.pipe({"backend": "ReviewSlowEcho", "inline": True, "max": 1})
    other = trtserve.pipe({"backend": "ReviewGated", "max": 1})
    Gated.gate.clear()
    Gated.entered.clear()
    try:
        other.pipeline.submit({"data": "busy"}, lambda i, e: None)
        assert Gated.entered.wait(5)
        # Keep the inline node's only instance busy on a helper thread while a backlog queues.
        node = inline.pipeline.nodes[0]
        helper = threading.Thread(target=lambda: inline({"data": {"sleep": 0.2}}), daemon=True)
        helper.start()
        time.sleep(0.05)
        for n in range(1500):
            inline.pipeline.submit({"data": n}, lambda i, e: None)
        helper.join(10)  # after 8 batches it handed the rest (~1.5 s of 1 ms batches) to the alarm
        assert node.queue_depth() > 1000
        expired = threading.Event()
        start = time.monotonic()
        other.pipeline.submit({"data": "late"}, lambda i, e: expired.set(), deadline=start + 0.05)
        assert expired.wait(5)
        late_by = time.monotonic() - start - 0.05
        assert late_by < 0.3, f"the other node's deadline fired {late_by * 1e3:.0f} ms late (alarm busy)"
    finally:
        Gated.gate.set()
        inline.close()
        other.close()


# -- 11. a second close() returns while the first is still waiting for running work ----------
def test_a_second_close_waits_like_the_first():
    """close() "returns only after every callback ran"; a concurrent second close() sees
    _closed and returns at once, while a batch is still running (a reload racing a
    shutdown then frees the model's code under a running forward)."""
    Gated.gate.clear()
    Gated.entered.clear()
    models = trtserve.pipe({"backend": "ReviewGated", "max": 1})
    try:
        models.pipeline.submit({"data": 1}, lambda i, e: None)
        assert Gated.entered.wait(5)
        first = threading.Thread(target=models.pipeline.close, daemon=True)
        first.start()
        time.sleep(0.05)
        second_done = threading.Event()
        threading.Thread(target=lambda: (models.pipeline.close(), second_done.set()), daemon=True).start()
        assert not second_done.wait(0.3), "the second close() returned while a batch was running"
    finally:
        Gated.gate.set()
