"""The teacher pool on a real local Ray and a real Redis: it grows under its policy, obeys the manual
override from the control hash, and shrinks gracefully mid-stream with exact accounting.

The feeder and the student are the plain classes, driven from the test step by step, so that every
phase (teachers holding work, the student half-way, replicas leaving) happens at a known point.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from polydistill.actors.feeder import Feeder
from polydistill.actors.pool import TeacherPool, WindowedRate, replica_bundle
from polydistill.cluster.config import load_config
from polydistill.cluster.prepare import prepare_student, prepare_teacher
from polydistill.storage.job_data import load_job_split
from polydistill.storage.keys import (
    CONTROL_DESIRED_TEACHERS,
    CONTROL_STOP,
    METRIC_TEACHERS_RUNNING,
    METRIC_TEACHERS_WANTED,
    TEACHER_GROUP,
    JobKeys,
    replica_stop_field,
)
from polydistill.student.trainer import StudentTrainer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SAMPLES, BATCH = 400, 16
BATCHES = -(-SAMPLES // BATCH)  # 25


def pool_config(tmp_path: Path, redis_url: str):
    return load_config(
        EXAMPLES / "tiny.yaml",
        [
            f"transport.redis_url={redis_url}",
            "job_id=pool-test",
            "data.languages=[eng_Latn, swh_Latn]",
            "data.limit_per_language=200",
            "data.eval_split=null",
            "training.epochs=1",
            f"training.batch_size={BATCH}",
            "teacher.replicas=1",
            # Grow at once when the backlog asks for it; never shrink on the policy's own account, so
            # that the only shrink in this test is the manual one.
            "teacher.autoscaling={min_replicas: 1, max_replicas: 3, target_backlog_per_replica: 4,"
            " upscale_delay_s: 0, downscale_delay_s: 3600}",
            # Teachers may run only this far ahead of the student: they block, holding a batch each.
            "transport.max_knowledge_backlog=4",
        ],
        output_dir=str(tmp_path / "out"),
    )


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def consumers(client, keys: JobKeys) -> dict[str, int]:
    """Teacher consumers in the work group and how many batches each holds unacknowledged."""
    return {
        (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): int(c["pending"])
        for c in client.xinfo_consumers(keys.work_stream, TEACHER_GROUP)
    }


def test_windowed_rate_uses_the_window_then_falls_back_to_totals():
    rate = WindowedRate(window_s=10)
    assert rate.update(0, 0, 0) is None
    assert rate.update(1, 10, 1.0) == pytest.approx(10.0)
    assert rate.update(2, 10, 1.0) == pytest.approx(10.0)  # no new event: the window still holds 10 over 1 s
    assert rate.update(20, 50, 3.0) == pytest.approx(20.0)  # only (2, 10, 1.0) -> (20, 50, 3.0) is in the window
    assert rate.update(40, 50, 3.0) == pytest.approx(50 / 3)  # nothing new within the window: totals


def test_pool_grows_obeys_the_override_and_shrinks_gracefully_with_exact_accounting(
    tmp_path, redis_server, redis_client, local_ray
):
    config = pool_config(tmp_path, redis_server.url)
    keys = JobKeys(config.resolved_job_id, config.transport.namespace)
    out_dir = tmp_path / "out"
    train = load_job_split(config.data, config.data.train_split)
    teacher_dir = prepare_teacher(config, out_dir, train)
    student_init_dir, _ = prepare_student(config, teacher_dir, out_dir, train)

    feeder = Feeder(config, str(teacher_dir), redis_server.url)
    feeder.streams.ensure_group(keys.work_stream, TEACHER_GROUP)
    feeder.streams.ensure_group(keys.knowledge_stream, keys.student_group("student"))
    assert feeder.feed() == BATCHES  # the work backlog (32) holds the whole epoch

    requested: list[list[dict]] = []
    pool = TeacherPool(
        config, str(teacher_dir), redis_server.url,
        request_resources=lambda bundles: requested.append(bundles),
    )
    student = StudentTrainer(config, str(student_init_dir), BATCHES, redis_server.url, str(out_dir / "student"))

    def consume(batches: int) -> None:
        target = min(student.ledger.batches_applied + batches, BATCHES)
        while student.ledger.batches_applied < target:
            for entry_id, payload in student.fetch():
                student.apply(entry_id, payload)

    # -- 1. the policy grows the pool: 25 batches waiting at 4 per replica want 7, capped at 3 ---------
    pool.start()
    assert pool.replica_ids() == ["teacher-0"]
    decision = pool.step()  # no knowledge waiting yet: the students are not the bottleneck
    assert decision.replicas == 3 and decision.reason.startswith("scale up 1 -> 3"), decision.reason
    assert pool.replica_ids() == ["teacher-0", "teacher-1", "teacher-2"]
    assert requested[-1] == [replica_bundle(config)] * 3 == [{"CPU": 0.5}] * 3
    assert redis_client.hget(keys.metrics, METRIC_TEACHERS_WANTED) == b"3"
    ready = wait_for(lambda: (lambda r: r if None not in r.values() else None)(pool.readiness()), 90,
                     "the new replicas to load their model")
    scale_up_s = max(ready["teacher-1"], ready["teacher-2"])
    # The replicas run ahead of the (not yet started) student until the knowledge stream is full, and
    # then wait for room holding no work. Make room for four batches: the new replicas serve too.
    wait_for(lambda: redis_client.xlen(keys.knowledge_stream) >= 4, 30, "the knowledge stream to fill")
    consume(4)
    wait_for(lambda: set(consumers(redis_client, keys)) == {"teacher-0", "teacher-1", "teacher-2"}, 30,
             "all three replicas to take work")

    # -- 2. half-way through, a manual override of 1 retires the two newest after their batch ------
    consume(8)
    redis_client.hset(keys.control, CONTROL_DESIRED_TEACHERS, 1)
    shrunk_at = time.monotonic()
    decision = pool.step()
    assert decision.replicas == 1 and decision.reason == "manual override"
    assert pool.replica_ids() == ["teacher-0"] and sorted(pool.leaving_ids()) == ["teacher-1", "teacher-2"]
    assert redis_client.hget(keys.control, replica_stop_field("teacher-2")) == b"1"

    def left() -> bool:
        consume(1)
        pool.step()
        return not pool.leaving_ids()

    wait_for(left, 30, "the two replicas to leave")
    scale_down_s = time.monotonic() - shrunk_at
    retired = {s["replica_id"]: s for s in pool.stats()}
    assert set(retired) == {"teacher-1", "teacher-2"}
    assert all(s["batches"] >= 1 for s in retired.values())  # the replicas added in step 1 did serve
    # They left holding nothing, and were removed from the consumer group.
    assert set(consumers(redis_client, keys)) == {"teacher-0"}
    assert redis_client.hget(keys.control, replica_stop_field("teacher-2")) is None
    assert pool.step().replicas == 1  # the override stays in force while the field is set

    # -- 3. one replica finishes the epoch; the job stops; every batch was distilled exactly once -----
    while not student.ledger.complete:
        consume(4)
        pool.step()
    redis_client.hset(keys.control, CONTROL_STOP, "1")
    stats = pool.shutdown(timeout_s=30)
    assert [s["replica_id"] for s in stats] == ["teacher-0", "teacher-1", "teacher-2"]
    assert {"replica_id", "batches", "samples", "busy_seconds"} <= set(stats[0])  # TeacherReplica.stats()
    assert sum(s["batches"] for s in stats) == BATCHES
    assert sum(s["samples"] for s in stats) == SAMPLES
    assert student.ledger.samples_applied == SAMPLES and student.ledger.batches_applied == BATCHES
    assert student.ledger.duplicates_dropped == 0
    assert redis_client.xlen(keys.work_stream) == 0 and redis_client.xlen(keys.knowledge_stream) == 0
    assert redis_client.xpending(keys.work_stream, TEACHER_GROUP)["pending"] == 0
    assert redis_client.exists(keys.dead_letter_stream) == 0
    assert redis_client.hget(keys.metrics, METRIC_TEACHERS_RUNNING) == b"0"
    assert requested[-1] == []  # the standing resource request is released
    assert [(e.replicas_from, e.replicas_to) for e in pool.events] == [(0, 1), (1, 3), (3, 1)]
    print(f"\nscale-up 1->3: new replicas serving {scale_up_s:.1f} s after the decision; "
          f"scale-down 3->1: both left after {scale_down_s:.2f} s")
