"""Deploying one model as a Serve application, and waiting (bounded) until it runs.

The wait is ours, not ``serve.run``'s: Serve waits forever for replicas that cannot be
placed (more CPUs or GPUs asked for than the cluster has), which would hang the front
door's start.  After ``timeout_s`` the model is UNAVAILABLE with Serve's own explanation,
and a first deployment that never ran is deleted so that it stops asking for resources.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ray import serve

from ..errors import ModelUnavailableError
from .cluster import REPLICA_LOGGING
from .replica import ModelReplica
from .settings import RaySettings

log = logging.getLogger("trtserve.scaleout")

CONSTRUCTOR_RETRIES = 2  # a model that fails to load fails its deployment after this many tries
# Serve's graceful shutdown of a replica: it calls the replica's __del__, where the
# replica's server drains (REPLICA_DRAIN_S for requests in flight, then a few seconds to
# flush answers and close the model), and kills the process after REPLICA_GRACE_S.
REPLICA_GRACE_S = 30.0
REPLICA_DRAIN_S = 20.0
POLL_S = 0.25
# Serve's deployment objects are built through cloudpickle's process-wide "pickle by value"
# registry (register, then unregister, a module): two models loading on their own threads
# at once made the second unregister raise.  Building and submitting a deployment is quick;
# waiting for it to run stays outside the lock.
_SUBMIT_LOCK = threading.Lock()


def deploy(app: str, deployment: str, settings: RaySettings, init_args: tuple, *, timeout_s: float,
           replacing: bool) -> Any:
    """The deployment's handle once it runs: attached when that very deployment already
    runs (another front door deployed it), deployed otherwise.  ``replacing``: the model
    is being reloaded and its current deployment must survive a failed update."""
    model = init_args[1]
    if _status(app) == "RUNNING" and set(serve.status().applications[app].deployments) == {deployment}:
        log.info("application %s already runs deployment %s: attaching to it", app, deployment)
        return serve.get_deployment_handle(deployment, app)
    with _SUBMIT_LOCK:
        # serve.deployment() then the class: the form Ray's annotations describe (called on
        # the class directly it returns the same Deployment, annotated as a decorator).
        replica = serve.deployment()(ModelReplica).options(
            name=deployment,
            logging_config=REPLICA_LOGGING,
            max_constructor_retry_count=CONSTRUCTOR_RETRIES,
            graceful_shutdown_timeout_s=REPLICA_GRACE_S,
            **settings.deployment_options(),
        )
        target = serve.RunTarget(target=replica.bind(*init_args), name=app, route_prefix=None)
        (handle,) = serve.run_many([target], wait_for_applications_running=False)
    _wait_running(app, model, timeout_s, delete_on_failure=not replacing, settings=settings)
    return handle


def _wait_running(app: str, model: str, timeout_s: float, delete_on_failure: bool, settings: RaySettings) -> None:
    give_up = time.monotonic() + timeout_s
    while True:
        state = _status(app)
        if state == "RUNNING":
            return
        failed = state == "DEPLOY_FAILED"
        if failed or time.monotonic() > give_up:
            reason = _message(app) or _placement(settings)
            if delete_on_failure:
                serve.delete(app, _blocking=False)  # stop retrying and holding resources
            what = "failed to start" if failed else f"is not running after {timeout_s:g} s (--ray-deploy-timeout)"
            raise ModelUnavailableError(f"model {model!r}: its Ray Serve deployment {what}: {reason}",
                                        model=model, app=app)
        time.sleep(POLL_S)


def _status(app: str) -> str | None:
    status = serve.status().applications.get(app)
    return None if status is None else str(getattr(status.status, "value", status.status))


def _message(app: str) -> str:
    """Serve's explanation, shortest form (the replica's exception), or "" when it has none."""
    status = serve.status().applications.get(app)
    if status is None:
        return "the application disappeared"
    texts = [d.message for d in status.deployments.values() if d.message] or [status.message or ""]
    lines = [line.strip() for line in texts[0].strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _placement(settings: RaySettings) -> str:
    """What a replica asks for against what the cluster has: the usual reason for no message."""
    import ray

    asked = settings.deployment_options()["ray_actor_options"]
    free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    return (f"each replica asks for {asked['num_cpus']:g} CPU and {asked['num_gpus']:g} GPU, the cluster has "
            f"{free or 'none'} free (lower [ray] num_cpus/num_gpus, or add nodes; `ray status` shows the cluster)")
