"""Serve's autoscaling policy for trtserve deployments: scale on the replicas' real load.

Serve's default policy counts requests in flight through Serve handles.  Front doors send
requests straight to the replicas' own servers, so that count stays at zero; instead each
replica reports the requests its server has in flight (``record_autoscaling_stats`` in
replica.py) and this policy sizes the deployment so that each replica has about
``target_ongoing_requests`` of them.  Serve applies ``min_replicas``/``max_replicas``,
``upscale_delay_s``/``downscale_delay_s`` and the look-back averaging around it.

Serve ships this function to its controller by value (cloudpickle), so it uses nothing
but its arguments.
"""
from __future__ import annotations

from typing import Any

IN_FLIGHT_METRIC = "trtserve_in_flight"
POLICY = "trtserve.scaleout.autoscale.in_flight_policy"


def in_flight_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Desired replicas: requests in flight over all running replicas, divided by the
    target per replica (Serve rounds up and bounds the result)."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    per_replica = (ctx.aggregated_metrics or {}).get("trtserve_in_flight", {})
    running = set(ctx.running_replicas)
    total = sum(value for replica, value in per_replica.items() if replica in running)
    return total / ctx.config.get_target_ongoing_requests(), {}
