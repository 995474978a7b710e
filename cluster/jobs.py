"""Jobs on a Ray cluster, through the Ray Jobs API: submit, status, logs, stop, scale.

    polydistill submit CONFIG --address http://HEAD:8265 [--redis-url URL]   → prints the job id
    polydistill status JOB    polydistill logs JOB [--follow]
    polydistill scale JOB --teachers N | --auto      polydistill stop JOB

**What runs.** ``submit`` validates the config here first (a typo fails before anything is
uploaded), then uploads the config's folder (with the data it names by relative path) as the
job's ``working_dir`` and the installed ``polydistill`` package as a ``py_modules`` entry, and runs
``python -m polydistill run CONFIG`` on the cluster, where the driver joins the cluster and starts
the feeder, the teacher pool and the student as Ray actors. Nothing of a source checkout is
needed: the package shipped is the one this command was imported from.

**Where the Redis is.** Status, scale and a graceful stop talk to the job's Redis, so a submitted
job should name one that this machine and every node can reach: ``--redis-url`` (or
``$POLYDISTILL_REDIS_URL``, or ``transport.redis_url`` in the config). The URL reaches the job as
the environment variable ``POLYDISTILL_REDIS_URL`` of its runtime_env. ``submit`` stores the job's
Redis coordinates in the Ray job's metadata (the URL, the password variable's name or file's path),
so ``status``/``scale``/``stop`` need only the job id; ``--redis-url`` supplies another URL. A job
submitted without any Redis URL uses a private Redis on the driver's node: it runs and stops, but
``status`` shows only Ray's view of it and ``scale`` is impossible.

**The Redis password** never travels with the job: the entrypoint (with every ``--set``), the
runtime_env and the metadata are shown by ``ray job list`` and the dashboard, and the uploaded
config is readable on the cluster. ``submit`` refuses a password in the config, in a ``--set`` or in
the URL (cluster/secrets.py); the driver and every actor read it on their node from
$POLYDISTILL_REDIS_PASSWORD, the variable ``transport.password_env`` names, or the file
``transport.password_file``. The job commands here read it the same way on this machine.

**Ids.** The id returned (Ray's submission id) is also the job's polydistill ``job_id`` (the name
of its Redis keys) unless the config sets one, so two submissions of one config never share keys.

**Stopping.** ``stop`` sets the job's stop flag in Redis, recording that ``polydistill stop`` set it
(cluster/stopping.py; students save a checkpoint, teachers finish their batch, every actor exits)
and asks Ray to stop the job; Ray sends the driver SIGTERM, which the CLI turns into the same stop
flag, and kills it only after ``RAY_JOB_STOP_WAIT_TIME_S`` (set by ``submit``, default 60 s) — time
for the driver to collect its actors, remove the job's Redis keys and write the report, whose
status is "stopped" unless every sample was already distilled; ``polydistill resume OUTPUT_DIR``
continues it. Ray then reports the job STOPPED.

**Authentication.** A cluster with Ray token authentication (the default for local clusters since
Ray 2.59 when a token exists) needs ``RAY_AUTH_MODE=token`` and the token (``~/.ray/auth_token`` or
``RAY_AUTH_TOKEN``) in the environment of these commands, exactly as for ``ray job submit``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from polydistill.cluster.config import ConfigError, TransportConfig, load_config, redis_password, url_carries_password
from polydistill.cluster.secrets import refuse_secrets_in_submission
from polydistill.cluster.services import REDIS_URL_ENV
from polydistill.cluster.stopping import STOPPED_BY_STOP_COMMAND, request_stop
from polydistill.storage.keys import (
    CONTROL_DESIRED_TEACHERS,
    METRIC_POOL_REASON,
    METRIC_TEACHERS_RUNNING,
    METRIC_TEACHERS_WANTED,
    TEACHER_GROUP,
    TEACHER_STARTED,
    JobKeys,
    dev_accuracies,
    parse_teacher_metric_field,
)
from polydistill.storage.streams import connect

# Not uploaded: environments, VCS data, outputs, caches.
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", ".git", ".ci", "runs", "out", "__pycache__", "*.pyc", ".pytest_cache",
    "*.egg-info", "build", "dist",
]
DEFAULT_STOP_WAIT_S = 60
AGENT_WAIT_S = 60.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# Keys of the Ray job's metadata (strings only: the Jobs API stores str -> str).
META_JOB_ID = "polydistill_job_id"
META_NAMESPACE = "polydistill_namespace"
META_REDIS_URL = "polydistill_redis_url"
META_PASSWORD_ENV = "polydistill_password_env"
META_PASSWORD_FILE = "polydistill_password_file"
META_USERNAME = "polydistill_redis_username"  # an ACL user's name; never its password
META_TLS_CA_FILE = "polydistill_tls_ca_file"


class JobsError(RuntimeError):
    """A job command cannot do what was asked; the message says what to change."""


@dataclass(frozen=True)
class JobRef:
    """Where a submitted job's state lives."""

    submission_id: str
    job_id: str
    namespace: str
    redis_url: str | None
    password_env: str | None
    password_file: str | None = None
    username: str | None = None
    tls_ca_file: str | None = None

    @property
    def keys(self) -> JobKeys:
        return JobKeys(self.job_id, self.namespace)


def _client(address: str | None, headers: dict[str, str] | None = None):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        where = f"at {address}" if address else "found on this machine (no --address given)"
        raise ConnectionError(
            f"the Ray cluster {where} asks for its authentication token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(or ~/.ray/auth_token) as for `ray job submit`, or give --address the cluster that runs the job. A job "
            "run with `polydistill run` is not a submitted job: its progress is in its own output") from None


# --------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmissionRequest:
    """What ``submit`` sends the Ray Jobs API besides the uploads: everything ``ray job list`` and the
    dashboard show of the job."""

    submission_id: str
    entrypoint: str
    env_vars: dict[str, str]  # the runtime_env's
    metadata: dict[str, str]
    working_dir: Path  # uploaded (a copy) as the runtime_env's working_dir


def submission_request(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    output_dir: str | None = None,
    redis_url: str | None = None,
    *,
    submission_id: str | None = None,
    working_dir: Path | None = None,
    python: str = "python",
    stop_wait_s: int = DEFAULT_STOP_WAIT_S,
) -> SubmissionRequest:
    """Validates the job here (a typo fails before anything is uploaded) and builds its submission.

    ``working_dir``: the folder uploaded beside the package, holding the config and whatever it
    names by relative path (default: the config's own folder)."""
    config = load_config(config_path, overrides, output_dir)  # fail here, not on the cluster
    working_dir = Path(working_dir or Path(config_path).resolve().parent)
    try:
        relative_config = Path(config_path).resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise ConfigError(
            f"{config_path}: the config must lie inside the working directory {working_dir}, which is "
            "uploaded as the job's working_dir; pass a folder that holds it"
        ) from None
    if redis_url and config.transport.redis_url and redis_url != config.transport.redis_url:
        raise ConfigError("--redis-url differs from transport.redis_url in the config: give the Redis in one place")
    refuse_secrets_in_submission(config, redis_url)
    url = config.transport.redis_url or redis_url
    if url:
        try:
            connect(url)  # a malformed URL fails here; reachability is the cluster's business
        except ValueError as exc:
            setting = "transport.redis_url" if config.transport.redis_url else "--redis-url"
            raise ConfigError(f"{setting}: {exc}") from None
    submission_id = submission_id or f"{config.resolved_job_id}-{secrets.token_hex(4)}"
    job_id = config.job_id or submission_id
    # Checked by the same rule as the config, before anything is uploaded.
    load_config(config_path, [*overrides, f"job_id={job_id}"], output_dir)

    args = ["run", relative_config.as_posix(), "--set", f"job_id={job_id}"]
    for item in overrides:
        args += ["--set", item]
    if output_dir is not None:
        args += ["--output", output_dir]
    entrypoint = " ".join([python, "-m", "polydistill", *map(shlex.quote, args)])

    env_vars = {
        "RAY_ADDRESS": "auto",  # the driver joins this cluster instead of starting a local Ray
        "RAY_JOB_STOP_WAIT_TIME_S": str(stop_wait_s),  # SIGTERM -> SIGKILL grace for `stop`
    }
    if url and not config.transport.redis_url:
        env_vars[REDIS_URL_ENV] = url
    metadata = {META_JOB_ID: job_id, META_NAMESPACE: config.transport.namespace}
    if url:
        metadata[META_REDIS_URL] = url
    if config.transport.password_env:
        metadata[META_PASSWORD_ENV] = config.transport.password_env
    if config.transport.password_file:
        metadata[META_PASSWORD_FILE] = config.transport.password_file
    if config.transport.username:
        metadata[META_USERNAME] = config.transport.username
    if config.transport.tls_ca_file:
        metadata[META_TLS_CA_FILE] = config.transport.tls_ca_file
    return SubmissionRequest(submission_id, entrypoint, env_vars, metadata, working_dir)


def submit(
    address: str | None,
    config_path: str | Path,
    overrides: Sequence[str] = (),
    output_dir: str | None = None,
    redis_url: str | None = None,
    *,
    submission_id: str | None = None,
    working_dir: Path | None = None,
    python: str = "python",
    stop_wait_s: int = DEFAULT_STOP_WAIT_S,
    headers: dict[str, str] | None = None,
) -> str:
    """Submits a job (``submission_request``) and returns its id at once (the job runs on the cluster)."""
    request = submission_request(config_path, overrides, output_dir, redis_url, submission_id=submission_id,
                                 working_dir=working_dir, python=python, stop_wait_s=stop_wait_s)
    client = _client(address, headers)
    with tempfile.TemporaryDirectory(prefix="polydistill-submit-") as staging:
        # Upload a copy: Ray hashes the directory to name the package and hashes it again to upload
        # it, so a file saved in between (an editor, a running test) would leave the job pointing at
        # a package that was never uploaded.
        snapshot = Path(staging) / "working_dir"
        shutil.copytree(request.working_dir, snapshot, symlinks=True, ignore=_excluded)
        package = stage_package(Path(staging) / "modules")
        runtime_env = {"working_dir": str(snapshot), "py_modules": [str(package)],
                       "excludes": WORKING_DIR_EXCLUDES, "env_vars": request.env_vars}
        # Right after a head starts, its dashboard answers before the agent that launches jobs has
        # registered; Ray then refuses the job ("No available agent") without creating it, so retrying
        # with the same submission id is safe.
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(entrypoint=request.entrypoint, submission_id=request.submission_id,
                                         runtime_env=runtime_env, metadata=request.metadata)
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


def stage_package(into: Path) -> Path:
    """A copy of the installed ``polydistill`` package, as one folder Ray can ship as a module.

    The subpackages may lie apart on this machine (an editable install maps the repository's
    top-level folders into the package); on the cluster they must sit inside one ``polydistill``
    folder. The bundled examples are data the job does not import, so they stay behind."""
    from importlib.util import find_spec

    target = into / "polydistill"
    top = Path(find_spec("polydistill").origin).parent
    shutil.copytree(top, target, ignore=lambda folder, names: _excluded(folder, names)
                    | ({"examples"} if Path(folder) == top else set()))
    for name in ("storage", "student", "actors", "cluster"):
        folder = Path(find_spec(f"polydistill.{name}").origin).parent
        shutil.copytree(folder, target / name, ignore=_excluded, dirs_exist_ok=True)
    return target


def _excluded(directory: str, names: list[str]) -> set[str]:
    """shutil.copytree's ignore: the names that WORKING_DIR_EXCLUDES leaves out (by name, any depth)."""
    return {name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in WORKING_DIR_EXCLUDES)}


# --------------------------------------------------------------------------------------------------
# finding a job's Redis
# --------------------------------------------------------------------------------------------------


def job_ref(info, submission_id: str, redis_url: str | None = None) -> JobRef:
    metadata = info.metadata or {}
    if META_JOB_ID not in metadata:
        raise JobsError(f"Ray job {submission_id} was not submitted by `polydistill submit` (no {META_JOB_ID} metadata)")
    return JobRef(
        submission_id=submission_id,
        job_id=metadata[META_JOB_ID],
        namespace=metadata.get(META_NAMESPACE, "polydistill"),
        redis_url=redis_url or metadata.get(META_REDIS_URL),
        password_env=metadata.get(META_PASSWORD_ENV),
        password_file=metadata.get(META_PASSWORD_FILE),
        username=metadata.get(META_USERNAME),
        tls_ca_file=metadata.get(META_TLS_CA_FILE),
    )


def _redis(ref: JobRef, needed_for: str):
    if not ref.redis_url:
        raise JobsError(
            f"{needed_for} needs job {ref.submission_id}'s Redis, whose URL was not stored at submission "
            "(the job uses a private Redis): pass --redis-url or set "
            f"${REDIS_URL_ENV}"
        )
    password = None
    if not url_carries_password(ref.redis_url):
        # Read as the job's own processes read it, from the same sources, on this machine.
        try:
            password = redis_password(TransportConfig(password_env=ref.password_env, password_file=ref.password_file))
        except ConfigError as exc:
            raise JobsError(f"{needed_for} needs job {ref.submission_id}'s Redis password on this machine: "
                            f"{exc}") from None
    # The job's ACL user and CA, as stored at submission: status, scale and stop reach its Redis as it does.
    return connect(ref.redis_url, password=password, username=ref.username, tls_ca_file=ref.tls_ca_file,
                   socket_timeout=10, reconnect_timeout_s=10)


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------


def status(address: str | None, submission_id: str, redis_url: str | None = None, *,
           headers: dict[str, str] | None = None) -> dict:
    """Ray's view of the job plus its progress from Redis (None when that Redis is unknown)."""
    info = _client(address, headers).get_job_info(submission_id)
    ref = job_ref(info, submission_id, redis_url)
    result = {
        "submission_id": submission_id,
        "job_id": ref.job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "progress": None,
    }
    if ref.redis_url:
        client = _redis(ref, "status")
        try:
            result["progress"] = read_progress(client, ref.keys)
        finally:
            client.close()
    return result


def read_progress(client, keys: JobKeys) -> dict | None:
    """The job's progress as its workers report it in Redis; None when the job has no keys (not yet
    started distilling, or finished and removed them)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.progress)
    pipe.hgetall(keys.metrics)
    pipe.hget(keys.control, CONTROL_DESIRED_TEACHERS)
    pipe.exists(keys.work_stream, keys.knowledge_stream)
    progress, metrics, desired, streams_exist = pipe.execute()
    if not progress and not metrics and not streams_exist:
        return None
    text = {k.decode(): v.decode() for k, v in progress.items()}
    per_epoch = {
        name.removeprefix("samples_epoch_"): int(value)
        for name, value in text.items() if name.startswith("samples_epoch_")
    }
    replicas: dict[str, dict[str, float]] = {}
    pool: dict[str, str] = {}
    for raw_field, raw_value in metrics.items():
        name = raw_field.decode()
        parsed = parse_teacher_metric_field(name)
        if parsed is not None:
            replicas.setdefault(parsed[0], {})[parsed[1]] = float(raw_value)
        elif name in (METRIC_TEACHERS_WANTED, METRIC_TEACHERS_RUNNING, METRIC_POOL_REASON):
            pool[name] = raw_value.decode()
    return {
        "samples": int(float(text.get("samples", 0))),
        "samples_per_epoch": per_epoch,
        "step": int(float(text.get("step", 0))),
        "loss": float(text["loss"]) if "loss" in text else None,
        "dev_accuracy": dev_accuracies(text),  # [(epochs done, accuracy)], with training.validate_each_epoch
        "samples_per_s": float(text["samples_per_s"]) if "samples_per_s" in text else None,
        "teachers_wanted": int(pool[METRIC_TEACHERS_WANTED]) if METRIC_TEACHERS_WANTED in pool else None,
        "teachers_running": int(pool[METRIC_TEACHERS_RUNNING]) if METRIC_TEACHERS_RUNNING in pool else None,
        "teachers_override": int(desired) if desired is not None else None,
        "pool_reason": pool.get(METRIC_POOL_REASON),
        "replicas": {
            replica_id: {
                "serving": TEACHER_STARTED in c,  # loaded its model and reads work (TEACHER_STARTED)
                "batches": int(c.get("batches", 0)),
                "samples": int(c.get("samples", 0)),
                "batches_per_busy_s": round(c["batches"] / c["busy_seconds"], 2) if c.get("busy_seconds") else None,
            }
            for replica_id, c in sorted(replicas.items())
        },
        "streams": {
            "work": _stream_state(client, keys.work_stream, TEACHER_GROUP),
            "knowledge": _stream_state(client, keys.knowledge_stream, keys.student_group("student")),
        },
    }


def _stream_state(client, stream: str, group: str) -> dict:
    """Entries in the stream, and of those how many a consumer holds unacknowledged (pending) and
    how many no consumer has read yet (lag, Redis >= 7)."""
    state: dict = {"length": int(client.xlen(stream)), "pending": None, "lag": None}
    try:
        groups = client.xinfo_groups(stream)
    except Exception:  # no such stream (yet, or any more)
        return state
    for info in groups:
        name = info.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            state["pending"] = int(info.get("pending", 0))
            lag = info.get("lag")
            state["lag"] = int(lag) if lag is not None else None
    return state


def format_status(result: dict) -> str:
    lines = [f"job {result['submission_id']} (keys {result['job_id']}): {result['status']}"]
    if result.get("message"):
        lines.append(f"  ray: {result['message']}")
    progress = result.get("progress")
    if progress is None:
        lines.append("  progress: none in Redis (not distilling yet, finished, or its Redis is unknown here)")
        return "\n".join(lines)
    epochs = ", ".join(f"epoch {e}: {n}" for e, n in sorted(progress["samples_per_epoch"].items(), key=lambda i: int(i[0])))
    rate = f"{progress['samples_per_s']:.1f} samples/s" if progress["samples_per_s"] is not None else "rate unknown"
    loss = f"loss {progress['loss']:.4f}" if progress["loss"] is not None else "no loss yet"
    lines.append(f"  student: {progress['samples']} samples ({epochs or 'none yet'}), step {progress['step']}, {loss}, {rate}")
    if progress.get("dev_accuracy"):
        scored = ", ".join(f"{accuracy:.1%} after epoch {epochs}" for epochs, accuracy in progress["dev_accuracy"])
        lines.append(f"  dev accuracy: {scored}")
    override = f", manual override {progress['teachers_override']}" if progress["teachers_override"] is not None else ""
    lines.append(f"  teachers: {progress['teachers_running']} running / {progress['teachers_wanted']} wanted{override}"
                 f" ({progress['pool_reason'] or 'no decision yet'})")
    for replica_id, counters in progress["replicas"].items():
        state = "" if counters["serving"] else " (starting)"
        lines.append(f"    {replica_id}{state}: {counters['batches']} batches, {counters['samples']} samples, "
                     f"{counters['batches_per_busy_s']} batches per busy second")
    for name, state in progress["streams"].items():
        lines.append(f"  {name} stream: {state['length']} entries, {state['pending']} pending, lag {state['lag']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# logs, scale, stop
# --------------------------------------------------------------------------------------------------


def logs(address: str | None, submission_id: str, follow: bool = False, out: TextIO | None = None, *,
         headers: dict[str, str] | None = None) -> str:
    """The job's driver output so far; with ``follow``, streams it to ``out`` until the job ends."""
    client = _client(address, headers)
    if not follow:
        text = client.get_job_logs(submission_id)
        if out is not None:
            out.write(text)
        return text
    out = out or sys.stdout
    seen: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()
            seen.append(chunk)

    asyncio.run(tail())
    return "".join(seen)


def scale(address: str | None, submission_id: str, teachers: int | None, redis_url: str | None = None, *,
          headers: dict[str, str] | None = None) -> None:
    """Pins the teacher pool at ``teachers`` replicas while the job runs; None hands it back to the
    policy (``teacher.autoscaling``) or to ``teacher.replicas``."""
    if teachers is not None and teachers < 0:
        raise JobsError(f"--teachers must be 0 or more, got {teachers}")
    ref = job_ref(_client(address, headers).get_job_info(submission_id), submission_id, redis_url)
    client = _redis(ref, "scale")
    try:
        if teachers is None:
            client.hdel(ref.keys.control, CONTROL_DESIRED_TEACHERS)
        else:
            client.hset(ref.keys.control, CONTROL_DESIRED_TEACHERS, teachers)
    finally:
        client.close()


def stop(address: str | None, submission_id: str, redis_url: str | None = None, *, wait_s: float = 120.0,
         headers: dict[str, str] | None = None) -> str:
    """Stops the job cleanly and returns its final Ray status (or the current one after ``wait_s``)."""
    client = _client(address, headers)
    info = client.get_job_info(submission_id)
    current = str(getattr(info.status, "value", info.status))
    if current in TERMINAL:
        return current
    ref = job_ref(info, submission_id, redis_url)
    if ref.redis_url:
        redis_client = _redis(ref, "stop")
        try:
            request_stop(redis_client, ref.keys, STOPPED_BY_STOP_COMMAND)
        finally:
            redis_client.close()
    # Ray sends SIGTERM (turned into the same stop flag by the driver) and marks the job STOPPED once
    # the driver has exited; it kills the driver only after RAY_JOB_STOP_WAIT_TIME_S.
    client.stop_job(submission_id)
    return wait_until_done(client, submission_id, wait_s)


def wait_until_done(client, submission_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        current = str(getattr(client.get_job_status(submission_id), "value", ""))
        if current in TERMINAL or time.monotonic() >= deadline:
            return current
        time.sleep(poll_s)
