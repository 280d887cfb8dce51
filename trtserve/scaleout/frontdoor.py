"""``trtserve serve --ray ADDRESS``: the front door's repository, on a Ray cluster.

The front door is the ordinary server (``Server``: protocol, limits, auth, TLS, metrics,
model control, drain) over a ``RayRepository``; this module only joins the cluster, builds
that repository and leaves the cluster again, in that order.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError
from .settings import Override

LOOPBACK = "127.0.0.1"
RAY_MISSING = ("--ray needs Ray Serve, which is not installed here: pip install 'trtserve[ray]' "
               "(or run without --ray to serve the models in this process)")


@contextlib.contextmanager
def ray_repository(address: str, root: str | Path, overrides: list[Override], app_prefix: str,
                   deploy_timeout_s: float) -> Iterator[object]:
    """Join (or start) the cluster, yield a RayRepository over ``root``, then leave it."""
    try:
        import ray  # noqa: F401  (the one place that tells a user to install the extra)
        from ray import serve  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_MISSING, key="ray") from None
    from .cluster import connect
    from .repository import RayRepository

    cluster = connect(address)
    repository = None
    try:
        # A cluster of this process is this machine's: its replicas' servers stay on loopback.
        repository = RayRepository(root, overrides=overrides, app_prefix=app_prefix, deploy_timeout_s=deploy_timeout_s,
                                   replica_host=LOOPBACK if cluster.local else None)
        yield repository
    finally:
        if repository is not None:
            repository.close()
        cluster.close()
