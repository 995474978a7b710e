"""Stopping a job, and telling a stop that someone asked for from a job that went wrong.

Every worker leaves when the job's stop flag (``CONTROL_STOP`` in its control hash) is set; the
students save a checkpoint on their way out. Four parties set it::

    the driver              its own end (every student done) or its own abort (dead letters, a crash)
    `polydistill stop`      cluster/jobs.py, before asking Ray to stop the job
    SIGTERM to the driver   Ray Jobs' stop, a scheduler ending the process (cluster/services.py)
    Ctrl-C                  the first press, in the driver (``InterruptStops``)

Each writes who it is (``CONTROL_STOPPED_BY``) in the same transaction as the flag, unless
someone else was first. Once the students have returned, the driver reads it before it sets the
flag itself, so it knows whether the job ended because it was told to (``job_outcome``): short
of samples after a stop from outside, the job is *stopped*, and ``polydistill resume`` continues
it from the checkpoint; short of samples with nobody but the driver stopping it, samples were
lost or doubled, which is an accounting failure.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import redis

from polydistill.cluster.config import JobConfig, with_redis_password
from polydistill.storage.keys import CONTROL_STOP, CONTROL_STOPPED_BY, JobKeys
from polydistill.storage.streams import connect

log = logging.getLogger(__name__)

STOPPED_BY_DRIVER = "driver"
STOPPED_BY_STOP_COMMAND = "polydistill stop"
STOPPED_BY_SIGTERM = "SIGTERM"
STOPPED_BY_INTERRUPT = "Ctrl-C"
# The flag was set without saying who: a script or an older client writing CONTROL_STOP alone.
STOPPED_BY_UNNAMED = "another process"

Outcome = Literal["completed", "stopped", "failed"]
InterruptAction = Literal["request stop", "end at once", "ignore"]


# -- deciding (pure) ----------------------------------------------------------------------------
def stopped_from_outside(stopped_by: str | None) -> bool:
    """Whether someone other than the driver set the stop flag (``stopped_by`` from ``stop_requested_by``)."""
    return stopped_by is not None and stopped_by != STOPPED_BY_DRIVER


class EndNow(Exception):
    """Raised by a caller's progress listener (``run_job``'s ``on_progress``) to end the job at once: every actor
    killed, the keys removed, ``JobStopped`` raised. A search's scheduler stopping a trial ends its job so."""


def job_outcome(shortfall: Sequence[str], stopped_by: str | None) -> Outcome:
    """How a job ended, from what it failed to distil and who had set the stop flag before the driver.

    A job that distilled everything completed, even when a stop came in as it finished."""
    if not shortfall:
        return "completed"
    return "stopped" if stopped_from_outside(stopped_by) else "failed"


def accounting_shortfall(report: Mapping, missing_batches: Mapping[str, Sequence[Sequence[int]]] = {}) -> list[str]:
    """What the job did not distil exactly once, one phrase per student and task; empty when exact.

    ``missing_batches``: by student, the (epoch, batch) pairs it never applied."""
    expected = report["samples_expected"]
    distilled = {"student": (report["samples_distilled"], expected),
                 **{name: (extra["samples_distilled"], extra.get("samples_expected", expected))
                    for name, extra in report.get("extra_students", {}).items()}}
    shortfall = []
    for name, (samples, wanted) in distilled.items():
        if samples != wanted:
            phrase = f"student {name!r} distilled {samples} samples, {wanted} expected"
            if missing_batches.get(name):
                phrase += f" (never applied: {_batch_list(missing_batches[name])})"
            shortfall.append(phrase)
    for name, task in (report.get("tasks") or {}).items():
        if task["samples_distilled"] != task["samples_expected"]:
            shortfall.append(f"task {name!r} distilled {task['samples_distilled']} samples, "
                             f"{task['samples_expected']} expected")
    if report["batches_missing"]:
        shortfall.append(f"{report['batches_missing']} of {report['batches_expected']} batches missing")
    if shortfall and report.get("dead_letters"):
        shortfall.append(f"{report['dead_letters']} messages dead-lettered")
    return shortfall


def _batch_list(pairs: Sequence[Sequence[int]], shown: int = 5) -> str:
    names = [f"epoch {epoch} batch {batch}" for epoch, batch in pairs[:shown]]
    more = f" and {len(pairs) - shown} more" if len(pairs) > shown else ""
    return ", ".join(names) + more


def stop_summary(stopped_by: str, output_dir: Path, samples_kept: int | None, samples_expected: int | None,
                 checkpoint: Path | None) -> str:
    """The one line a stopped job leaves: what it distilled, what was kept, and how to continue it.

    ``samples_kept`` None: a fresh run that had not begun distilling, so there is nothing to resume
    (a checkpoint left in its folder by an earlier run is not its own)."""
    resume = f"polydistill resume {shlex.quote(str(output_dir))}"
    if samples_kept is None:
        return f"stopped by {stopped_by} before distilling began: nothing to resume"
    of = f" of {samples_expected}" if samples_expected is not None else ""
    if checkpoint is None:
        return (f"stopped by {stopped_by} before the student saved a checkpoint (nothing kept); "
                f"start it again with: {resume}")
    return f"stopped by {stopped_by}: {samples_kept}{of} samples distilled, checkpoint in {checkpoint}; " \
           f"continue with: {resume}"


def interrupt_action(can_request_stop: bool, stop_requested: bool, ending: bool) -> InterruptAction:
    """What one Ctrl-C does: the first asks the job to stop (its students checkpoint), the next ends
    the driver at once, and any later press is ignored so that ending at once is not cut short."""
    if ending:
        return "ignore"
    if can_request_stop and not stop_requested:
        return "request stop"
    return "end at once"


# -- acting ---------------------------------------------------------------------------------------
def request_stop(client: redis.Redis, keys: JobKeys, by: str) -> None:
    """Sets the job's stop flag and, unless someone else already did, records ``by`` as who set it."""
    transaction = client.pipeline(transaction=True)
    transaction.hsetnx(keys.control, CONTROL_STOPPED_BY, by)
    transaction.hset(keys.control, CONTROL_STOP, "1")
    transaction.execute()


def stop_requested_by(client: redis.Redis, keys: JobKeys) -> str | None:
    """Who set the job's stop flag (``STOPPED_BY_UNNAMED`` when they did not say); None when it is not set."""
    flag, by = client.hmget(keys.control, [CONTROL_STOP, CONTROL_STOPPED_BY])
    if flag != b"1":
        return None
    return by.decode() if by else STOPPED_BY_UNNAMED


def stop_from_signal(config: JobConfig, redis_url: str, by: str) -> None:
    """``request_stop`` from a signal handler: on a connection of its own, since the interrupted code
    may be half-way through a command on the driver's, and with short timeouts."""
    resolved = with_redis_password(config)
    transport = resolved.transport
    client = connect(redis_url, password=transport.password, username=transport.username,
                     tls_ca_file=transport.tls_ca_file, socket_timeout=5, reconnect_timeout_s=5)
    try:
        request_stop(client, JobKeys(resolved.resolved_job_id, transport.namespace), by)
    finally:
        client.close()


class InterruptStops:
    """Ctrl-C (SIGINT) while a job runs: the first press asks the job to stop as ``polydistill stop``
    does, so its students checkpoint and the driver winds down; the second ends the driver at once
    (``KeyboardInterrupt``). Until ``arm`` names how to stop the job, and after ``disarm``, there is
    nothing to stop and the first press ends at once.

    Installed only from the main thread (Python's rule for signal handlers); elsewhere it does nothing.
    """

    def __init__(self) -> None:
        self.stop_requested = False
        self._stop_job: Callable[[], None] | None = None
        self._ending = False
        self._previous: Callable | int | None = None

    def __enter__(self) -> "InterruptStops":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def arm(self, stop_job: Callable[[], None]) -> None:
        self._stop_job = stop_job

    def disarm(self) -> None:
        self._stop_job = None

    def _on_interrupt(self, signum, frame) -> None:
        action = interrupt_action(self._stop_job is not None, self.stop_requested, self._ending)
        if action == "ignore":
            return
        if action == "request stop":
            try:
                self._stop_job()
            except (redis.RedisError, OSError) as exc:  # nothing can be told to stop: end at once instead
                log.warning("Ctrl-C: could not set the job's stop flag (%s); ending at once", exc)
            else:
                self.stop_requested = True
                print("\nCtrl-C: stopping the job; the students save a checkpoint (Ctrl-C again to quit at once)",
                      file=sys.stderr, flush=True)
                return
        self._ending = True
        raise KeyboardInterrupt


class JobFailed(RuntimeError):
    """The job ran to its end without exact accounting: samples lost or doubled (the message names them)."""


class JobStopped(RuntimeError):
    """The job was stopped before it completed (``polydistill stop``, SIGTERM, Ctrl-C). The message is
    one line: the samples distilled, where the checkpoint is, and the ``polydistill resume`` command
    that continues the job from it."""

    def __init__(self, stopped_by: str, output_dir: Path, samples_kept: int | None, samples_expected: int | None,
                 checkpoint: Path | None, interrupted: bool, report: dict | None = None):
        super().__init__(stop_summary(stopped_by, output_dir, samples_kept, samples_expected, checkpoint))
        self.stopped_by = stopped_by
        self.output_dir = output_dir
        self.samples_kept = samples_kept  # in the checkpoint; None when a fresh run had not begun distilling
        self.samples_expected = samples_expected
        self.checkpoint = checkpoint
        self.interrupted = interrupted  # Ctrl-C in this process asked for the stop
        self.report = report  # what report.json holds; None when the job ended before reporting
