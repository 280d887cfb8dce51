"""A simulated GPU on the CPU, to measure how well a node keeps a device busy.

``FakeGpu`` is a backend whose ``forward`` holds the GIL for ``stage_us`` (a numpy
concatenate of the rows plus a busy loop: staging a batch, as TorchScriptTensor packs
host rows), then submits the batch to a simulated device and, with ``fake_overlap``,
returns a ``trtserve.Completion`` (SyncTensor with ``overlap = true``); without it,
forward waits itself.

The device is a child process (this module run as a script), so finishing a batch never
waits for the server's GIL, as a GPU does not: batches run FIFO, one at a time, each
``device_us`` long (a sleep, then a short spin for precision).  ``streams`` devices run in
parallel, instance ``i`` on device ``i % streams`` (a GPU running two instances' streams
at once).  Each device counts its busy and idle time: ``snapshot()['device_idle']`` is the
fraction of wall time it had nothing to run, the number an overlapping node keeps near 0
while the host needs less time per batch than the device.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from trtserve import Backend, Completion
from trtserve.backend import InstanceContext, Key

_RECORD = struct.Struct("<BBHI")  # op, instance, rows, microseconds
_RUN, _RESET, _REPORT = 0, 1, 2
INSTANCES = 8  # done pipes per device: instance indices 0..7


class Device:
    """One simulated device process; ``submit`` returns the fd its done byte arrives on."""

    def __init__(self) -> None:
        self._sub_r, self._sub_w = os.pipe()
        stats_r, stats_w = os.pipe()
        self.done = [os.pipe() for _ in range(INSTANCES)]
        fds = [self._sub_r, stats_w] + [w for _, w in self.done]
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *map(str, fds)], pass_fds=fds)
        for fd in fds:
            os.close(fd)  # the child's ends
        self._stats = os.fdopen(stats_r, "rb")
        self._lock = threading.Lock()

    def submit(self, instance: int, rows: int, microseconds: float) -> int:
        os.write(self._sub_w, _RECORD.pack(_RUN, instance, rows, int(microseconds)))
        return self.done[instance][0]

    def reset(self) -> None:
        """Start counting afresh (after the batches already queued)."""
        os.write(self._sub_w, _RECORD.pack(_RESET, 0, 0, 0))

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            os.write(self._sub_w, _RECORD.pack(_REPORT, 0, 0, 0))
            raw = json.loads(self._stats.readline())
        batches = max(raw["batches"], 1)
        return {"device_idle": 1 - raw["busy_ns"] / max(raw["wall_ns"], 1), "device_batches": raw["batches"],
                "device_mean_batch": raw["rows"] / batches, "device_busy_us": raw["busy_ns"] / batches / 1e3}

    def close(self) -> None:
        os.close(self._sub_w)
        self.proc.wait(10)
        self._stats.close()
        for r, _ in self.done:
            os.close(r)


class Devices:
    """The devices of one measurement: ``streams`` of them, made on first use."""

    def __init__(self, streams: int = 1) -> None:
        self.streams = streams
        self._devices: dict[int, Device] = {}
        self._lock = threading.Lock()

    def for_instance(self, index: int) -> Device:
        with self._lock:  # instances initialise at once, each on its own thread
            key = index % self.streams
            if key not in self._devices:
                self._devices[key] = Device()
            return self._devices[key]

    def reset(self) -> None:
        for device in self._devices.values():
            device.reset()

    def snapshot(self) -> dict[str, float]:
        """Every device's counters; ``device_idle`` is their mean."""
        snaps = [d.snapshot() for d in self._devices.values()]
        if not snaps:
            return {}
        return {"device_idle": sum(s["device_idle"] for s in snaps) / len(snaps),
                "device_batches": sum(s["device_batches"] for s in snaps),
                "device_mean_batch": sum(s["device_mean_batch"] for s in snaps) / len(snaps),
                "device_busy_us": sum(s["device_busy_us"] for s in snaps) / len(snaps)}

    def close(self) -> None:
        for device in self._devices.values():
            device.close()
        self._devices.clear()


class FakeGpu(Backend):
    """Stages a batch holding the GIL, runs it on a simulated device (see the module)."""

    config_keys = {
        "stage_us": Key(float, 300.0, "GIL-held staging per batch, microseconds"),
        "device_us": Key(float, 700.0, "simulated device time per batch, microseconds"),
        "fake_overlap": Key(bool, True, "return a Completion instead of waiting"),
    }

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        self.stage_s = float(context.config["stage_us"]) / 1e6
        self.device_us = float(context.config["device_us"])
        self.overlap = bool(context.config["fake_overlap"])
        self.index = context.instance_index
        self.device = context.extra["devices"].for_instance(self.index)
        self.in_flight = 0  # this instance's batches on the device (its own thread only)
        self.overlapped = self.batches = 0

    def forward(self, items: list[dict[str, Any]]) -> Completion | None:
        start = time.perf_counter()
        staged = np.concatenate([item["data"] for item in items])
        while time.perf_counter() - start < self.stage_s:
            pass
        self.batches += 1
        self.overlapped += self.in_flight > 0
        self.in_flight += 1
        done = self.device.submit(self.index, len(staged), self.device_us)

        def finish() -> None:
            os.read(done, 1)
            self.in_flight -= 1
            offset = 0
            for item in items:
                rows = len(item["data"])
                item["result"] = staged[offset:offset + rows]
                offset += rows

        if self.overlap:
            return Completion(finish)
        finish()
        return None


def _device_main(sub_fd: int, stats_fd: int, done_fds: list[int]) -> None:
    """The device process: run batches FIFO, count busy and idle time."""
    clock = time.perf_counter_ns
    pending = b""
    busy = batches = rows = 0
    since = clock()
    while True:
        if len(pending) < _RECORD.size:
            chunk = os.read(sub_fd, 4096)
            if not chunk:
                return
            pending += chunk
            continue
        op, instance, count, microseconds = _RECORD.unpack(pending[:_RECORD.size])
        pending = pending[_RECORD.size:]
        if op == _RUN:
            began = clock()
            end = began + microseconds * 1000
            time.sleep(max(microseconds - 60, 0) / 1e6)  # a sleep overshoots by ~60 us: spin the rest
            while clock() < end:
                pass
            busy += clock() - began
            batches += 1
            rows += count
            os.write(done_fds[instance], b"x")
        elif op == _RESET:
            busy = batches = rows = 0
            since = clock()
        elif op == _REPORT:
            line = {"wall_ns": clock() - since, "busy_ns": busy, "batches": batches, "rows": rows}
            os.write(stats_fd, (json.dumps(line) + "\n").encode())


if __name__ == "__main__":
    _sub, _stats, *_done = (int(a) for a in sys.argv[1:])
    _device_main(_sub, _stats, _done)
