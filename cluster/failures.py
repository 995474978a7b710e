"""How each way a job can end badly maps to an exit status (cluster/exit_codes.py) and one line.

The command line (``polydistill run`` / ``resume``) and ``polydistill tune``'s warm-up job share
this mapping, so the two cannot drift apart. The exception classes are imported when a failure is
being read, not before: a mistyped config is reported without loading torch and Ray.
"""

from __future__ import annotations

from polydistill.cluster.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_STOPPED


def exit_status_of(exc: BaseException) -> int | None:
    """The exit status a job's exception stands for, or None for an unexpected one (a bug: re-raise it)."""
    from polydistill.cluster.config import ConfigError
    from polydistill.cluster.recovery import RecoveryFailed
    from polydistill.cluster.stopping import JobFailed, JobStopped
    from polydistill.storage.datasets import DataSourceError
    from polydistill.storage.ownership import JobInUse
    from polydistill.storage.streams import RedisUnavailable
    from polydistill.student.architecture import ModelSetupError
    from polydistill.student.checkpoint import CheckpointError

    if isinstance(exc, JobStopped):
        return EXIT_INTERRUPTED if exc.interrupted else EXIT_STOPPED
    if isinstance(exc, (ConfigError, JobInUse, ModelSetupError, DataSourceError)):  # nothing was distilled
        return EXIT_BAD_INPUT
    if isinstance(exc, (JobFailed, RecoveryFailed, RedisUnavailable, CheckpointError)):
        return EXIT_FAILED
    return None


def failure_line(exc: BaseException) -> str:
    """What the user reads: a stop's own line (samples kept, the resume command), else the error."""
    from polydistill.cluster.stopping import JobStopped

    return str(exc) if isinstance(exc, JobStopped) else f"error: {exc}"
