"""Hot reload under load: 32 clients keep sending while the model is reloaded 10 times.

The model (``OpsTagged``) answers ``y = x + T`` with ``T = tag * 1000 + int(1/model.txt)``,
so every answer says which loaded version computed it.  Each reload changes either the
config (``tag``) or the model file, so each generation has its own T.  The tests prove:

* zero requests lost: every request sent (unique id) got exactly one answer, and no client
  saw an error (each call has a 10 s client timeout, so a lost request fails the test);
* zero wrong answers: ``y == x + T`` exactly for the T the answer carries;
* every answer came from a version that was live while the request was in flight: T's
  generation had been triggered before the answer arrived, and the request was sent before
  T was retired, i.e. before its successor answered anyone (and, in explicit mode, before
  the ``load`` that replaced it returned).  A request sent after a newer version answered
  is read by the server after the swap, so the old version must never answer it;
* a failed reload (a broken model file, a config with an unknown key) keeps the old version
  serving, and ``repository_index`` shows the error as the model's reason.

Poll mode is driven by file edits (atomic renames with mtimes bumped explicitly); explicit
mode by ``load`` operations.  Clients are 16 threads with the blocking ``Client`` and 16
asyncio tasks with their own ``AsyncClient`` each.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from trtserve_client import AsyncClient, Client
from trtserve_client.errors import ConfigError, ModelUnavailableError

from .conftest import write_model
from .ops_support import OPS_BACKENDS, assert_healthy, log_problems, replace_file, server_process, wait_for, write_identity

pytestmark = pytest.mark.timeout(90)

MODEL = "tagged"
SYNC_CLIENTS = ASYNC_CLIENTS = 16  # 32 clients in all
RELOADS = 10
PER_CLIENT_CAP = 20_000  # bounds the load even if the reload driver stalls
CALL_TIMEOUT_S = 10.0  # a request unanswered this long counts as lost
BETWEEN_RELOADS = 150  # answers the clients must get between two reloads: traffic crosses every swap


def tagged_config(tag: int) -> str:
    return f"""backend = "OpsTagged"
tag = {tag}
instance_num = 2
max = 8
batching_timeout = 1
"""


def make_repository(root: Path) -> Path:
    root.mkdir(parents=True)
    write_identity(root)
    folder = write_model(root, MODEL, tagged_config(1), backend_py=OPS_BACKENDS)
    (folder / "1" / "model.txt").write_text("0")
    return root


class Generations:
    """The model's files and the T each generation must answer with."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tag, self.n = 1, 0

    @property
    def current(self) -> int:
        return self.tag * 1000 + self.n

    def advance(self, step: int) -> int:
        """Change the model file (odd steps) or the config (even steps); return the new T."""
        if step % 2:
            self.n += 1
            replace_file(self.folder / "1" / "model.txt", str(self.n))
        else:
            self.tag += 1
            replace_file(self.folder / "config.toml", tagged_config(self.tag))
        return self.current

    def break_model_file(self) -> None:
        replace_file(self.folder / "1" / "model.txt", "not a number")

    def break_config(self) -> None:
        replace_file(self.folder / "config.toml", tagged_config(self.tag) + "tagg = 3\n")

    def restore(self) -> None:
        replace_file(self.folder / "1" / "model.txt", str(self.n))
        replace_file(self.folder / "config.toml", tagged_config(self.tag))


class Load:
    """32 clients sending one request at a time each, until stopped; every outcome recorded.

    ``refusals`` lists exception classes that count as an answer (a refusal) rather than a
    failure; they are recorded with their timing for the caller to judge.
    """

    def __init__(self, host: str, port: int, refusals: tuple[type[BaseException], ...] = ()) -> None:
        self.host, self.port = host, port
        self.refusals = refusals
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent: set[int] = set()
        self.answers: dict[int, tuple[float, float, int]] = {}  # uid -> (sent, received, T)
        self.refused: dict[int, tuple[float, float, str]] = {}
        self.failures: list[str] = []
        self.first_seen: dict[int, float] = {}  # T -> when its first answer arrived
        self._threads: list[threading.Thread] = []

    # -- one request ---------------------------------------------------------------------
    def _before(self, uid: int) -> tuple[np.ndarray, float]:
        with self.lock:
            assert uid not in self.sent
            self.sent.add(uid)
        return np.array([[uid, uid % 997, 1.5]], np.float64), time.monotonic()

    def _after(self, uid: int, x: np.ndarray, sent: float, outcome: object) -> None:
        received = time.monotonic()
        with self.lock:
            if isinstance(outcome, BaseException):
                if isinstance(outcome, self.refusals):
                    self.refused[uid] = (sent, received, type(outcome).__name__)
                else:
                    self.failures.append(f"request {uid}: {type(outcome).__name__}: {outcome}")
                return
            tags, y = outcome.get("tag"), outcome.get("y")
            if tags is None or y is None or tags.shape != (1,) or y.shape != x.shape:
                self.failures.append(f"request {uid}: malformed answer {outcome!r}")
                return
            t = int(tags[0])
            if not np.array_equal(y, x + t):
                self.failures.append(f"request {uid}: wrong answer {y.tolist()} for {x.tolist()} under T={t}")
                return
            if uid in self.answers:
                self.failures.append(f"request {uid}: answered twice")
            self.answers[uid] = (sent, received, t)
            self.first_seen.setdefault(t, received)

    # -- clients ---------------------------------------------------------------------------
    def _sync_client(self, k: int) -> None:
        with Client(self.host, self.port, timeout=CALL_TIMEOUT_S) as client:
            for i in range(PER_CLIENT_CAP):
                if self.stop.is_set():
                    return
                uid = k * 1_000_000 + i
                x, sent = self._before(uid)
                try:
                    outcome = client.infer(MODEL, {"x": x})
                except Exception as exc:
                    outcome = exc
                self._after(uid, x, sent, outcome)

    async def _async_client(self, k: int) -> None:
        async with AsyncClient(self.host, self.port, timeout=CALL_TIMEOUT_S) as client:
            for i in range(PER_CLIENT_CAP):
                if self.stop.is_set():
                    return
                uid = k * 1_000_000 + i
                x, sent = self._before(uid)
                try:
                    outcome = await client.infer(MODEL, {"x": x})
                except Exception as exc:
                    outcome = exc
                self._after(uid, x, sent, outcome)

    def _async_clients(self) -> None:
        async def main() -> None:
            await asyncio.gather(*(self._async_client(SYNC_CLIENTS + k) for k in range(ASYNC_CLIENTS)))

        asyncio.run(main())

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._sync_client, args=(k,), daemon=True) for k in range(SYNC_CLIENTS)]
        self._threads.append(threading.Thread(target=self._async_clients, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread did not stop"

    # -- waiting ---------------------------------------------------------------------------
    def count(self) -> int:
        with self.lock:
            return len(self.answers) + len(self.refused)

    def wait_answers(self, more: int, timeout: float = 15.0) -> None:
        target = self.count() + more
        wait_for(lambda: self.count() >= target or self.failures, timeout, f"{more} more answers")
        assert not self.failures, self.failures[:5]

    def wait_tag(self, t: int, timeout: float = 15.0) -> float:
        """When T first answered; fails if it never does."""
        wait_for(lambda: t in self.first_seen or self.failures, timeout, f"an answer from T={t}")
        assert not self.failures, self.failures[:5]
        return self.first_seen[t]

    # -- verdict ---------------------------------------------------------------------------
    def check(self, triggered: dict[int, float], retired_by_load: dict[int, float]) -> None:
        """Nothing lost, nothing wrong, every answer from a version live during its request.

        ``triggered[T]``: when the change that creates T began (before any file edit or load).
        ``retired_by_load[T]``: when the load that replaced T returned (explicit mode).
        """
        assert not self.failures, f"{len(self.failures)} failures, first: {self.failures[:5]}"
        assert self.sent == set(self.answers) | set(self.refused), (
            f"{len(self.sent - set(self.answers) - set(self.refused))} requests never answered"
        )
        order = sorted(triggered, key=triggered.get)
        assert set(self.first_seen) <= set(order), f"answers from unknown versions {set(self.first_seen) - set(order)}"
        retired = {}
        for index, t in enumerate(order):
            newer = [self.first_seen[u] for u in order[index + 1:] if u in self.first_seen]
            bound = [b for b in (min(newer, default=None), retired_by_load.get(t)) if b is not None]
            retired[t] = min(bound, default=float("inf"))
        stale = [(uid, s, r, t) for uid, (s, r, t) in self.answers.items() if s > retired[t] or r < triggered[t]]
        assert not stale, f"{len(stale)} answers from versions not live while the request was in flight, e.g. {stale[:3]}"


def index_row(client: Client) -> dict:
    return next(r for r in client.repository_index()["models"] if r["name"] == MODEL)


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repository(tmp_path / "repo")


def test_poll_mode_reloads_under_load(repo, tmp_path):
    """10 reloads by file edits (model file and config alternately), plus a broken model file
    and a broken config that must not take the served version down."""
    gens = Generations(repo / MODEL)
    log_path = tmp_path / "server.log"
    # A 50 ms poll keeps the test short; reload latency is the poll interval plus a build.
    with server_process(repo, log_path, "--model-control", "poll", "--poll-interval", "0.05", "--log-level", "INFO") as proc, \
            Client(proc.host, proc.port, timeout=CALL_TIMEOUT_S) as control:
        triggered = {gens.current: 0.0}
        load = Load(proc.host, proc.port).start()
        try:
            load.wait_tag(gens.current)
            for step in range(1, RELOADS + 1):
                load.wait_answers(BETWEEN_RELOADS)
                if step in (4, 8):  # a failed reload first: the old version keeps serving
                    served = gens.current
                    if step == 4:
                        gens.break_model_file()
                        expected = "not a number"
                    else:
                        gens.break_config()
                        expected = "tagg"
                    row = wait_for(lambda: (r := index_row(control))["reason"] and r, 15, "the failed reload in the index")
                    assert expected in row["reason"], row
                    assert (row["state"], row["version"]) == ("READY", 1), row
                    assert control.ready(MODEL)
                    load.wait_answers(BETWEEN_RELOADS)  # still answered, by T=served (checked below)
                    assert set(load.first_seen) <= set(triggered) and served in load.first_seen
                    gens.restore()  # the same files as the served version: the next edit reloads
                moment = time.monotonic()
                t = gens.advance(step)
                triggered[t] = moment
                load.wait_tag(t)
            load.wait_answers(BETWEEN_RELOADS)
        finally:
            load.finish()
        load.check(triggered, {})
        assert len(load.first_seen) == RELOADS + 1, f"generations that answered: {sorted(load.first_seen)}"
        row = index_row(control)
        assert (row["state"], row["reason"]) == ("READY", None), row
        assert_healthy(proc.host, proc.port)
    assert not log_problems(proc.log()), log_problems(proc.log())
    assert len(load.sent) >= (RELOADS + 3) * BETWEEN_RELOADS


def test_explicit_load_reloads_under_load(repo, tmp_path):
    """10 reloads with the load operation; a broken model file and a broken config make load
    fail with a typed error while the old version keeps serving."""
    gens = Generations(repo / MODEL)
    log_path = tmp_path / "server.log"
    with server_process(repo, log_path, "--model-control", "explicit", "--load-model", "*", "--log-level", "INFO") as proc, \
            Client(proc.host, proc.port, timeout=30) as control:
        triggered, retired_by_load = {gens.current: 0.0}, {}
        load = Load(proc.host, proc.port).start()
        try:
            load.wait_tag(gens.current)
            for step in range(1, RELOADS + 1):
                load.wait_answers(BETWEEN_RELOADS)
                if step in (4, 8):
                    served = gens.current
                    if step == 4:
                        gens.break_model_file()
                        with pytest.raises(ModelUnavailableError, match="not a number"):
                            control.load(MODEL)
                    else:
                        gens.break_config()
                        with pytest.raises(ConfigError, match="tagg"):
                            control.load(MODEL)
                    row = index_row(control)
                    assert (row["state"], row["version"]) == ("READY", 1) and row["reason"], row
                    assert control.ready(MODEL)
                    load.wait_answers(BETWEEN_RELOADS)
                    assert served in load.first_seen
                    gens.restore()
                previous = gens.current
                moment = time.monotonic()
                t = gens.advance(step)
                triggered[t] = moment
                assert control.load(MODEL) == {"name": MODEL, "version": 1, "state": "READY"}
                retired_by_load[previous] = time.monotonic()
                load.wait_tag(t)
            load.wait_answers(BETWEEN_RELOADS)
        finally:
            load.finish()
        load.check(triggered, retired_by_load)
        assert len(load.first_seen) == RELOADS + 1, f"generations that answered: {sorted(load.first_seen)}"
        assert index_row(control)["reason"] is None
        assert_healthy(proc.host, proc.port)
    assert not log_problems(proc.log()), log_problems(proc.log())


def test_unload_under_load_refuses_cleanly_then_load_serves_again(repo, tmp_path):
    """unload while 32 clients send: requests already accepted finish with correct answers,
    later ones are refused MODEL_UNAVAILABLE (never lost, never a connection error), and
    after load every request is served again."""
    with server_process(repo, tmp_path / "server.log", "--model-control", "explicit", "--load-model", "*", "--log-level", "INFO") as proc, \
            Client(proc.host, proc.port, timeout=30) as control:
        load = Load(proc.host, proc.port, refusals=(ModelUnavailableError,)).start()
        try:
            load.wait_answers(BETWEEN_RELOADS)
            unload_start = time.monotonic()
            assert control.unload(MODEL) == {"name": MODEL, "state": "UNLOADED"}
            assert not control.ready(MODEL)
            wait_for(lambda: len(load.refused) >= BETWEEN_RELOADS, 15, "refusals while unloaded")
            assert control.load(MODEL)["state"] == "READY"
            load_done = time.monotonic()
            load.wait_answers(BETWEEN_RELOADS)
        finally:
            load.finish()
        load.check({1000: 0.0}, {})
        assert load.refused
        # A refusal can only come after the unload was asked for, and only for a request sent
        # before the load that restored the model returned.
        bad = [(uid, s, r) for uid, (s, r, _) in load.refused.items() if r < unload_start or s > load_done]
        assert not bad, f"refusals outside the unloaded window: {bad[:3]}"
        after = [uid for uid, (s, _, _) in load.answers.items() if s > load_done]
        assert after, "no request was served after the model was loaded again"
        assert_healthy(proc.host, proc.port)
    assert not log_problems(proc.log()), log_problems(proc.log())
