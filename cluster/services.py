"""The services a job needs, embedded when none is configured: a private Redis and a local Ray.

On a cluster the same job joins the configured Redis and the running Ray cluster instead; the
rest of the code cannot tell the difference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from cluster.config import JobConfig
from storage.redis_server import PrivateRedisServer

log = logging.getLogger(__name__)


@contextmanager
def redis_for(config: JobConfig) -> Iterator[str]:
    """Yields the job's Redis URL, starting a private server for the job when none is configured."""
    if config.transport.redis_url:
        yield config.transport.redis_url
        return
    with PrivateRedisServer() as server:
        log.info("started a private redis-server for this job on %s", server.url)
        yield server.url


def logical_cpus_needed(config: JobConfig) -> float:
    return config.teacher.replicas * config.teacher.num_cpus + config.student.num_cpus


@contextmanager
def ray_for(config: JobConfig) -> Iterator[None]:
    """Joins the Ray cluster named by RAY_ADDRESS (or already initialised); otherwise starts a local one."""
    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # Logical CPUs only gate scheduling; torch threads per actor are set from the config, so
        # the local node may offer more slots than cores without oversubscribing them.
        cpus = max(float(os.cpu_count() or 1), logical_cpus_needed(config))
        ray.init(num_cpus=int(-(-cpus // 1)), include_dashboard=None, log_to_driver=True,
                 configure_logging=True, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
