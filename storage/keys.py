"""Every Redis key and consumer-group name of a job, built in exactly one place.

Other modules must not format key strings themselves: when names are assembled in
several places they drift apart (rq once shipped ``rq:job::<id>``), and cleanup by
pattern then silently misses keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

# Letters, digits, '_', '.', '-': no ':' (our separator) and no glob characters
# ('*', '?', '[') that would make ``pattern`` match other jobs' keys.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_NAME_RULE = "1-128 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"

TEACHER_GROUP = "teachers"
# The knowledge cache's writer reads the knowledge stream beside the students (storage/knowledge_cache.py).
CACHE_WRITER_GROUP = "cache-writer"

# Fields of the control hash (``JobKeys.control``), written by the driver and the CLI.
CONTROL_STOP = "stop"  # "1": every worker of the job finishes its current batch and exits
# Who set the stop flag first (cluster/stopping.py): the driver at its own end, or a stop from
# outside (`polydistill stop`, SIGTERM, Ctrl-C). Absent beside a set flag: someone who did not say.
CONTROL_STOPPED_BY = "stopped_by"
CONTROL_DESIRED_TEACHERS = "desired_teachers"  # manual pool size (`polydistill scale`); absent: the policy decides
# Set by the driver at start and at each recovery: a vanished run marker means Redis lost its data.
CONTROL_RUN = "run"
# The feed call that may enqueue now; an older one (or any, once Redis lost its data) stops.
CONTROL_FEED_GENERATION = "feed_generation"

# Fields of the metrics hash (``JobKeys.metrics``), written by the teacher pool and the replicas.
METRIC_TEACHERS_WANTED = "teachers_wanted"
METRIC_TEACHERS_RUNNING = "teachers_running"
METRIC_POOL_REASON = "pool_reason"  # why the pool has the size it has (the policy's explanation)
TEACHER_COUNTERS = ("batches", "samples", "busy_seconds")  # per replica, incremented with each batch
TEACHER_STARTED = "started_at"  # per replica: wall time its serve loop began (it is loaded and ready)
DEV_ACCURACY_PREFIX = "dev_accuracy_epoch_"  # + epoch: the student's dev score after it, in the progress hash


def replica_stop_field(replica_id: str) -> str:
    """Control-hash field that asks one teacher replica to leave (the pool scaling down)."""
    return f"stop:{_check_name(replica_id, 'replica id')}"


def teacher_metric_field(replica_id: str, name: str) -> str:
    """Metrics-hash field of one replica's counter (``TEACHER_COUNTERS``) or start time (``TEACHER_STARTED``)."""
    if name not in (*TEACHER_COUNTERS, TEACHER_STARTED):
        raise ValueError(f"unknown teacher metric {name!r}; known: {', '.join((*TEACHER_COUNTERS, TEACHER_STARTED))}")
    return f"teacher:{_check_name(replica_id, 'replica id')}:{name}"


def parse_teacher_metric_field(field: str) -> tuple[str, str] | None:
    """(replica id, name) of a field made by ``teacher_metric_field``; None for any other field."""
    parts = field.split(":")
    if len(parts) == 3 and parts[0] == "teacher" and parts[2] in (*TEACHER_COUNTERS, TEACHER_STARTED):
        return parts[1], parts[2]
    return None


def dev_accuracy_field(epoch: int) -> str:
    """Progress-hash field of the student's dev accuracy after ``epoch`` (training.validate_each_epoch)."""
    return f"{DEV_ACCURACY_PREFIX}{int(epoch)}"


def dev_accuracies(progress: Mapping[str, str]) -> list[tuple[int, float]]:
    """(epochs done, dev accuracy after the last of them) for each ``dev_accuracy_field`` of a progress hash,
    in epoch order; fields that do not parse, or hold no finite number, are left out."""
    scores = []
    for field, value in progress.items():
        if not field.startswith(DEV_ACCURACY_PREFIX):
            continue
        try:
            epoch, accuracy = int(field[len(DEV_ACCURACY_PREFIX):]), float(value)
        except ValueError:
            continue
        if math.isfinite(accuracy):
            scores.append((epoch + 1, accuracy))
    return sorted(scores)


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

    def work_stream_of(self, task: str = "main") -> str:
        """Feeder -> the teachers of one task: the main task's is the work stream, another task's (a
        multi-task job) ``work:<task>``."""
        return self.work_stream if task == "main" else self._key(f"work:{_check_name(task, 'task name')}")

    def stage_streams(self, index: int, count: int, task: str = "main") -> tuple[str, str]:
        """(input, output) of the index-th of ``count`` teachers in line: the first reads its task's work
        stream, the last writes the knowledge stream, and teacher i passes its batches to teacher i+1 on
        ``stage:<i+1>`` (Knowledge messages, each teacher adding its soft labels)."""
        if not 0 <= index < count:
            raise ValueError(f"teacher stage {index} of {count}")
        source = self.work_stream_of(task) if index == 0 else self._key(f"stage:{index}")
        sink = self.knowledge_stream if index == count - 1 else self._key(f"stage:{index + 1}")
        return source, sink

    def carries_work(self, stream: str) -> bool:
        """True for a work stream (the main task's or another task's), whose size transport.max_work_backlog
        and max_work_backlog_bytes bound; the job's other streams carry knowledge."""
        return stream == self.work_stream or stream.startswith(self._key("work:"))

    def teacher_inputs(self, count: int, tasks: Sequence[str] = ("main",)) -> list[str]:
        """Every stream a teacher pool reads (TEACHER_GROUP on each): each task's work stream, then the
        streams between ``count`` teachers in line."""
        return [self.work_stream_of(task) for task in tasks] + [self.stage_streams(index, count)[0]
                                                                 for index in range(1, count)]

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
    def owner(self) -> str:
        """String holding the token of the run that owns this job's keys, with a lease (storage/ownership.py).
        Under the job's prefix like every other key, so an ACL confined to the prefix covers it."""
        return self._key("owner")

    @property
    def pattern(self) -> str:
        """SCAN pattern matching every key of this job and of no other job."""
        return self._key("*")

    @staticmethod
    def student_group(name: str = "student") -> str:
        return student_group(name)
