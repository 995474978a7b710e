"""One mapping from a job's exception to the exit status and line the user gets (cli and tune)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polydistill.cluster.config import ConfigError
from polydistill.cluster.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_STOPPED
from polydistill.cluster.failures import exit_status_of, failure_line
from polydistill.cluster.recovery import RecoveryFailed
from polydistill.cluster.stopping import JobFailed, JobStopped
from polydistill.storage.datasets import DataSourceError
from polydistill.storage.streams import RedisUnavailable
from polydistill.student.architecture import ModelSetupError
from polydistill.student.checkpoint import CheckpointError
from polydistill.student.teacher_gate import WeakTeacherError


def stopped(interrupted: bool) -> JobStopped:
    return JobStopped("Ctrl-C" if interrupted else "polydistill stop", Path("/out"), 10, 40, Path("/out/ckpt"),
                      interrupted)


@pytest.mark.parametrize("exc, status", [
    (ConfigError("training.epochs: must be at least 1"), EXIT_BAD_INPUT),
    (ModelSetupError("student.config: bad"), EXIT_BAD_INPUT),
    (WeakTeacherError("the teacher is not worth distilling"), EXIT_BAD_INPUT),
    (DataSourceError("data.path: no such folder"), EXIT_BAD_INPUT),
    (JobFailed("accounting mismatch"), EXIT_FAILED),
    (RecoveryFailed("gave up"), EXIT_FAILED),
    (RedisUnavailable("gone"), EXIT_FAILED),
    (CheckpointError("another job's"), EXIT_FAILED),
    (stopped(interrupted=False), EXIT_STOPPED),
    (stopped(interrupted=True), EXIT_INTERRUPTED),
    (KeyError("a bug"), None),
])
def test_each_failure_has_its_exit_status(exc, status):
    assert exit_status_of(exc) == status


def test_a_stop_prints_its_own_line_and_an_error_is_prefixed():
    assert failure_line(JobFailed("accounting mismatch")) == "error: accounting mismatch"
    line = failure_line(stopped(interrupted=False))
    assert not line.startswith("error:") and "polydistill resume /out" in line
