"""Test backends, copied into model folders as ``backend.py`` (the real model-folder feature).

``Gate`` holds every batch until the file ``<gate_dir>/open`` exists, so tests decide when
work finishes with a file instead of a sleep.  On entry to each forward it writes
``<gate_dir>/started-<n>`` (the batch size inside), so tests can wait until work is running.
The wait is capped by ``gate_timeout`` seconds so a forgotten gate can never hang a run.

``Flaky`` echoes bytes, except: b"raise" fails the batch, b"skip" leaves no result, and
b"text" produces a value that cannot travel on the wire.
"""
import itertools
import threading
import time
from pathlib import Path

import trtserve

_counter = itertools.count()
_lock = threading.Lock()


class Gate(trtserve.Backend):
    config_keys = {
        "gate_dir": trtserve.Key(str, None, "folder holding the 'open' file and the started markers"),
        "gate_timeout": trtserve.Key((int, float), 20.0, "seconds after which the gate opens by itself"),
    }

    def init(self, context):
        super().init(context)
        self.dir = Path(context.config["gate_dir"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timeout = float(context.config["gate_timeout"])

    def forward(self, items):
        with _lock:
            n = next(_counter)
        (self.dir / f"started-{n}").write_text(str(len(items)))
        give_up = time.monotonic() + self.timeout
        gate = self.dir / "open"
        while not gate.exists() and time.monotonic() < give_up:
            time.sleep(0.002)
        for item in items:
            item["result"] = item["data"]


class Flaky(trtserve.Backend):
    def forward(self, items):
        for item in items:
            if item["data"] == b"raise":
                raise RuntimeError("asked to fail")
            if item["data"] == b"text":
                item["result"] = "a str is not a wire value"
            elif item["data"] != b"skip":
                item["result"] = item["data"]


trtserve.register("Gate", Gate)
trtserve.register("Flaky", Flaky)
