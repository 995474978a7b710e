"""Every Redis key and consumer-group name of a job, built in exactly one place.

Other modules must not format key strings themselves: when names are assembled in
several places they drift apart (rq once shipped ``rq:job::<id>``), and cleanup by
pattern then silently misses keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

# Letters, digits, '_', '.', '-': no ':' (our separator) and no glob characters
# ('*', '?', '[') that would make ``pattern`` match other jobs' keys.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_NAME_RULE = "1-128 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"

TEACHER_GROUP = "teachers"


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ValueError(f"{what} {value!r} is not a valid Redis name: use {_NAME_RULE}")
    return value


def student_group(name: str = "student") -> str:
    """The consumer group of one student on the knowledge stream.

    Each student reads every knowledge message, so each gets its own group.
    """
    return f"student:{_check_name(name, 'student name')}"


@dataclass(frozen=True)
class JobKeys:
    job_id: str
    namespace: str = "polydistill"

    TEACHER_GROUP: ClassVar[str] = TEACHER_GROUP

    def __post_init__(self) -> None:
        _check_name(self.job_id, "job_id")
        _check_name(self.namespace, "namespace")

    def _key(self, suffix: str) -> str:
        return f"{self.namespace}:{self.job_id}:{suffix}"

    @property
    def work_stream(self) -> str:
        """Feeder -> teachers: encoded WorkBatch messages."""
        return self._key("work")

    @property
    def knowledge_stream(self) -> str:
        """Teachers -> students: encoded Knowledge messages."""
        return self._key("knowledge")

    @property
    def dead_letter_stream(self) -> str:
        """Messages that failed to decode or process, kept for inspection."""
        return self._key("dead")

    @property
    def control(self) -> str:
        """Hash the driver writes and workers read: stop flag, desired replica count."""
        return self._key("control")

    @property
    def metrics(self) -> str:
        """Hash of counters and gauges reported by workers."""
        return self._key("metrics")

    @property
    def progress(self) -> str:
        """Hash of training progress (epoch, step, batches done)."""
        return self._key("progress")

    @property
    def pattern(self) -> str:
        """SCAN pattern matching every key of this job and of no other job."""
        return self._key("*")

    @staticmethod
    def student_group(name: str = "student") -> str:
        return student_group(name)
