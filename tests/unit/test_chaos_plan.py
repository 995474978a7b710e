"""The chaos script's pure parts: the seeded fault schedule and the verdict. No Ray, no Redis."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.chaos_plan import (  # noqa: E402
    KINDS,
    OUTAGE_S,
    FaultRecord,
    PlannedFault,
    judge,
    parse_kinds,
    plan_faults,
    same_student,
)


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another():
    assert plan_faults(8, KINDS, seed=7, total_batches=150) == plan_faults(8, KINDS, seed=7, total_batches=150)
    schedules = {tuple(plan_faults(8, KINDS, seed=seed, total_batches=150)) for seed in range(20)}
    assert len(schedules) > 15


@pytest.mark.parametrize("n", [1, 3, 4, 7, 8, 13])
def test_kinds_are_as_even_as_possible(n):
    for seed in range(10):
        counts = Counter(f.kind for f in plan_faults(n, KINDS, seed, total_batches=150))
        assert sum(counts.values()) == n and set(counts) <= set(KINDS)
        assert max(counts.values()) - min(counts.get(kind, 0) for kind in KINDS) <= 1
        if n >= len(KINDS):
            assert set(counts) == set(KINDS)


def test_faults_fire_in_order_at_distinct_batches_inside_the_window():
    for seed in range(50):
        for n, total in [(4, 150), (8, 150), (8, 12), (1, 3)]:
            plan = plan_faults(n, KINDS, seed, total_batches=total)
            batches = [f.after_batches for f in plan]
            assert [f.index for f in plan] == list(range(1, n + 1))
            assert batches == sorted(set(batches))
            assert 0.15 * total <= batches[0] and batches[-1] <= 0.85 * total


def test_the_moments_spread_over_the_job():
    # One fault per slice of the window: the first of 8 in the first eighth, the last in the last.
    for seed in range(20):
        batches = [f.after_batches for f in plan_faults(8, KINDS, seed, total_batches=200)]
        assert batches[0] < 30 + 140 / 8 and batches[-1] >= 170 - 140 / 8


def test_only_outages_have_a_down_time_and_it_is_bounded():
    for fault in plan_faults(40, KINDS, seed=3, total_batches=1000):
        if fault.kind == "redis-outage":
            assert OUTAGE_S[0] <= fault.down_s <= OUTAGE_S[1]
        else:
            assert fault.down_s is None


def test_a_subset_of_kinds():
    plan = plan_faults(5, ("student", "redis-empty"), seed=1, total_batches=100)
    assert {f.kind for f in plan} == {"student", "redis-empty"}


def test_bad_requests_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="do not fit"):
        plan_faults(8, KINDS, seed=0, total_batches=6)
    with pytest.raises(ValueError, match="at least one"):
        plan_faults(0, KINDS, seed=0, total_batches=100)
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse_kinds("teacher,broker")
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse_kinds(" , ")
    with pytest.raises(ValueError, match="twice"):
        parse_kinds("student,student")
    assert parse_kinds("redis-outage, teacher") == ("redis-outage", "teacher")


# -- the verdict --------------------------------------------------------------------------------
def _report(*, steps=150, recoveries=(), teachers=3, dead_letters=0, dead_batches=0) -> dict:
    """A report of 3 epochs x 50 batches of 8; ``dead_batches`` of them dead-lettered in epoch 1."""
    dead = 8 * dead_batches
    return {"samples_distilled": 1200 - dead, "samples_expected": 1200,
            "samples_per_epoch": {"0": 400, "1": 400 - dead, "2": 400}, "epochs": 3, "batches_expected": 150,
            "batches_applied": 150 - dead_batches, "batches_missing": dead_batches, "student_steps": steps - dead_batches,
            "samples_dead_lettered": {"MessageRejected: token ids": dead} if dead else {},
            "duplicates_dropped": 2, "dead_letters": dead_letters, "recoveries": list(recoveries),
            "teachers": [{}] * teachers, "resumed_from_step": 40}


def _records() -> list[FaultRecord]:
    plan = plan_faults(2, ("teacher", "student"), seed=0, total_batches=150)
    return [FaultRecord(fault, injected_at=100.0 + 10 * i, seconds_into_job=10.0 * i) for i, fault in enumerate(plan)]


def _restart(at: float) -> dict:
    return {"cause": "the student worker died (ActorDiedError)", "detected_at": at, "seconds": 3.0,
            "batches_refed": 12, "student_restarted": True}


def test_every_fault_survived_with_exact_accounting_passes():
    records = _records()
    student_at = next(r.injected_at for r in records if r.planned.kind == "student")
    result = judge(records, _report(recoveries=[_restart(student_at + 1)]), None, replicas=2)
    assert result["ok"] and result["verdict"].startswith("PASS")
    assert result["accounting"]["duplicates_applied"] == 0
    assert result["survived_by_kind"] == {k: {"planned": 1, "injected": 1, "survived": 1, "skipped": 0} for k in ("teacher", "student")}
    [with_restart] = [f for f in result["faults"] if f["recoveries"]]
    assert with_restart["kind"] == "student"


def test_a_batch_applied_twice_a_missing_recovery_or_a_fault_not_injected_fails():
    records = _records()
    student_at = next(r.injected_at for r in records if r.planned.kind == "student")
    doubled = judge(records, _report(steps=151, recoveries=[_restart(student_at + 1)]), None, replicas=2)
    assert not doubled["ok"] and doubled["accounting"]["duplicates_applied"] == 1
    no_restart = judge(records, _report(), None, replicas=2)
    assert not no_restart["ok"] and "no student restart" in str(no_restart["faults"])
    not_replaced = judge(records, _report(teachers=2, recoveries=[_restart(student_at + 1)]), None, replicas=2)
    assert not not_replaced["ok"] and "did not replace" in str(not_replaced["faults"])
    records[1].injected_at = records[1].seconds_into_job = None
    assert not judge(records, _report(recoveries=[_restart(student_at + 1)]), None, replicas=2)["ok"]
    assert not judge(_records(), None, "JobFailed: accounting mismatch", replicas=2)["ok"]


def _injected(*kinds: str, poison_messages: int = 0) -> list[FaultRecord]:
    return [FaultRecord(PlannedFault(i + 1, kind, 30 + 10 * i), injected_at=100.0 + 10 * i, seconds_into_job=10.0 * i,
                        poison_messages=poison_messages if kind.startswith("poison") else 0)
            for i, kind in enumerate(kinds)]


def _control_restart(actor: str, at: float) -> dict:
    return {"cause": f"the {actor} died (ActorDiedError)", "detected_at": at, "seconds": 2.0, "batches_refed": 3,
            "student_restarted": False, "actor_restarted": actor}


def test_a_killed_control_actor_is_survived_only_with_its_restart_in_the_report():
    records = _injected("pool", "feeder", "cache-writer")
    restarts = [_control_restart("teacher pool 'teacher'", 101.0), _control_restart("feeder", 111.0),
                _control_restart("cache writer", 121.0)]
    assert judge(records, _report(recoveries=restarts), None, replicas=2)["ok"]
    missing_feeder = judge(records, _report(recoveries=[restarts[0], restarts[2]]), None, replicas=2)
    assert not missing_feeder["ok"]
    assert [f["why_not"] for f in missing_feeder["faults"]] == [None, "no feeder restart followed the kill", None]


def test_bad_messages_dead_lettered_with_their_samples_keep_the_accounting_exact():
    records = _injected("poison-work", "poison-knowledge", poison_messages=3)
    # One planned batch swapped for a bad copy: its 8 samples dead-lettered, the rest distilled once.
    result = judge(records, _report(dead_letters=5, dead_batches=1), None, replicas=2)
    assert result["ok"], result
    figures = result["accounting"]
    assert figures["samples_distilled"] + figures["samples_dead_lettered"] == figures["samples_expected"]
    assert figures["duplicates_applied"] == 0


def test_dead_letters_without_bad_messages_or_lost_samples_fail_the_accounting():
    # A dead letter nobody wrote bad: a good batch was refused.
    assert not judge(_injected("teacher"), _report(dead_letters=1, teachers=4), None, replicas=2)["ok"]
    # Samples neither distilled nor dead-lettered.
    lost = _report(dead_letters=3)
    lost["samples_distilled"] -= 8
    assert not judge(_injected("poison-work", poison_messages=3), lost, None, replicas=2)["ok"]
    # Bad messages never read (written after the last planned batch) are no fault of the job's.
    assert judge(_injected("poison-work", poison_messages=3), _report(), None, 2)["ok"]


def test_a_student_counts_as_the_same_within_two_standard_errors():
    # 408 rows at about 50 %: the standard error of a difference is 3.5 points, the tolerance 6.9.
    close = same_student(0.52, 0.49, rows=408)
    assert close["equal"] and abs(close["tolerance"] - 0.0686) < 1e-3
    assert not same_student(0.40, 0.49, rows=408)["equal"]
    assert same_student(0.49, 0.49, rows=408)["difference"] == 0


def test_a_control_actors_restart_noticed_after_later_faults_still_answers_its_kill():
    # The cache writer's death is noticed only after the feeder and the pool were killed too.
    records = _injected("cache-writer", "feeder", "pool")
    restarts = [_control_restart("teacher pool 'teacher'", 125.0), _control_restart("cache writer", 126.0),
                _control_restart("feeder", 127.0)]
    result = judge(records, _report(recoveries=restarts), None, replicas=2)
    assert result["ok"], result["faults"]
    assert [f["recoveries"][0]["actor_restarted"] for f in result["faults"]] == [
        "cache writer", "feeder", "teacher pool 'teacher'"]


def test_a_killed_replica_counts_as_replaced_when_the_pool_itself_was_restarted():
    records = _injected("teacher", "pool")
    report = _report(teachers=2, recoveries=[_control_restart("teacher pool 'teacher'", 115.0)])
    assert not judge(records, report, None, replicas=2)["ok"]
    report["teacher_pool"] = {"restarted": True, "replicas_lost_with_pool": ["teacher-1"]}
    assert judge(records, report, None, replicas=2)["ok"]


def test_a_control_actor_killed_after_its_work_was_done_counts_when_ray_restarted_it():
    records = _injected("feeder")
    assert not judge(records, _report(), None, replicas=2)["ok"]
    assert judge(records, _report(), None, replicas=2, ray_restarts={"FeederActor": 1})["ok"]
    assert not judge(records, _report(), None, replicas=2, ray_restarts={"TeacherPoolActor": 1})["ok"]


def test_a_fault_with_nothing_alive_to_hit_is_skipped_not_failed():
    records = _injected("teacher", "feeder")
    records[0].injected_at = records[0].seconds_into_job = None
    records[0].skipped = True
    result = judge(records, _report(teachers=2), None, replicas=2, ray_restarts={"FeederActor": 1})
    assert result["ok"] and "1 skipped" in result["verdict"]
    assert result["survived_by_kind"]["teacher"] == {"planned": 1, "injected": 0, "survived": 0, "skipped": 1}


def test_redis_emptied_while_a_recovery_is_under_way_is_repaired_by_that_recovery():
    # The feeder died at 100 s and its recovery ran until 110 s; Redis was emptied at 110 s, before the
    # recovery's reset rebuilt the streams and the run marker: there was nothing left for the driver to notice.
    records = _injected("feeder", "redis-empty")
    feeder = {**_control_restart("feeder", 100.5), "seconds": 10.0}
    assert judge(records, _report(recoveries=[feeder]), None, replicas=2)["ok"]
    # Emptied after that recovery had ended, with no recovery of its own: not noticed, not survived.
    short = {**feeder, "seconds": 2.0}
    result = judge(records, _report(recoveries=[short]), None, replicas=2)
    assert not result["ok"]
    assert [f["why_not"] for f in result["faults"]] == [None, "the driver did not notice the lost data"]
