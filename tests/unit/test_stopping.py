"""How a job that was stopped is told from one that went wrong, what Ctrl-C does, and the line a
stopped job leaves: pure decisions, no Ray, no Redis."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from polydistill.cluster.recovery import STOP_GRACE_S, Observation, WatchState, watch
from polydistill.cluster.stopping import (
    STOPPED_BY_DRIVER,
    STOPPED_BY_INTERRUPT,
    STOPPED_BY_SIGTERM,
    STOPPED_BY_STOP_COMMAND,
    STOPPED_BY_UNNAMED,
    InterruptStops,
    accounting_shortfall,
    interrupt_action,
    job_outcome,
    stop_summary,
    stopped_from_outside,
)


def report(distilled=400, expected=400, batches_missing=0, extra=None, tasks=None, dead_letters=0) -> dict:
    return {"samples_expected": expected, "samples_distilled": distilled, "batches_expected": 50,
            "batches_missing": batches_missing, "dead_letters": dead_letters,
            "extra_students": {name: {"samples_distilled": n} for name, n in (extra or {}).items()},
            "tasks": tasks}


# -- who stopped the job, and what that makes of it ----------------------------------------------
@pytest.mark.parametrize("shortfall, stopped_by, outcome", [
    ([], None, "completed"),
    ([], STOPPED_BY_DRIVER, "completed"),
    ([], STOPPED_BY_STOP_COMMAND, "completed"),  # the stop came in as the last batch was applied
    (["short"], STOPPED_BY_STOP_COMMAND, "stopped"),
    (["short"], STOPPED_BY_SIGTERM, "stopped"),
    (["short"], STOPPED_BY_INTERRUPT, "stopped"),
    (["short"], STOPPED_BY_UNNAMED, "stopped"),  # a script set the flag without saying who
    (["short"], STOPPED_BY_DRIVER, "failed"),  # the driver's own abort (dead letters)
    (["short"], None, "failed"),  # nobody stopped it: samples were lost
])
def test_outcome_from_shortfall_and_who_stopped(shortfall, stopped_by, outcome):
    assert job_outcome(shortfall, stopped_by) == outcome


def test_only_someone_other_than_the_driver_stops_from_outside():
    assert not stopped_from_outside(None) and not stopped_from_outside(STOPPED_BY_DRIVER)
    assert stopped_from_outside(STOPPED_BY_SIGTERM) and stopped_from_outside(STOPPED_BY_UNNAMED)


# -- what an accounting mismatch names -------------------------------------------------------------
def test_exact_accounting_has_no_shortfall():
    assert accounting_shortfall(report(extra={"small": 400})) == []


def test_shortfall_names_the_student_the_counts_and_the_batches_it_never_applied():
    missing = {"student": [(1, 3), (1, 7)]}
    shortfall = accounting_shortfall(report(distilled=384, batches_missing=2), missing)
    assert shortfall == ["student 'student' distilled 384 samples, 400 expected "
                         "(never applied: epoch 1 batch 3, epoch 1 batch 7)",
                         "2 of 50 batches missing"]


def test_a_student_that_stopped_early_is_held_to_its_own_kept_epochs():
    shortened = report(extra={"small": 240})
    shortened["extra_students"]["small"]["samples_expected"] = 240  # dev stopped improving: 3 of 5 epochs
    assert accounting_shortfall(shortened) == []
    shortened["extra_students"]["small"]["samples_distilled"] = 232
    assert accounting_shortfall(shortened) == ["student 'small' distilled 232 samples, 240 expected"]


def test_shortfall_names_doubled_samples_extra_students_tasks_and_dead_letters():
    tasks = {"main": {"samples_distilled": 300, "samples_expected": 300},
             "ner": {"samples_distilled": 90, "samples_expected": 100}}
    shortfall = accounting_shortfall(report(distilled=408, extra={"tiny": 392}, tasks=tasks, dead_letters=1),
                                     {"tiny": [(0, b) for b in range(8)]})
    assert shortfall[0] == "student 'student' distilled 408 samples, 400 expected"
    assert shortfall[1].startswith("student 'tiny' distilled 392 samples, 400 expected (never applied: epoch 0 batch 0")
    assert shortfall[1].endswith("epoch 0 batch 4 and 3 more)")
    assert shortfall[2:] == ["task 'ner' distilled 90 samples, 100 expected", "1 messages dead-lettered"]


# -- the one line -------------------------------------------------------------------------------
def test_the_line_of_a_stopped_job_names_samples_checkpoint_and_resume_command():
    line = stop_summary(STOPPED_BY_STOP_COMMAND, Path("/runs/my job"), 120, 400, Path("/runs/my job/checkpoints/student"))
    assert line == ("stopped by polydistill stop: 120 of 400 samples distilled, checkpoint in "
                    "/runs/my job/checkpoints/student; continue with: polydistill resume '/runs/my job'")
    assert "\n" not in line


def test_the_line_without_a_checkpoint_or_before_distilling_began():
    no_checkpoint = stop_summary(STOPPED_BY_INTERRUPT, Path("/out"), 0, 400, None)
    assert "before the student saved a checkpoint" in no_checkpoint and "polydistill resume /out" in no_checkpoint
    before = stop_summary(STOPPED_BY_INTERRUPT, Path("/out"), None, None, None)
    assert before == "stopped by Ctrl-C before distilling began: nothing to resume"


# -- Ctrl-C ------------------------------------------------------------------------------------
@pytest.mark.parametrize("can_request_stop, stop_requested, ending, action", [
    (True, False, False, "request stop"),  # the first press while the job runs
    (True, True, False, "end at once"),  # the second
    (True, True, True, "ignore"),  # later ones: ending at once must not be cut short
    (False, False, False, "end at once"),  # nothing to stop yet (preparing) or any more
    (False, False, True, "ignore"),
])
def test_what_a_press_does(can_request_stop, stop_requested, ending, action):
    assert interrupt_action(can_request_stop, stop_requested, ending) == action


def test_first_press_asks_the_job_to_stop_second_ends_at_once_later_ones_are_ignored(capsys):
    requests = []
    previous = signal.getsignal(signal.SIGINT)
    with InterruptStops() as interrupt:
        interrupt.arm(lambda: requests.append("stop"))
        signal.raise_signal(signal.SIGINT)
        assert requests == ["stop"] and interrupt.stop_requested
        assert "Ctrl-C again to quit at once" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # ignored
        assert requests == ["stop"]
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_press_before_the_job_can_be_stopped_ends_at_once():
    with InterruptStops():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_press_whose_stop_request_fails_ends_at_once():
    def unreachable() -> None:
        raise ConnectionError("redis is gone")

    with InterruptStops() as interrupt:
        interrupt.arm(unreachable)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert not interrupt.stop_requested


# -- the supervisor while the job stops ---------------------------------------------------------------
def stopping(**fields) -> Observation:
    return Observation(**{"run_marker_present": True, "feeding": False, "work_backlog": 0, "knowledge_backlog": 0,
                          "stop_requested": True, **fields})


def test_a_stopping_job_is_neither_probed_nor_recovered_until_the_grace_period_ends():
    # Quiet for long: the students are leaving, and what they miss is for a resume to distil.
    verdict, state = watch(stopping(), WatchState(quiet_since=0.0), now=100.0)
    assert verdict.action == "wait" and state.stop_seen_at == 100.0
    verdict, state = watch(stopping(), state, now=100.0 + STOP_GRACE_S)
    assert verdict.action == "wait" and state.stop_seen_at == 100.0
    verdict, _ = watch(stopping(), state, now=100.0 + STOP_GRACE_S + 0.5)
    assert verdict.action == "abandon" and f"{STOP_GRACE_S:g} s" in verdict.reason
