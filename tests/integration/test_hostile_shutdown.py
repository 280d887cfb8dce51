"""SIGTERM under load loses no answer: 32 clients pipeline requests to a model that records
every item it runs; the server is stopped mid-stream.  An answer is lost when a request
read is never answered, or when a reset at the close destroys answers the client has not
read yet.  Checked: no client sees a reset; every request the model ran was answered
and its answer arrived; every answer matches a request; requests left without an answer
at the clean EOF were never run (the server had not read them)."""
from __future__ import annotations

import itertools
import selectors
import signal
import socket
import time
from pathlib import Path

import pytest
from trtserve_client.frames import FrameDecoder, pack

from .conftest import write_model
from .ops_support import log_problems, server_process

pytestmark = pytest.mark.timeout(120)

CLIENTS = 32
IN_FLIGHT = 16
RECORDER = """
import threading, time
import trtserve


class Recorder(trtserve.Backend):
    config_keys = {
        "log": trtserve.Key(str, None, "file each item's data is appended to when it runs"),
        "sleep_ms": trtserve.Key((int, float), 0, "time each batch takes"),
    }

    def init(self, context):
        super().init(context)
        self.file = open(context.config["log"], "ab", buffering=0)
        self.lock = threading.Lock()

    def forward(self, items):
        time.sleep(self.config["sleep_ms"] / 1000)
        with self.lock:
            self.file.write(b"".join(item["data"] + b"\\n" for item in items))
        for item in items:
            item["result"] = item["data"]

    def close(self):
        self.file.close()


trtserve.register("Recorder", Recorder)
"""


@pytest.fixture
def repository(tmp_path) -> Path:
    root = tmp_path / "repo"
    folder = write_model(root, "recorded", f'backend = "Recorder"\nlog = "{tmp_path / "ran.log"}"\n'
                                           "sleep_ms = 2\ninstance_num = 2\nmax = 8\n")
    (folder / "backend.py").write_text(RECORDER)
    return root


class Client:
    """One pipelining connection: keeps ``IN_FLIGHT`` requests out until the server closes."""

    def __init__(self, index: int, port: int) -> None:
        self.index = index
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.decoder = FrameDecoder(1 << 24)
        self.ids = itertools.count(1)
        self.sent: dict[int, bytes] = {}
        self.answers: dict[int, dict] = {}
        self.out = b""
        self.eof = self.reset = self.send_failed = False

    @property
    def waiting(self) -> int:
        return len(self.sent) - len(self.answers)

    def fill(self) -> None:
        while not self.send_failed and self.waiting < IN_FLIGHT and len(self.out) < 4096:
            req_id = next(self.ids)
            data = b"c%02d-%07d" % (self.index, req_id)
            self.sent[req_id] = data
            self.out += pack({"v": 2, "id": req_id, "op": "infer", "model": "recorded", "inputs": {"x": data}})
        try:
            while self.out:
                self.out = self.out[self.sock.send(self.out):]
        except BlockingIOError:
            pass
        except OSError:  # the server has closed: what it read is answered, the rest never ran
            self.send_failed, self.out = True, b""

    def read(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.reset = True
            return
        if not data:
            self.eof = True
            return
        for message in self.decoder.feed(data):
            assert message["id"] in self.sent and message["id"] not in self.answers, message
            self.answers[message["id"]] = message


def test_sigterm_under_load_loses_no_answer(repository, tmp_path):
    with server_process(repository, tmp_path / "server.log", "--log-level", "INFO") as proc:
        clients = [Client(i, proc.port) for i in range(CLIENTS)]
        selector = selectors.DefaultSelector()
        for client in clients:
            selector.register(client.sock, selectors.EVENT_READ, client)
        signalled, give_up = None, time.monotonic() + 60
        while any(not (c.eof or c.reset) for c in clients):
            assert time.monotonic() < give_up, "the server never closed every connection"
            if signalled is None and sum(len(c.answers) for c in clients) >= 3000:
                proc.send_signal(signal.SIGTERM)  # mid-stream: every client has requests in flight
                signalled = time.monotonic()
            for client in clients:
                if not (client.eof or client.reset):
                    client.fill()
            for key, _ in selector.select(0.05):
                key.data.read()
                if key.data.eof:  # as a client does at EOF: the server's close then completes
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
        assert proc.wait(30) == 0
        stopped = time.monotonic()
    ran = set((tmp_path / "ran.log").read_bytes().split())
    answered = {c.sent[i]: m for c in clients for i, m in c.answers.items()}
    unanswered = {data for c in clients for i, data in c.sent.items() if i not in c.answers}
    assert not [c.index for c in clients if c.reset], "a client saw a reset: answers may have been destroyed"
    lost = ran - {data for data, m in answered.items() if "result" in m}
    assert not lost, f"{len(lost)} requests ran but their answer never arrived: {sorted(lost)[:5]}"
    assert not (unanswered & ran), "a request without an answer ran"
    assert all("result" in m or m["error"]["name"] == "SHUTTING_DOWN" for m in answered.values())
    assert len(answered) > 3000 and all(c.eof for c in clients)
    print(f"shutdown under load: {len(answered)} answered, {len(ran)} ran, {len(unanswered)} never read "
          f"(clean EOF after the last answer), {stopped - signalled:.2f} s from SIGTERM to the exit")
    assert not log_problems(proc.log())
