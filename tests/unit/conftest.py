"""A controllable backend for scheduler tests: tests gate it with events, never with sleeps."""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import pytest

import trtserve
from trtserve import Backend, Key


@dataclass
class Probe:
    """Shared state between a test and the instances of its Probe backend."""

    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # instance -> (min, max)
    gate: threading.Event = field(default_factory=threading.Event)  # forward waits on it
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    batches: list[tuple[int, list]] = field(default_factory=list)  # (instance, [data])
    init_threads: dict[int, int] = field(default_factory=dict)
    forward_threads: dict[int, set] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.gate.set()  # open unless a test closes it

    def wait_entered(self, count: int = 1, timeout: float = 10.0) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=timeout), "backend forward was never entered"

    def sizes(self) -> list[int]:
        return [len(batch) for _, batch in self.batches]


_PROBES: dict[str, Probe] = {}
_ids = itertools.count()


class ProbeBackend(Backend):
    """Echoes data; data "raise" fails the batch, data "skip" leaves no result."""

    config_keys = {"probe": Key(str, None, "id of the test's Probe")}

    def init(self, context):
        super().init(context)
        self.index = context.instance_index
        self.probe = _PROBES[context.config["probe"]]
        self.probe.init_threads[self.index] = threading.get_ident()

    def max(self):
        return self.probe.ranges.get(self.index, (1, self.config["max"]))[1]

    def min(self):
        return self.probe.ranges.get(self.index, (self.config["min"], 1))[0]

    def forward(self, items):
        probe = self.probe
        with probe.lock:
            probe.batches.append((self.index, [item["data"] for item in items]))
            probe.forward_threads.setdefault(self.index, set()).add(threading.get_ident())
        probe.entered.release()
        assert probe.gate.wait(30), "test never opened the gate"
        if any(isinstance(item["data"], str) and item["data"] == "raise" for item in items):
            raise RuntimeError("probe asked to fail this batch")
        for item in items:
            if not (isinstance(item["data"], str) and item["data"] == "skip"):
                item["result"] = item["data"]


trtserve.register("Probe", ProbeBackend)


@pytest.fixture
def probe():
    key = f"probe{next(_ids)}"
    _PROBES[key] = Probe()
    _PROBES[key].key = key
    yield _PROBES[key]
    _PROBES[key].gate.set()
    del _PROBES[key]


@pytest.fixture
def make_pipe(probe):
    """Build a pipe over the Probe backend; every pipe is closed after the test."""
    pipes = []

    def build(**options):
        config = {"backend": "Probe", "probe": probe.key, **options}
        pipes.append(trtserve.pipe(config))
        return pipes[-1]

    yield build
    probe.gate.set()
    for p in pipes:
        p.close()


class Collector:
    """Callbacks for Pipeline.submit that tests can wait on."""

    def __init__(self) -> None:
        self.done: dict[int, tuple[dict, object]] = {}
        self.cond = threading.Condition()

    def callback(self, key: int):
        def on_done(item, error):
            with self.cond:
                self.done[key] = (item, error)
                self.cond.notify_all()

        return on_done

    def wait(self, *keys: int, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: all(k in self.done for k in keys), timeout), (
                f"requests {[k for k in keys if k not in self.done]} never finished"
            )


@pytest.fixture
def collector():
    return Collector()
