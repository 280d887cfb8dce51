"""The process-wide alarm thread (alarm.py): one node's callbacks or backlog never take it
from the others."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

import trtserve

pytestmark = pytest.mark.timeout(60)


def test_the_alarm_thread_survives_a_callback_raising_system_exit():
    """An expired request is failed on the alarm thread (Node.wake -> on_done); its callback
    raising SystemExit must not end the thread, or no queued request would expire again.
    In a child process: the alarm is a process-wide singleton."""
    script = textwrap.dedent("""
        import threading, time, os
        import trtserve
        from trtserve import Backend
        from trtserve.alarm import ALARM

        gate = threading.Event()

        class Hold(Backend):
            def forward(self, items):
                gate.wait(30)
                for i in items:
                    i["result"] = i["data"]

        def exits(item, error):
            raise SystemExit("callback exits")

        trtserve.register("Hold", Hold)
        a = trtserve.pipe({"backend": "Hold", "max": 1})
        a.pipeline.submit({"data": "busy"}, lambda i, e: None)
        time.sleep(0.05)
        a.pipeline.submit({"data": "x"}, exits, deadline=time.monotonic() + 0.05)
        time.sleep(0.3)
        expired = threading.Event()
        a.pipeline.submit({"data": "y"}, lambda i, e: expired.set(), deadline=time.monotonic() + 0.05)
        ok = expired.wait(2)
        gate.set()
        print("EXPIRED" if ok else "NEVER-EXPIRED", "alarm alive:", ALARM._thread.is_alive(), flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert "EXPIRED alarm alive: True" in out.stdout, (out.stdout, out.stderr[-2000:])


class SlowEcho(trtserve.Backend):
    """An inline stage of 1 ms a batch (or data['sleep'] s)."""

    def forward(self, items):
        data = items[0]["data"]
        time.sleep(data["sleep"] if isinstance(data, dict) else 0.001)
        for item in items:
            item["result"] = item["data"]


trtserve.register("AlarmSlowEcho", SlowEcho)


def test_an_inline_backlog_on_the_alarm_thread_does_not_delay_other_nodes_deadlines(probe):
    """Past COMBINE_LIMIT a thread hands an inline node's backlog to the alarm; the alarm runs
    as many at a time and wakes itself again, so another node's deadline still fires on time."""
    inline = trtserve.pipe({"backend": "AlarmSlowEcho", "inline": True, "max": 1})
    other = trtserve.pipe({"backend": "Probe", "probe": probe.key, "max": 1})
    probe.gate.clear()
    try:
        other.pipeline.submit({"data": "busy"}, lambda i, e: None)
        probe.wait_entered()
        # Keep the inline node's only instance busy on a helper thread while a backlog queues.
        helper = threading.Thread(target=lambda: inline({"data": {"sleep": 0.2}}), daemon=True)
        helper.start()
        time.sleep(0.05)
        for n in range(1500):
            inline.pipeline.submit({"data": n}, lambda i, e: None)
        helper.join(10)  # after 8 batches it handed the rest (~1.5 s of 1 ms batches) to the alarm
        assert inline.pipeline.nodes[0].queue_depth() > 1000
        expired = threading.Event()
        start = time.monotonic()
        other.pipeline.submit({"data": "late"}, lambda i, e: expired.set(), deadline=start + 0.05)
        assert expired.wait(5)
        late_by = time.monotonic() - start - 0.05
        assert late_by < 0.3, f"the other node's deadline fired {late_by * 1e3:.0f} ms late (alarm busy)"
    finally:
        probe.gate.set()
        inline.close()
        other.close()
