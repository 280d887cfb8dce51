"""The reaper's settings (server/reaper.py), rate-limited warnings (server/ratelog.py) and
the control threads that never hold the server up (server/threads.py).  The reaping itself
runs against real sockets in tests/integration/test_hostile_connections.py."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from trtserve.errors import ConfigError
from trtserve.server.ratelog import RateLimitedLog
from trtserve.server.reaper import Timeouts
from trtserve.server.threads import DaemonExecutor


@pytest.mark.parametrize("field", ["idle_timeout_s", "receive_timeout_s", "write_timeout_s"])
@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "10", True, None])
def test_bad_timeouts_are_config_errors_naming_the_setting(field, bad):
    values = {"idle_timeout_s": 1, "receive_timeout_s": 1, "write_timeout_s": 1, **{field: bad}}
    with pytest.raises(ConfigError, match=f"{field} must be a finite number of seconds >= 0") as refused:
        Timeouts.checked(values["idle_timeout_s"], values["receive_timeout_s"], 1024, values["write_timeout_s"])
    assert refused.value.details["key"] == field


@pytest.mark.parametrize("bad", [-1, 1.5, "1024", None])
def test_a_bad_minimum_rate_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="min_receive_rate must be a whole number of bytes per second"):
        Timeouts.checked(1, 1, bad, 1)


def test_the_reaper_looks_four_times_per_shortest_timeout_at_most_once_a_second():
    assert Timeouts.checked(300, 10, 1024, 30).interval == 1.0
    assert Timeouts.checked(2, 0, 0, 0).interval == 0.5  # 0 turns a check off: it does not count
    assert Timeouts.checked(0, 0, 0, 0).interval == 1.0


def test_warnings_are_rate_limited_per_kind_and_the_rest_summed(caplog):
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("test.ratelog"), burst=3, interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "test.ratelog"):
        for i in range(2000):
            log.warning("auth", "failed login %d", i)
        log.warning("idle", "idle %d", 1)
        assert [r.getMessage() for r in caplog.records] == [
            "failed login 0", "failed login 1", "failed login 2", "idle 1"]
        now[0] = 10.5
        log.flush()
        assert caplog.records[-1].getMessage().startswith("1997 more 'auth' warnings like the above in 10 s")
        log.warning("auth", "failed login %d", 2001)  # a new interval logs again
        assert caplog.records[-1].getMessage() == "failed login 2001"
    assert len(caplog.records) == 6


def test_control_jobs_run_on_daemon_threads_and_a_hung_one_delays_nothing():
    executor = DaemonExecutor()
    release = threading.Event()
    hung = [executor.submit(release.wait) for _ in range(3)]  # more than a pool of 2 could take
    started = time.monotonic()
    assert executor.submit(lambda: 42).result(5) == 42
    assert time.monotonic() - started < 1
    assert all(t.daemon for t in threading.enumerate() if t.name == "trtserve-control")
    executor.shutdown()
    assert executor.join(timeout=0.05) is False  # a bounded wait: hung jobs keep running
    with pytest.raises(RuntimeError, match="shutting down"):
        executor.submit(print)
    release.set()
    assert all(f.result(5) for f in hung)
    assert executor.running == 0


def test_a_control_job_that_raises_anything_reports_it():
    executor = DaemonExecutor()

    def leave() -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        executor.submit(leave).result(5)
