"""The driver's recovery decisions, the delivery rules and the saved job file: pure, no Ray, no Redis."""

from __future__ import annotations

import pytest

from polydistill.cluster.recovery import QUIET_S, Observation, WatchState, judge_probe, watch
from polydistill.cluster.resume import without_password
from polydistill.storage.delivery import over_delivered_reason, split_over_delivered


def observe(marker=True, feeding=False, work=0, knowledge=0) -> Observation:
    return Observation(run_marker_present=marker, feeding=feeding, work_backlog=work, knowledge_backlog=knowledge)


def test_a_vanished_run_marker_means_redis_lost_the_data():
    verdict, state = watch(observe(marker=False, feeding=True, work=3), WatchState(quiet_since=1.0), now=5.0)
    assert verdict.action == "recover" and "run marker" in verdict.reason
    assert state == WatchState()


@pytest.mark.parametrize("obs", [observe(feeding=True), observe(work=1), observe(knowledge=2)])
def test_anything_queued_or_feeding_means_wait_and_resets_the_quiet_clock(obs):
    verdict, state = watch(obs, WatchState(quiet_since=0.0), now=100.0)
    assert verdict.action == "wait" and state.quiet_since is None


def test_probe_only_after_a_quiet_period_and_then_at_most_every_period():
    verdict, state = watch(observe(), WatchState(), now=10.0)
    assert verdict.action == "wait" and state.quiet_since == 10.0
    verdict, state = watch(observe(), state, now=10.0 + QUIET_S / 2)
    assert verdict.action == "wait" and state.quiet_since == 10.0
    verdict, state = watch(observe(), state, now=10.0 + QUIET_S)
    assert verdict.action == "probe" and state.quiet_since == 10.0 + QUIET_S
    verdict, _ = watch(observe(), state, now=10.0 + QUIET_S * 1.5)
    assert verdict.action == "wait"


def test_probe_results():
    assert judge_probe(missing=0, unnamed_dead_letters=3).action == "wait"
    lost = judge_probe(missing=4, unnamed_dead_letters=0)
    assert lost.action == "recover" and "4 batches were lost" in lost.reason
    poisoned = judge_probe(missing=1, unnamed_dead_letters=1)
    assert poisoned.action == "stop" and "name no batch" in poisoned.reason


def test_delivery_limit():
    assert over_delivered_reason(3, max_deliveries=3) is None
    reason = over_delivered_reason(4, max_deliveries=3)
    assert "delivered 4 times" in reason and "transport.max_deliveries=3" in reason
    with pytest.raises(ValueError, match="transport.max_deliveries"):
        over_delivered_reason(1, max_deliveries=0)


def test_split_over_delivered_keeps_entries_no_longer_pending():
    entries = [("1-0", b"a"), ("2-0", b"b"), ("3-0", b"c")]
    keep, dead = split_over_delivered(entries, {"1-0": 2, "2-0": 7}, max_deliveries=5)
    assert keep == [("1-0", b"a"), ("3-0", b"c")]
    assert [entry for entry, _ in dead] == [("2-0", b"b")] and "delivered 7 times" in dead[0][1]


@pytest.mark.parametrize("url, expected", [
    ("redis://:hunter2@host:6379/0", "redis://host:6379/0"),
    ("rediss://job-a:hunter2@host:6380/1", "rediss://job-a@host:6380/1"),
    ("redis://host:6379/0?password=hunter2&db=1", "redis://host:6379/0?db=1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    (None, None),
])
def test_saved_urls_carry_no_password(url, expected):
    assert without_password(url) == expected
