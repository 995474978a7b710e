"""ASHA in ``polydistill tune``: what a trial reports while its job runs, how a stop by the scheduler
ends the job and reads in the search's report, and the searches the scheduler cannot judge."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from polydistill.cluster.config import ConfigError, validate_config
from polydistill.cluster.stopping import EndNow
from polydistill.cluster.tune import _row_from_result, format_tune_table, summary_lines, validate_tune_config
from polydistill.cluster.tune_schedule import (
    SchedulerSettings,
    TrialReporter,
    asha_scheduler,
    check_schedulable,
    final_fields,
)
from polydistill.storage.keys import dev_accuracies

ASHA = SchedulerSettings(asha={"grace_period_epochs": 1, "reduction_factor": 2})


@pytest.mark.parametrize("progress, seen", [
    ({"step": "12", "loss": "0.8"}, []),  # no dev score yet
    ({"step": "12", "dev_accuracy_epoch_0": "0.61"}, [(1, 0.61)]),
    ({"dev_accuracy_epoch_1": "0.7", "dev_accuracy_epoch_0": "0.6"}, [(1, 0.6), (2, 0.7)]),
    ({"dev_accuracy_epoch_0": "nan", "dev_accuracy_epoch_x": "0.7", "dev_accuracy_epoch_2": "?"}, []),
])
def test_the_dev_scores_are_read_from_the_progress_hash_in_epoch_order(progress, seen):
    assert dev_accuracies(progress) == seen


def test_each_new_dev_score_is_reported_once_in_order_but_not_the_last_epochs():
    reported = []
    reporter = TrialReporter(reported.append, planned_epochs=4)
    reporter({"step": "9", "dev_accuracy_epoch_0": "0.5"})
    reporter({"step": "9", "dev_accuracy_epoch_0": "0.5"})
    # Read late: two epochs scored since; each goes to the scheduler, the earlier first.
    reporter({"dev_accuracy_epoch_0": "0.5", "dev_accuracy_epoch_2": "0.7", "dev_accuracy_epoch_1": "0.6"})
    reporter({"dev_accuracy_epoch_3": "0.8"})
    assert reported == [{"status": "running", "epoch": 1, "dev_accuracy": 0.5},
                        {"status": "running", "epoch": 2, "dev_accuracy": 0.6},
                        {"status": "running", "epoch": 3, "dev_accuracy": 0.7}]
    assert not reporter.stopped


def test_a_stop_by_the_scheduler_ends_the_job_at_once():
    def report(metrics):
        raise SystemExit(0)  # what Tune does inside report() once the scheduler stopped the trial

    reporter = TrialReporter(report, planned_epochs=4)
    with pytest.raises(EndNow, match="stopped this trial after 1 epoch"):
        reporter({"dev_accuracy_epoch_0": "0.2", "dev_accuracy_epoch_1": "0.2"})
    assert reporter.stopped


def test_a_finished_trial_reports_its_epochs_and_last_dev_score():
    report = {"validation": [{"epoch": 0, "accuracy": 0.5}, {"epoch": 1, "accuracy": 0.4}]}
    assert final_fields(report) == {"epoch": 2, "dev_accuracy": 0.4}
    assert final_fields({}) == {}


def job(task: str | None = None, **training):
    raw = {"teacher": {"model": "random"}, "data": {"path": "/data"}, "training": {"epochs": 3, **training}}
    if task:
        raw.update(task=task, distill={"top_k": 16}, data={"path": "/data", "label_column": None})
    return validate_config(raw)


@pytest.mark.parametrize("config, searched, words", [
    (job("masked-lm"), [], "task masked-lm does not score"),
    (job(), ["training.lr", "training.epochs"], "search training.epochs without it"),
    (job(epochs=1), [], "nothing would ever be stopped"),
])
def test_searches_the_scheduler_cannot_judge_are_refused_naming_the_fix(config, searched, words):
    with pytest.raises(ConfigError, match=words):
        check_schedulable(config, ASHA, searched)
    check_schedulable(job(), ASHA, ["training.lr"])


def test_asha_counts_epochs_and_never_stops_a_trial_that_trained_them_all():
    scheduler = asha_scheduler(ASHA, epochs=4)
    assert (scheduler._time_attr, scheduler.metric, scheduler._max_t) == ("epoch", "dev_accuracy", 4)
    assert scheduler._stop_last_trials is False


def test_the_scheduler_section_is_strict():
    space = {"space": {"lr": {"choice": [1.0e-4]}}}
    assert validate_tune_config({**space, "scheduler": {"asha": {}}}).scheduler.asha.reduction_factor == 3
    with pytest.raises(ConfigError, match="reduction_factor"):
        validate_tune_config({**space, "scheduler": {"asha": {"reduction_factor": 1}}})
    with pytest.raises(ConfigError, match="patience"):
        validate_tune_config({**space, "scheduler": {"asha": {"patience": 2}}})


def tune_result(metrics: dict, error=None):
    return SimpleNamespace(metrics=metrics, config={"training.lr": 1e-3}, path="/runs/trial_00001", error=error)


def test_a_trial_the_scheduler_stopped_reads_as_stopped_not_failed():
    row = _row_from_result(tune_result({"status": "running", "epoch": 1, "dev_accuracy": 0.2}), 1)
    assert row["status"] == "stopped" and (row["epochs"], row["dev_accuracy"]) == (1, 0.2) and "error" not in row
    crashed = _row_from_result(tune_result({"status": "running", "epoch": 1, "dev_accuracy": 0.2}, error="boom"), 1)
    assert crashed["status"] == "error"
    result = {"trials": [row], "searched": ["training.lr"], "metric": "accuracy"}
    assert "stopped after 1 epoch(s)" in format_tune_table(result)
    assert ("stopped before their last epoch (the scheduler, or the time budget): trial_00001 (1 epochs, dev 20.0%)"
            in summary_lines(result))
    assert not any(line.startswith("failed trials") for line in summary_lines(result))
