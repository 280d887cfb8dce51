"""Fixtures for the Ray Serve tests: one local Ray cluster for the session, front doors on it.

Ray is started by the ``ray_cluster`` fixture (``ray.init`` with a fixed number of logical
CPUs, Serve without HTTP proxies) and stopped by its finalizer (``serve.shutdown()``, then
``ray.shutdown()``), once for every test that needs it.  Each test deploys its models
under an application prefix of its own and deletes them when it ends, so tests do not see
each other's replicas.  Without Ray installed these tests skip, saying so.
"""
from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve tests need the [ray] extra: pip install -e '.[test,ray]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve tests need the [ray] extra: pip install -e '.[test,ray]'")

from trtserve.scaleout.repository import RayRepository  # noqa: E402

from .conftest import ServerThread  # noqa: E402
from .ops_support import wait_for as poll_until  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "model_repository"
LOGICAL_CPUS = 8  # Ray's bookkeeping, not cores: replicas ask for fractions of these
# Serve's load reports every half second instead of every ten, so that autoscaling
# decisions come within the test's time bounds (read by the controller at its start).
SERVE_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
_prefixes = itertools.count()

# Copied into model folders as backend.py.
SLOW_BACKEND = '''
import time
import trtserve


class Slow(trtserve.Backend):
    """result = data * 2 after sleeping sleep_ms per batch: a model that keeps a replica busy."""

    config_keys = {"sleep_ms": trtserve.Key((int, float), 20, "milliseconds per batch")}

    def init(self, context):
        super().init(context)
        self.seconds = float(context.config["sleep_ms"]) / 1000.0

    def forward(self, items):
        time.sleep(self.seconds)
        for item in items:
            item["result"] = item["data"] * 2


trtserve.register("Slow", Slow)
'''


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with Serve, for the whole session; stopped at its end."""
    saved = {key: os.environ.get(key) for key in SERVE_ENV}
    os.environ.update(SERVE_ENV)
    ray.init(num_cpus=LOGICAL_CPUS, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False, "log_level": "WARNING"})
        yield ray
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def front_door(ray_cluster):
    """``start(repository_folder, **RayRepository options)`` -> a started ServerThread whose
    repository deploys to the session's cluster; stopped, and its applications deleted, after."""
    started: list[tuple[ServerThread, RayRepository]] = []

    def start(root: Path, server_options: dict[str, Any] | None = None, **options: Any) -> ServerThread:
        options.setdefault("app_prefix", f"t{next(_prefixes)}-{os.getpid()}-")
        options.setdefault("replica_host", "127.0.0.1")  # servers under test listen on loopback only
        repository = RayRepository(root, **options)
        handle = ServerThread(repository, **(server_options or {}))
        started.append((handle, repository))
        return handle.start(timeout=300)

    yield start
    for handle, repository in started:
        handle.stop()
        delete_applications(repository.app_prefix)


def delete_applications(prefix: str) -> None:
    """Delete a test's applications; not waiting: a replica that never got placed takes
    Serve's 30 s grace to go, and the next test's replicas fit beside it (LOGICAL_CPUS)."""
    for app in list(serve.status().applications):
        if app.startswith(prefix):
            serve.delete(app, _blocking=False)


def model_folder(root: Path, name: str, config: str, source: Path | None = None, backend: str | None = None) -> Path:
    """A model folder under ``root``: an example's files (``source``) with ``config`` as config.toml."""
    folder = root / name
    if source is not None:
        shutil.copytree(source, folder)
    else:
        (folder / "1").mkdir(parents=True)
    (folder / "config.toml").write_text(config)
    if backend is not None:
        (folder / "backend.py").write_text(backend)
    return folder


def replica_actors(app: str) -> list[Any]:
    """Handles of the running replica actors of a Serve application (named actors)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and f"::{app}#" in a["name"]]
    handles = []
    for name in names:
        try:
            handles.append(ray.get_actor(name, namespace="serve"))
        except ValueError:
            continue  # stopped between the listing and the lookup
    return handles


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """ops_support.wait_for, polling the cluster five times a second rather than constantly."""
    return poll_until(condition, timeout, what, interval=0.2)


def running_replicas(client, model: str) -> int:
    rows = client.repository_index()["models"]
    row = next(r for r in rows if r["name"] == model)
    return row.get("deployment", {}).get("running_replicas", 0)


class LoadLoop:
    """``clients`` threads, each with its own connection, sending ``make_input()`` to
    ``model`` and checking every answer with ``check(input, outputs)``, until stopped or
    ``max_requests`` each or ``max_seconds``.  Errors are kept by type, not raised."""

    def __init__(self, connect: Callable[[], Any], model: str, clients: int, make_input: Callable[[np.random.Generator], Any],
                 check: Callable[[Any, dict[str, Any]], None], max_requests: int = 100_000, max_seconds: float = 120.0):
        self.connect, self.model, self.make_input, self.check = connect, model, make_input, check
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answered = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> LoadLoop:
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        give_up = time.monotonic() + self.max_seconds
        with self.connect() as client:
            for _ in range(self.max_requests):
                if self.stop_event.is_set() or time.monotonic() > give_up:
                    return
                data = self.make_input(rng)
                try:
                    outputs = client.infer(self.model, data, timeout=60)
                    self.check(data, outputs)
                except BaseException as exc:  # kept and asserted on by the test
                    with self.lock:
                        self.errors.append(exc)
                    continue
                with self.lock:
                    self.answered += 1

    def finish(self) -> None:
        """Wait until every client sent its ``max_requests`` (or ran out of time)."""
        for thread in self.threads:
            thread.join(self.max_seconds + 60)
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(120)
        assert not any(t.is_alive() for t in self.threads), "a load thread did not finish"
