"""The chaos script's pure parts: the seeded fault schedule and the verdict. No Ray, no Redis."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.chaos import KINDS, OUTAGE_S, FaultRecord, judge, parse_kinds, plan_faults  # noqa: E402


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
def _report(*, steps=150, recoveries=(), teachers=3) -> dict:
    return {"samples_distilled": 1200, "samples_expected": 1200, "samples_per_epoch": {"0": 400, "1": 400, "2": 400},
            "epochs": 3, "batches_expected": 150, "batches_applied": 150, "batches_missing": 0, "student_steps": steps,
            "duplicates_dropped": 2, "dead_letters": 0, "recoveries": list(recoveries),
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
    assert result["survived_by_kind"] == {k: {"planned": 1, "injected": 1, "survived": 1} for k in ("teacher", "student")}
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
