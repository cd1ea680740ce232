"""Connecting to Ray: an embedded local cluster by default, or an existing one."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def ensure_ray(address: str = "", num_cpus: int = 0) -> None:
    """Start or join Ray once per process.

    ``address`` (or RAY_ADDRESS) joins an existing cluster; otherwise an embedded local
    Ray is started on 127.0.0.1. Ray (>= 2.52) turns token authentication on for a new
    local cluster unless RAY_AUTH_MODE says otherwise; setting the variable here would come
    too late for a process that has already imported ray.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",  # a new cluster, never whatever `ray start` left on this machine
            num_cpus=num_cpus or None,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )
