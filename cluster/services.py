"""The services a job needs, embedded when none is configured: a private Redis and a local Ray.

On a cluster the same job joins the configured Redis and the running Ray cluster instead; the
rest of the code cannot tell the difference.

A configured Redis is checked before anything slow starts (``job_redis``): its URL, that it
answers, that it takes the job's credentials, and that the job id is not another run's
(storage/ownership.py). Each check fails in a few seconds with one line naming the setting to
change.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
import redis

from polydistill.cluster.config import ConfigError, JobConfig, with_redis_password
from polydistill.cluster.secrets import check_handoff_reaches, password_handoff, separate_url_password, without_password
from polydistill.cluster.stopping import STOPPED_BY_SIGTERM, stop_from_signal
from polydistill.storage.keys import JobKeys
from polydistill.storage.ownership import JobOwnership
from polydistill.storage.redis_server import PrivateRedisServer
from polydistill.storage.streams import RedisUnavailable, connect, connect_job, redact_url

log = logging.getLogger(__name__)


# Where a submitted job finds its Redis when the config names none (`polydistill submit` sets it in
# the job's runtime_env, so the URL never appears in the entrypoint that `ray job list` shows).
REDIS_URL_ENV = "POLYDISTILL_REDIS_URL"
# The checks before a job starts wait this long for an answer: a Redis that does not answer in a few
# seconds when nothing loads it is down, unreachable or behind a firewall.
REDIS_CHECK_TIMEOUT_S = 5.0


class RedisCheckFailed(ConfigError):
    """The job's Redis cannot be used as configured; the message names the setting to change."""


def configured_redis_url(config: JobConfig) -> str | None:
    """transport.redis_url, else $POLYDISTILL_REDIS_URL, else None (a private server)."""
    return config.transport.redis_url or os.environ.get(REDIS_URL_ENV) or None


def _url_setting(config: JobConfig) -> str:
    return "transport.redis_url" if config.transport.redis_url else f"${REDIS_URL_ENV}"


@dataclass(frozen=True)
class JobRedis:
    """The job's Redis as the driver uses it, checked and held (``job_redis``)."""

    url: str  # without a password: fit for logs and actors
    config: JobConfig  # the config to give actors: no password in it (cluster/secrets.py)
    ownership: JobOwnership
    private: bool  # a redis-server of this job's own, gone with the driver


@contextmanager
def job_redis(config: JobConfig) -> Iterator[JobRedis]:
    """The job's Redis, checked and held for the block: a configured one must answer a PING with the
    job's credentials (``check_redis``), otherwise a private server starts for the job; then the run
    takes the job id (``JobOwnership``; ``JobInUse`` while another run holds it) and keeps it until the
    block ends, when the job's keys go, whatever the outcome, if they are still this run's.

    Fails in a few seconds, before any model is built or Ray starts: ``RedisCheckFailed``, or
    ``ConfigError`` for a password source that cannot be read."""
    url = configured_redis_url(config)
    if url is not None:
        config, url = separate_url_password(config, url, _url_setting(config))
    resolved = with_redis_password(config)
    check_handoff_reaches(config, joins_a_cluster=bool(os.environ.get("RAY_ADDRESS")))
    with _redis_server(url, resolved) as (url, private):
        transport = resolved.transport
        client = connect_job(url, transport)
        # The lease is renewed on a client of its own that gives up quickly: a renewal held up by an
        # outage must not hold up the end of the job.
        lease_client = connect(url, password=transport.password, username=transport.username,
                               tls_ca_file=transport.tls_ca_file, socket_timeout=REDIS_CHECK_TIMEOUT_S,
                               reconnect_timeout_s=REDIS_CHECK_TIMEOUT_S)
        unreachable = False
        try:
            ownership = _claim(client, config)
            try:
                with password_handoff(config) as actor_config, ownership.renewed(lease_client):
                    yield JobRedis(url, actor_config, ownership, private)
            except RedisUnavailable:
                unreachable = True
                raise
            finally:
                if unreachable:  # removing them would only wait out the reconnect budget once more
                    log.warning("job %s: Redis is unreachable, so the job's keys stay there; the next run of this "
                                "job id removes them", ownership.keys.job_id)
                else:
                    ownership.end()
        finally:
            client.close()
            lease_client.close()


@contextmanager
def _redis_server(url: str | None, resolved: JobConfig) -> Iterator[tuple[str, bool]]:
    """(url, private): the configured Redis once it answers, or a private server started for the job
    (which takes the job's password, when one is set)."""
    if url is not None:
        check_redis(url, resolved)
        yield url, False
        return
    # Ctrl-C in a terminal signals the whole foreground process group: the job's own Redis must not
    # shut down with it, since the driver stops the job through it (cluster/stopping.py). The server
    # inherits the blocked SIGINT; Ray starts its own processes the same way.
    with _sigint_blocked():
        server = PrivateRedisServer(password=resolved.transport.password,
                                    maxmemory=resolved.transport.private_redis_maxmemory).start()
    with server:
        url = without_password(server.url)
        log.info("started a private redis-server for this job on %s", url)
        yield url, True


def check_redis(url: str, resolved: JobConfig, timeout_s: float = REDIS_CHECK_TIMEOUT_S) -> None:
    """A PING with the job's credentials, answered within ``timeout_s``; ``RedisCheckFailed`` names
    the setting to change otherwise. ``resolved``: the config with its password read."""
    transport = resolved.transport
    url_setting = _url_setting(resolved)
    try:
        client = connect(url, password=transport.password, username=transport.username,
                         tls_ca_file=transport.tls_ca_file, socket_timeout=timeout_s, reconnect_timeout_s=timeout_s)
    except ValueError as exc:  # the scheme, or a user or CA file given where it does not fit
        raise RedisCheckFailed(f"{url_setting}: {exc}") from None
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        raise RedisCheckFailed(
            f"Redis at {redact_url(url)} refused the job's credentials ({exc}): check the password "
            f"({_password_setting(resolved)}) and the user (transport.username)"
        ) from None
    except RedisUnavailable as exc:
        tls = " and transport.tls_ca_file" if url.startswith("rediss://") else ""
        raise RedisCheckFailed(
            f"Redis at {redact_url(url)} did not answer within {timeout_s:g} s ({exc.__cause__ or exc}): check "
            f"{url_setting}{tls}, and that the server runs and is reachable from this machine"
        ) from None
    except redis.RedisError as exc:
        raise RedisCheckFailed(f"Redis at {redact_url(url)} refused a PING ({exc}): check {url_setting}") from None
    finally:
        client.close()


def _password_setting(config: JobConfig) -> str:
    """Where the password that was sent came from, or how to give one."""
    transport = config.transport
    if transport.password_env is not None:
        return f"transport.password_env: ${transport.password_env}"
    if transport.password_file is not None:
        return f"transport.password_file: {transport.password_file}"
    if transport.password is not None:
        return "transport.password, or the password inside the Redis URL"
    return "none was given: set transport.password_env, transport.password_file or $POLYDISTILL_REDIS_PASSWORD"


def _claim(client: redis.Redis, config: JobConfig) -> JobOwnership:
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    try:
        return JobOwnership.claim(client, keys)
    except redis.exceptions.NoPermissionError as exc:
        raise RedisCheckFailed(
            f"the Redis user may not write the job's keys ({keys.pattern}): {exc}; grant it that prefix "
            "(see docs/security.md), or set transport.username"
        ) from None


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
    actors = sum(teacher.replicas * teacher.num_cpus for teacher in teachers) + students
    # The heavy stages (cluster/stages.py) run while no actor does: the largest of them must fit too.
    return max(actors, config.finetune_resources.num_cpus, config.evaluation_resources.num_cpus)


@contextmanager
def ray_for(job: JobRedis) -> Iterator[bool]:
    """Joins the Ray cluster named by RAY_ADDRESS (or already initialised); otherwise starts a local one.
    Yields whether it started a local Ray (whose resources are all there will ever be)."""
    if ray.is_initialized():
        yield False
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        # Logical CPUs only gate scheduling; torch threads per actor are set from the config, so
        # the local node may offer more slots than cores without oversubscribing them.
        cpus = max(float(os.cpu_count() or 1), logical_cpus_needed(job.config))
        ray.init(num_cpus=int(-(-cpus // 1)), include_dashboard=None, log_to_driver=True,
                 configure_logging=True, logging_level=logging.WARNING)
    try:
        yield not os.environ.get("RAY_ADDRESS")
    finally:
        ray.shutdown()


def stop_job_on_sigterm(job: JobRedis) -> None:
    """Makes SIGTERM (``polydistill stop``, ``ray job stop``) set the job's stop flag instead of
    killing the driver: the students checkpoint, the actors exit and the driver winds down as after
    a normal end, reporting the job stopped (Ray waits RAY_JOB_STOP_WAIT_TIME_S before SIGKILL).
    Installed when distilling begins (after ray.init, which installs its own SIGTERM handler: exit at
    once, which before then is the right answer, since the stop flag is only read while distilling).
    Only with a configured Redis (a private one dies with the driver anyway), and only from the main
    thread (Python's rule)."""
    if job.private or threading.current_thread() is not threading.main_thread():
        return

    def request_stop(signum, frame) -> None:
        stop_from_signal(job.config, job.url, STOPPED_BY_SIGTERM)
        print("SIGTERM: asked every worker to stop after its current batch", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, request_stop)
