"""The services a job needs, embedded when none is configured: a private Redis and a local Ray.

On a cluster the same job joins the configured Redis and the running Ray cluster instead; the
rest of the code cannot tell the difference.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from polydistill.cluster.config import JobConfig
from polydistill.storage.redis_server import PrivateRedisServer

log = logging.getLogger(__name__)


# Where a submitted job finds its Redis when the config names none (`polydistill submit` sets it in
# the job's runtime_env, so the URL never appears in the entrypoint that `ray job list` shows).
REDIS_URL_ENV = "POLYDISTILL_REDIS_URL"


def configured_redis_url(config: JobConfig) -> str | None:
    """transport.redis_url, else $POLYDISTILL_REDIS_URL, else None (a private server)."""
    return config.transport.redis_url or os.environ.get(REDIS_URL_ENV) or None


@contextmanager
def redis_for(config: JobConfig) -> Iterator[str]:
    """Yields the job's Redis URL, starting a private server for the job when none is configured."""
    url = configured_redis_url(config)
    if url:
        yield url
        return
    with PrivateRedisServer() as server:
        log.info("started a private redis-server for this job on %s", server.url)
        yield server.url


def logical_cpus_needed(config: JobConfig) -> float:
    """What the job's actors ask for at their start: every teacher pool (the main one, extra teachers,
    the teachers of extra tasks) and every student worker. A local Ray offering less would leave an
    actor waiting for a slot until the student's stall timeout."""
    students = sum(student.num_cpus * student.workers for student in (config.student, *config.extra_students))
    teachers = (config.teacher, *config.extra_teachers, *(task.teacher for task in config.extra_tasks))
    return sum(teacher.replicas * teacher.num_cpus for teacher in teachers) + students


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
    stop_job_on_sigterm(config)  # after ray.init, which installs its own SIGTERM handler (exit at once)
    try:
        yield
    finally:
        ray.shutdown()


def stop_job_on_sigterm(config: JobConfig) -> None:
    """Makes SIGTERM (``polydistill stop``, ``ray job stop``) set the job's stop flag instead of
    killing the driver: the students checkpoint, the actors exit and the driver winds down as after
    a normal end (Ray waits RAY_JOB_STOP_WAIT_TIME_S before SIGKILL). Only with a configured Redis
    (a private one dies with the driver anyway), and only from the main thread (Python's rule)."""
    url = configured_redis_url(config)
    if not url or threading.current_thread() is not threading.main_thread():
        return
    from polydistill.cluster.config import with_redis_password
    from polydistill.storage.keys import CONTROL_STOP, JobKeys
    from polydistill.storage.streams import connect

    def request_stop(signum, frame) -> None:
        resolved = with_redis_password(config)
        transport = resolved.transport
        client = connect(url, password=transport.password, username=transport.username,
                         tls_ca_file=transport.tls_ca_file, socket_timeout=5, reconnect_timeout_s=5)
        client.hset(JobKeys(resolved.resolved_job_id, transport.namespace).control, CONTROL_STOP, "1")
        print("SIGTERM: asked every worker to stop after its current batch", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, request_stop)
