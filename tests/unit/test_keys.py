from __future__ import annotations

import fnmatch

import pytest

from polydistill.storage.keys import TEACHER_GROUP, JobKeys, student_group


def test_key_names_are_fixed():
    keys = JobKeys("run-7")
    assert keys.work_stream == "polydistill:run-7:work"
    assert keys.knowledge_stream == "polydistill:run-7:knowledge"
    assert keys.dead_letter_stream == "polydistill:run-7:dead"
    assert keys.control == "polydistill:run-7:control"
    assert keys.metrics == "polydistill:run-7:metrics"
    assert keys.progress == "polydistill:run-7:progress"
    assert keys.pattern == "polydistill:run-7:*"


def test_namespace_prefixes_every_key():
    keys = JobKeys("a", namespace="team.x")
    assert keys.work_stream == "team.x:a:work"
    assert keys.pattern == "team.x:a:*"


def all_keys(keys: JobKeys) -> list[str]:
    return [
        keys.work_stream,
        keys.knowledge_stream,
        keys.dead_letter_stream,
        keys.control,
        keys.metrics,
        keys.progress,
    ]


def test_keys_are_distinct_and_all_matched_by_the_cleanup_pattern():
    keys = JobKeys("job_1.2")
    names = all_keys(keys)
    assert len(set(names)) == len(names)
    assert all(fnmatch.fnmatchcase(name, keys.pattern) for name in names)


def test_cleanup_pattern_does_not_match_a_job_whose_id_extends_ours():
    ours, theirs = JobKeys("job"), JobKeys("job-2")
    assert not any(fnmatch.fnmatchcase(name, ours.pattern) for name in all_keys(theirs))
    assert not any(fnmatch.fnmatchcase(name, theirs.pattern) for name in all_keys(ours))


def test_group_names():
    assert TEACHER_GROUP == "teachers"
    assert JobKeys.TEACHER_GROUP == "teachers"
    assert student_group() == "student:student"
    assert student_group("tiny-sw") == "student:tiny-sw"
    assert JobKeys("j").student_group("b") == "student:b"


@pytest.mark.parametrize("bad", ["", "a:b", "a*", "a b", "-lead", "x" * 129, "ü", "job?", "[ab]"])
def test_invalid_job_ids_are_rejected_with_the_rule(bad):
    with pytest.raises(ValueError, match="job_id .* is not a valid Redis name: use 1-128 characters"):
        JobKeys(bad)


def test_invalid_namespace_and_student_name_are_rejected():
    with pytest.raises(ValueError, match="namespace"):
        JobKeys("ok", namespace="a:b")
    with pytest.raises(ValueError, match="student name"):
        student_group("a b")


def test_longest_valid_job_id_is_accepted():
    assert JobKeys("x" * 128).job_id == "x" * 128


def test_job_keys_are_immutable_and_hashable():
    keys = JobKeys("j")
    with pytest.raises(AttributeError):
        keys.job_id = "other"  # type: ignore[misc]
    assert {keys: 1}[JobKeys("j")] == 1


def test_control_and_metric_field_names():
    from polydistill.storage.keys import (
        CONTROL_DESIRED_TEACHERS,
        CONTROL_STOP,
        parse_teacher_metric_field,
        replica_stop_field,
        teacher_metric_field,
    )

    assert CONTROL_STOP == "stop" and CONTROL_DESIRED_TEACHERS == "desired_teachers"
    assert replica_stop_field("teacher-3") == "stop:teacher-3"
    assert replica_stop_field("teacher-3") != CONTROL_STOP
    assert teacher_metric_field("teacher-3", "batches") == "teacher:teacher-3:batches"
    assert parse_teacher_metric_field("teacher:teacher-3:busy_seconds") == ("teacher-3", "busy_seconds")
    assert parse_teacher_metric_field("teachers_wanted") is None
    assert teacher_metric_field("teacher-3", "started_at") == "teacher:teacher-3:started_at"
    with pytest.raises(ValueError, match="unknown teacher metric"):
        teacher_metric_field("teacher-3", "bytes")
    with pytest.raises(ValueError, match="replica id"):
        replica_stop_field("a:b")
