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
from polydistill.cluster.stopping import STOPPED_BY_SIGTERM, stop_from_signal
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
    # Ctrl-C in a terminal signals the whole foreground process group: the job's own Redis must not
    # shut down with it, since the driver stops the job through it (cluster/stopping.py). The server
    # inherits the blocked SIGINT; Ray starts its own processes the same way.
    with _sigint_blocked():
        server = PrivateRedisServer().start()
    with server:
        log.info("started a private redis-server for this job on %s", server.url)
        yield server.url


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread, and so in every process started from it meanwhile."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


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
    a normal end, reporting the job stopped (Ray waits RAY_JOB_STOP_WAIT_TIME_S before SIGKILL).
    Only with a configured Redis (a private one dies with the driver anyway), and only from the main
    thread (Python's rule)."""
    url = configured_redis_url(config)
    if not url or threading.current_thread() is not threading.main_thread():
        return

    def request_stop(signum, frame) -> None:
        stop_from_signal(config, url, STOPPED_BY_SIGTERM)
        print("SIGTERM: asked every worker to stop after its current batch", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, request_stop)
