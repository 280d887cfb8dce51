"""Node.close: a drain finishes every queued request, from any thread, and a second close
waits for the first.  Hangs are turned into failures with joins that time out."""
from __future__ import annotations

import threading

import pytest

import trtserve
from trtserve.errors import ShuttingDownError

pytestmark = pytest.mark.timeout(60)


def closing(models, **kwargs):
    closer = threading.Thread(target=models.pipeline.close, kwargs=kwargs, daemon=True)
    closer.start()
    return closer


@pytest.mark.parametrize("inline", [False, True], ids=["threaded", "inline"])
def test_a_drain_runs_queued_requests_below_min_instead_of_waiting_for_ever(probe, collector, inline):
    """min = 2: a lone request waits for a second one.  At a drain none will come, so it
    runs as a batch of 1 (a drain (unload, reload) waives min, docs/configuration.md)."""
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "min": 2, "max": 4, "inline": inline})
    models.pipeline.submit({"data": "alone"}, collector.callback(0))
    assert models.pipeline.nodes[0].queue_depth() == 1  # waiting for a second request
    closer = closing(models, drain=True)
    closer.join(10)
    assert not closer.is_alive(), "close(drain=True) waits for ever for a request below min"
    collector.wait(0)
    assert collector.done[0] == ({"data": "alone", "result": "alone"}, None)
    assert probe.sizes() == [1]


def test_close_with_drain_from_a_threaded_nodes_own_callback_returns(probe, collector):
    """The callback runs on the node's instance thread: a drain there would wait for that
    instance to go idle, i.e. for itself.  It returns, and queued requests fail."""
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "max": 1})
    probe.gate.clear()
    closed = threading.Event()
    models.pipeline.submit({"data": "A"}, lambda item, error: (models.pipeline.close(drain=True), closed.set()))
    probe.wait_entered()
    models.pipeline.submit({"data": "B"}, collector.callback(1))
    probe.gate.set()
    assert closed.wait(10), "close(drain=True) from the node's own callback deadlocked its instance thread"
    collector.wait(1)
    assert isinstance(collector.done[1][1], ShuttingDownError)


def test_a_second_close_waits_until_the_first_has_finished(probe):
    """close() returns only after every running batch's callbacks ran; a concurrent second
    close() (a reload racing a shutdown) must not return sooner, while a batch still runs."""
    models = trtserve.pipe({"backend": "Probe", "probe": probe.key, "max": 1})
    probe.gate.clear()
    models.pipeline.submit({"data": "running"}, lambda item, error: None)
    probe.wait_entered()
    first = closing(models)
    second = closing(models)
    second.join(0.3)
    assert second.is_alive(), "the second close() returned while a batch was running"
    probe.gate.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive()
