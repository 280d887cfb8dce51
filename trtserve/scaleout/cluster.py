"""Joining a Ray cluster (or starting a local one) and starting Ray Serve on it.

``--ray`` takes ``local`` (start a Ray cluster inside this process's lifetime: for one
machine and for tests), ``auto`` (the cluster this machine belongs to, or ``RAY_ADDRESS``)
or a cluster address (``HOST:PORT`` of the head's GCS, or ``ray://HOST:PORT`` through Ray
Client).  Serve starts without its HTTP proxies: trtserve's front door is the ingress.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import TypedDict

from ..errors import ConfigError

log = logging.getLogger("trtserve.scaleout")

LOCAL, AUTO = "local", "auto"
PROBE_TIMEOUT_S = 5.0  # connecting to the head's port, before handing the address to Ray
_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
# Serve's access log writes a line per call on every replica: a cost per call that the
# front door's own metrics already cover.
REPLICA_LOGGING = {"enable_access_log": False, "log_level": "WARNING"}


def check_address(text: str) -> str:
    """The ``--ray`` value, or a ConfigError naming the accepted forms."""
    if text in (LOCAL, AUTO) or _ADDRESS.match(text):
        return text
    raise ConfigError(
        f"--ray {text!r}: expected 'local' (start a Ray cluster for this server), 'auto' (join this machine's "
        "cluster or RAY_ADDRESS), HOST:PORT (the head's GCS address) or ray://HOST:PORT",
        key="ray",
        value=text,
    )


class _InitOptions(TypedDict):
    """ray.init's keywords that every connect passes (typed, so ``**`` checks them)."""

    logging_level: int
    include_dashboard: bool
    log_to_driver: bool


@dataclass
class Cluster:
    """The Ray connection this process made; ``close`` undoes only what it started."""

    address: str
    started_ray: bool  # this process called ray.init (a test may have done it before us)
    local: bool  # --ray local: the cluster dies with this process

    def close(self) -> None:
        """A local cluster (and its Serve applications) is stopped; on a shared cluster the
        deployments stay, for the other front doors (``unload``, ``ray.serve.delete`` or
        ``serve shutdown`` remove them)."""
        if not self.local:
            return
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.started_ray:
                ray.shutdown()


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast on a cluster address nothing listens on: ``ray.init`` would wait minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"--ray {address}: nothing answers there ({exc.strerror or exc}); give the address of a running Ray "
            "head (`ray start --head` prints it), or use --ray local",
            key="ray",
            value=address,
        ) from None


def connect(address: str, num_cpus: int | None = None) -> Cluster:
    """Join (or start) the cluster and make sure Serve runs on it (``num_cpus``: the logical
    CPUs of a local cluster; None counts this machine's)."""
    import ray
    from ray import serve

    check_address(address)
    if address not in (LOCAL, AUTO):
        probe(address)  # also when this process already joined a cluster: a wrong flag is an error
    started = not ray.is_initialized()
    if started:
        # log_to_driver off: workers' logs stay in Ray's log folder, and stdout keeps its one
        # "listening" line (scripts read it).
        options = _InitOptions(logging_level=logging.WARNING, include_dashboard=False, log_to_driver=False)
        if address == LOCAL:
            # Ray runs workers at nice 15; here the replicas (which run the models) share
            # the cores with this front door, and must not starve behind it.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=num_cpus, **options)
        else:
            try:
                ray.init(address=address, **options)
            except ConnectionError as exc:
                raise ConfigError(
                    f"--ray {address}: cannot reach a Ray cluster there ({exc}); start one with `ray start --head` "
                    "or use --ray local",
                    key="ray",
                    value=address,
                ) from None
    serve.start(proxy_location="Disabled", logging_config=REPLICA_LOGGING)
    log.info("Ray Serve ready on %s (%s)", address, "started here" if started else "already connected")
    return Cluster(address=address, started_ray=started, local=address == LOCAL)
