"""Test backends for the operations suites, copied into model folders as ``backend.py``.

``OpsTagged``   answers ``{"y": x + T, "tag": [T] * rows}`` where ``T = tag * 1000 + N`` and
                N is the integer in the version folder's ``model.txt``: a reload that changes
                the config (``tag``) or the model file changes every answer, so a test can
                tell which loaded version computed each one.  A model.txt that is not an
                integer makes init fail (a broken model file).
``OpsRecorder`` holds every batch until ``<gate_dir>/open`` exists (like the Gate backend),
                then appends the batch's items (bytes, one line per batch, comma-separated)
                to ``<gate_dir>/log`` in execution order and echoes them; an item
                ``b"raise"`` fails its whole batch.  ``<gate_dir>/started-<n>`` markers hold
                the batch size of every forward that began.
``OpsExpand``   answers every item with ``out_bytes`` bytes whatever the input: a tiny request
                buys a big response (a slow reader's worst case).
"""
import itertools
import threading
import time
from pathlib import Path

import numpy as np

import trtserve

_counter = itertools.count()
_lock = threading.Lock()


class OpsTagged(trtserve.Backend):
    config_keys = {"tag": trtserve.Key(int, 0, "changes every answer: T = tag * 1000 + int(model.txt)")}

    def init(self, context):
        super().init(context)
        text = (Path(context.model_dir) / "model.txt").read_text()
        self.tag = int(context.config["tag"]) * 1000 + int(text)  # ValueError: a broken model file

    def forward(self, items):
        for item in items:
            x = item["data"]
            item["result"] = {"y": x + self.tag, "tag": np.full((x.shape[0],), self.tag, np.int64)}


class OpsRecorder(trtserve.Backend):
    config_keys = {
        "gate_dir": trtserve.Key(str, None, "folder holding the 'open' file, the started markers and the log"),
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
        labels = [bytes(item["data"]) for item in items]
        with _lock, open(self.dir / "log", "ab") as log:
            log.write(b",".join(labels) + b"\n")
        if b"raise" in labels:
            raise RuntimeError("asked to fail this batch")
        for item in items:
            item["result"] = item["data"]


class OpsExpand(trtserve.Backend):
    config_keys = {"out_bytes": trtserve.Key(int, 1 << 20, "size of every answer in bytes")}

    def init(self, context):
        super().init(context)
        self.answer = b"\x5a" * int(context.config["out_bytes"])

    def forward(self, items):
        for item in items:
            item["result"] = self.answer


trtserve.register("OpsTagged", OpsTagged)
trtserve.register("OpsRecorder", OpsRecorder)
trtserve.register("OpsExpand", OpsExpand)
