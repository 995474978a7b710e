"""Stopping bad trials early in ``polydistill tune``: ASHA (asynchronous successive halving) through Ray
Tune, on the dev score each trial's student reports after every epoch.

Every trial's job scores its student on the search's dev split after each epoch
(``training.validate_each_epoch``, set for every trial); the student writes the score into the job's
progress hash, and the trial hands it to Tune as soon as the driver reads it (``TrialReporter``):
``{"epoch": epochs done, "dev_accuracy": ...}``. ASHA compares the trials at rungs of
``grace_period_epochs`` x ``reduction_factor``^k epochs and stops those outside the top
1/``reduction_factor`` there. A stopped trial's job ends at once (``EndNow``: its actors killed, its
keys removed); its row says "stopped" with the epochs it reached and its last dev score, and it cannot
be the best trial, which needs a finished job's score.

The last epoch's score is not reported while the job runs: ASHA may stop a trial at a rung on the
last epoch, which would only throw its evaluation away. It comes with the trial's final result.

Stopping and choosing both read the dev split, as ASHA is meant to be used; the test split stays
unread until the chosen trial is scored on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from polydistill.cluster.config import ConfigError, JobConfig
from polydistill.cluster.stopping import EndNow
from polydistill.storage.keys import JobKeys, dev_accuracies
from polydistill.storage.ownership import LEASE_S, OwnershipLost, delete_job_keys

log = logging.getLogger(__name__)

# What a trial reports to Tune: the time axis ASHA counts in, and the score it compares.
TIME_ATTR, METRIC = "epoch", "dev_accuracy"
RUNNING, STOPPED = "running", "stopped"
DEV_FIELD = "dev_accuracy_epoch_"  # + the epoch: the student's dev score after it, in its progress hash  # a trial's status while its job runs; and once the scheduler stopped it


class AshaSettings(BaseModel):
    """``scheduler: {asha: {...}}`` in SPACE.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grace_period_epochs: int = Field(default=1, ge=1, description="Epochs every trial trains before it can be stopped.")
    reduction_factor: float = Field(
        default=3, gt=1, description="At each rung, the trials outside the top 1/reduction_factor are stopped.")


class SchedulerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    asha: AshaSettings = Field(description="Asynchronous successive halving on the per-epoch dev score.")


def check_schedulable(config: JobConfig, settings: SchedulerSettings, searched: Iterable[str]) -> None:
    """Refuses a search the scheduler cannot judge, naming what to change."""
    if config.task != "sequence-classification":
        raise ConfigError(f"scheduler.asha stops trials on their per-epoch dev accuracy, which task {config.task} "
                          "does not score: drop scheduler")
    if "training.epochs" in searched:
        raise ConfigError("scheduler.asha compares trials after the same numbers of epochs: search training.epochs "
                          "without it, or drop scheduler")
    epochs = config.training.epochs
    if epochs <= settings.asha.grace_period_epochs:
        raise ConfigError(f"scheduler.asha.grace_period_epochs is {settings.asha.grace_period_epochs} but the trials "
                          f"train {epochs} epoch(s): nothing would ever be stopped; lower it below training.epochs "
                          "or drop scheduler")


def trial_overrides() -> list[str]:
    """What every trial runs with under the scheduler: a dev score after every epoch."""
    return ["training.validate_each_epoch=true"]


def asha_scheduler(settings: SchedulerSettings, epochs: int):
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial that trained every epoch is never stopped before its evaluation.
    return ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="max", max_t=epochs,
                         grace_period=settings.asha.grace_period_epochs,
                         reduction_factor=settings.asha.reduction_factor, stop_last_trials=False)


class TrialReporter:
    """The trial's ``on_progress`` listener: reports each new dev score to Tune, in epoch order (not the last
    epoch's, which comes with the final result). Tune answers a stop with SystemExit inside the report; the
    job then ends at once (``EndNow``) and ``stopped`` says so."""

    def __init__(self, report: Callable[[dict[str, Any]], None], planned_epochs: int):
        self.report = report
        self.planned_epochs = planned_epochs
        self.epochs = 0
        self.stopped = False

    def __call__(self, progress: Mapping[str, str]) -> None:
        for epochs, accuracy in dev_accuracies(progress):
            if epochs <= self.epochs or epochs >= self.planned_epochs:
                continue
            self.epochs = epochs
            try:
                self.report({"status": RUNNING, TIME_ATTR: epochs, METRIC: accuracy})
            except SystemExit:
                self.stopped = True
                raise EndNow(f"the search's scheduler stopped this trial after {epochs} epoch(s)") from None


def final_fields(report: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler's fields of a finished trial: the epochs it trained and its last dev score."""
    validation = report.get("validation") or []
    if not validation:
        return {}
    return {TIME_ATTR: validation[-1]["epoch"] + 1, METRIC: validation[-1]["accuracy"]}


def remove_keys_of_stopped_trials(client, job_ids: Iterable[str], namespace: str,
                                  timeout_s: float = 2 * LEASE_S) -> list[str]:
    """A stopped trial's process may end before its job removed its keys: once the job's lease has run out,
    remove them. Returns the job ids whose keys could not be removed in time."""
    left = list(job_ids)
    deadline = time.monotonic() + timeout_s
    while left:
        for job_id in list(left):
            try:
                delete_job_keys(client, JobKeys(job_id, namespace))
                left.remove(job_id)
            except OwnershipLost:  # its lease has not run out yet
                pass
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for job_id in left:
        log.warning("the keys of stopped trial job %s are still held; they go when its lease runs out", job_id)
    return left


def stopped_trial_sweeper(connect: Callable[[], Any], job_id_of: Callable[[Any], str], namespace: str):
    """A Tune callback that, as each trial stopped before its end completes, removes its job's keys in a
    thread of the search's process once the job's lease has run out: Tune ends a stopped trial's process
    about as soon as the job begins to end, often before the job removed its keys, and on a long search
    the streams left behind would fill the Redis the other trials share. ``join`` waits for the sweeps."""
    import threading

    import redis
    from ray.tune import Callback

    class StoppedTrialSweeper(Callback):
        def __init__(self):
            self.threads: list[threading.Thread] = []

        def on_trial_complete(self, iteration, trials, trial, **info):
            if (trial.last_result or {}).get("status") != RUNNING:
                return
            thread = threading.Thread(target=self._sweep, args=(job_id_of(trial),), daemon=True,
                                      name="polydistill-sweep")
            thread.start()
            self.threads.append(thread)

        def _sweep(self, job_id: str) -> None:
            try:
                remove_keys_of_stopped_trials(connect(), [job_id], namespace)
            except redis.RedisError as exc:  # the search's result matters more than a leftover key
                log.warning("could not remove the keys of stopped trial job %s: %s", job_id, exc)

        def join(self, timeout_s: float = 2 * LEASE_S + 10) -> None:
            deadline = time.monotonic() + timeout_s
            for thread in self.threads:
                thread.join(max(deadline - time.monotonic(), 0.0))

    return StoppedTrialSweeper()
