"""The teacher-pool sizing policy, tested as the pure function it is: plain values in, plain
values out, the clock passed in. No Ray is started (and the module may not import it)."""

from __future__ import annotations

import ast
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import polydistill.cluster.autoscaling as autoscaling
from polydistill.cluster.autoscaling import PoolDecision, PoolMetrics, PoolScalingConfig, PoolState, decide

ROOT = Path(__file__).resolve().parents[2]

# No delays, no headroom, no smoothing: the rules alone.
INSTANT = PoolScalingConfig(
    min_replicas=1, max_replicas=16, target_backlog_per_replica=2, headroom=1.0,
    upscale_delay_s=0, downscale_delay_s=0,
)
DELAYED = PoolScalingConfig(
    min_replicas=1, max_replicas=16, target_backlog_per_replica=2, headroom=1.0,
    upscale_delay_s=30, downscale_delay_s=120,
)


@pytest.fixture(autouse=True)
def forbid_ray_init(monkeypatch):
    """Any attempt to start Ray from the policy fails the test (as Ray Serve's policy tests do)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency, but the policy must not need it
        yield
        return

    def refuse(*args, **kwargs):
        raise AssertionError("the scaling policy must not start Ray")

    monkeypatch.setattr(ray, "init", refuse)
    yield


def metrics(
    work=0, knowledge=0, limit=32, running=4, teacher_rate=None, student_rate=None, override=None
) -> PoolMetrics:
    return PoolMetrics(
        work_backlog=work, knowledge_backlog=knowledge, knowledge_backlog_limit=limit,
        running_replicas=running, per_replica_batches_per_s=teacher_rate,
        student_batches_per_s=student_rate, manual_override=override,
    )


def simulate(config: PoolScalingConfig, steps, running: int) -> list[int]:
    """Feeds (now, metrics-without-running) steps, applying each decision as a caller would."""
    state, sizes = PoolState(), []
    for now, kwargs in steps:
        decision, state = decide(metrics(running=running, **kwargs), config, state, now)
        running = decision.replicas
        sizes.append(running)
    return sizes


# --- the module is pure ----------------------------------------------------------------------


def test_policy_module_imports_no_ray_and_reads_no_clock():
    tree = ast.parse(Path(autoscaling.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"ray", "time", "datetime", "redis", "os", "socket", "random"}, imported


def test_importing_the_policy_does_not_import_ray():
    code = "import sys, cluster.autoscaling; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# --- one decision, no delays -------------------------------------------------------------------

CASES = [
    # name, metrics kwargs, expected replicas
    ("unknown rates: backlog sizes the pool", dict(work=10, running=2), 5),
    ("unknown rates: small backlog shrinks", dict(work=2, running=4), 1),
    ("unknown student rate falls back to backlog", dict(work=12, running=2, teacher_rate=5.0), 6),
    ("unknown teacher rate falls back to backlog", dict(work=12, running=2, student_rate=5.0), 6),
    ("zero teacher rate counts as unknown", dict(work=12, running=2, teacher_rate=0.0, student_rate=5.0), 6),
    ("match the student's rate", dict(work=0, running=2, teacher_rate=2.0, student_rate=10.0), 5),
    ("rate needs fewer: shrink", dict(work=0, running=8, teacher_rate=2.0, student_rate=6.0), 3),
    ("backlog above target raises the rate's answer", dict(work=16, running=2, teacher_rate=2.0, student_rate=4.0), 8),
    ("backlog at target does not raise", dict(work=8, running=4, teacher_rate=2.0, student_rate=8.0), 4),
    ("knowledge full: no upscale, step down", dict(work=30, knowledge=32, running=4), 3),
    ("knowledge near limit (90%): step down",
     dict(work=30, knowledge=29, running=4, teacher_rate=1.0, student_rate=9.0), 3),
    ("knowledge full and rate wants fewer: the lower",
     dict(knowledge=32, running=8, teacher_rate=2.0, student_rate=4.0), 2),
    ("knowledge between watermarks: hold, no growth", dict(work=30, knowledge=20, running=4), 4),
    ("knowledge between watermarks: shrinking allowed", dict(work=2, knowledge=20, running=4), 1),
    ("knowledge below low watermark: grow", dict(work=30, knowledge=10, running=4), 15),
    ("clamped to max", dict(work=1000, running=4), 16),
    ("clamped to min", dict(work=0, running=4, teacher_rate=2.0, student_rate=0.0), 1),
    ("knowledge full at min: stays at min", dict(knowledge=32, running=1), 1),
    ("empty pool with work starts replicas", dict(work=6, running=1), 3),
]


@pytest.mark.parametrize("kwargs, expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_rules_without_delays(kwargs, expected):
    decision, state = decide(metrics(**kwargs), INSTANT, PoolState(), now=100.0)
    assert decision.replicas == expected, decision.reason
    assert state == PoolState(), "an applied or steady decision leaves nothing pending"


def test_headroom_rounds_up():
    config = INSTANT.model_copy(update={"headroom": 1.1})
    decision, _ = decide(metrics(running=2, teacher_rate=2.0, student_rate=10.0), config, PoolState(), 0.0)
    assert decision.replicas == 6  # 10 * 1.1 / 2 = 5.5


def test_reason_names_the_cause():
    decision, _ = decide(metrics(work=30, knowledge=32, running=4), INSTANT, PoolState(), 0.0)
    assert "students are the bottleneck" in decision.reason and "32/32" in decision.reason
    decision, _ = decide(metrics(work=10, running=2), INSTANT, PoolState(), 0.0)
    assert "rates unknown" in decision.reason and "scale up 2 -> 5" in decision.reason


# --- manual override, bounds -------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected, clamped",
    [(6, 6, False), (0, 1, True), (40, 16, True), (16, 16, False)],
)
def test_manual_override_wins_at_once_clamped_to_bounds(override, expected, clamped):
    pending = PoolState(direction="up", proposed=10, since=0.0)
    # Everything else says "step down", and the delays are long: the override still applies now.
    decision, state = decide(metrics(knowledge=32, running=4, override=override), DELAYED, pending, now=1.0)
    assert decision.replicas == expected
    assert ("clamped" in decision.reason) == clamped
    assert decision.reason.startswith("manual override")
    assert state == PoolState()


@pytest.mark.parametrize("running, expected", [(20, 16), (0, 1)])
def test_out_of_bounds_pool_is_fixed_without_delay(running, expected):
    decision, state = decide(metrics(work=0, running=running), DELAYED, PoolState(), now=0.0)
    assert decision.replicas == expected
    assert state == PoolState()


# --- delays, hysteresis, state -------------------------------------------------------------------


def test_spike_shorter_than_upscale_delay_does_not_scale():
    spike = dict(work=40)
    calm = dict(work=8)  # 2 per replica at 4 replicas: steady
    steps = [(0, calm), (10, spike), (20, spike), (35, spike), (39, calm), (45, spike), (60, calm)]
    assert simulate(DELAYED, steps, running=4) == [4] * len(steps)


def test_sustained_load_scales_up_after_exactly_the_delay():
    steps = [(t, dict(work=40)) for t in (0, 10, 29.9, 30, 40)]
    assert simulate(DELAYED, steps, running=4) == [4, 4, 4, 16, 16]


def test_downscale_waits_for_its_longer_delay():
    steps = [(t, dict(work=2)) for t in (0, 30, 60, 119, 120)]
    assert simulate(DELAYED, steps, running=4) == [4, 4, 4, 4, 1]


def test_state_resets_when_the_proposal_changes_direction():
    config = DELAYED
    up = metrics(work=40, running=4)
    decision, state = decide(up, config, PoolState(), now=0.0)
    assert (decision.replicas, state) == (4, PoolState(direction="up", proposed=16, since=0.0))

    # Down is proposed: a fresh clock for the new direction.
    decision, state = decide(metrics(work=2, running=4), config, state, now=20.0)
    assert (decision.replicas, state) == (4, PoolState(direction="down", proposed=1, since=20.0))

    # Steady: nothing pending any more.
    decision, state = decide(metrics(work=8, running=4), config, state, now=25.0)
    assert (decision.replicas, state) == (4, PoolState())

    # Up again: the earlier up proposal (since 0) does not count.
    decision, state = decide(up, config, state, now=31.0)
    assert decision.replicas == 4 and state.since == 31.0


def test_a_moving_target_in_one_direction_keeps_its_clock():
    """Noisy rates (wants 6, 5, 6, 5) still scale after the delay, to the latest target."""
    rates = [12.0, 10.0, 12.0, 10.0]
    steps = [(t, dict(teacher_rate=2.0, student_rate=r)) for t, r in zip((0, 10, 20, 30), rates)]
    assert simulate(DELAYED, steps, running=4) == [4, 4, 4, 5]


def test_knowledge_backlog_full_blocks_upscale_and_eventually_scales_down():
    # Work is piling up (teachers look slow), but the students cannot take more knowledge.
    full = dict(work=64, knowledge=32, teacher_rate=1.0, student_rate=8.0)
    times = [0, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600]
    sizes = simulate(DELAYED, [(t, full) for t in times], running=6)
    assert max(sizes) == 6, "never scales up while the knowledge backlog is full"
    assert sizes[:2] == [6, 6], "but waits for the downscale delay"
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 6
    assert sizes.index(5) == 2  # 120 s after the backlog filled


def test_knowledge_between_watermarks_does_not_flap():
    """Backlog swinging inside the band neither grows nor shrinks a pool the work asks to grow."""
    swings = [dict(work=40, knowledge=k) for k in (17, 25, 28, 20, 16, 27, 22)]
    steps = [(60.0 * i, s) for i, s in enumerate(swings)]
    assert simulate(DELAYED, steps, running=5) == [5] * len(steps)


def test_backlog_hovering_around_target_does_not_flap_with_delays():
    # 2 per replica at 4 replicas, +-1 batch of noise: each side is proposed only briefly.
    steps = [(10.0 * i, dict(work=w)) for i, w in enumerate([9, 7, 9, 8, 7, 9, 10, 7, 9, 8] * 3)]
    assert set(simulate(DELAYED, steps, running=4)) == {4}


# --- smoothing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "running, kwargs, up, down, expected",
    [
        (2, dict(work=20), 0.5, 1.0, 6),  # 2 -> 10 wanted, halfway
        (2, dict(work=6), 0.1, 1.0, 3),  # at least one step
        (10, dict(work=4), 1.0, 0.5, 6),  # 10 -> 2 wanted, halfway
        (3, dict(work=4), 1.0, 0.1, 2),  # at least one step, never past the target
    ],
)
def test_smoothing_moves_part_of_the_way(running, kwargs, up, down, expected):
    config = INSTANT.model_copy(update={"upscaling_factor": up, "downscaling_factor": down})
    decision, _ = decide(metrics(running=running, **kwargs), config, PoolState(), 0.0)
    assert decision.replicas == expected


# --- monotonic responses (a sweep; hypothesis is not installed) ---------------------------------

RUNNING = [1, 2, 4, 7, 16]
RATES = [None, (2.0, 3.0), (1.5, 12.0)]


@pytest.mark.parametrize("running", RUNNING)
@pytest.mark.parametrize("rates", RATES)
@pytest.mark.parametrize("knowledge", [0, 20, 32])
def test_more_work_never_means_fewer_replicas(running, rates, knowledge):
    teacher_rate, student_rate = rates or (None, None)
    sizes = [
        decide(metrics(work=w, knowledge=knowledge, running=running, teacher_rate=teacher_rate,
                       student_rate=student_rate), INSTANT, PoolState(), 0.0)[0].replicas
        for w in range(0, 80)
    ]
    assert sizes == sorted(sizes)
    assert all(INSTANT.min_replicas <= s <= INSTANT.max_replicas for s in sizes)
    if knowledge >= 0.5 * 32:
        assert max(sizes) <= running, "no growth once the students are backed up"


@pytest.mark.parametrize("running", RUNNING)
@pytest.mark.parametrize("work", [0, 8, 40])
def test_fuller_knowledge_backlog_never_means_more_replicas(running, work):
    sizes = [
        decide(metrics(work=work, knowledge=k, running=running, teacher_rate=2.0, student_rate=9.0),
               INSTANT, PoolState(), 0.0)[0].replicas
        for k in range(0, 33)
    ]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("running", RUNNING)
def test_faster_student_never_means_fewer_replicas(running):
    sizes = [
        decide(metrics(work=4, running=running, teacher_rate=2.0, student_rate=r / 2), INSTANT,
               PoolState(), 0.0)[0].replicas
        for r in range(0, 80)
    ]
    assert sizes == sorted(sizes)


# --- inputs are checked ------------------------------------------------------------------------


def test_config_is_strict_and_frozen():
    with pytest.raises(ValidationError, match="min_replicas"):
        PoolScalingConfig(min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError, match="knowledge_low_watermark"):
        PoolScalingConfig(knowledge_low_watermark=0.95, knowledge_high_watermark=0.9)
    with pytest.raises(ValidationError, match="extra"):
        PoolScalingConfig(max_replica=3)
    with pytest.raises(ValidationError):
        PoolScalingConfig(upscaling_factor=2.0)
    with pytest.raises(ValidationError):
        INSTANT.max_replicas = 3


@pytest.mark.parametrize(
    "kwargs",
    [dict(work=-1), dict(running=-1), dict(limit=0), dict(override=-2), dict(teacher_rate=math.nan),
     dict(student_rate=-1.0)],
)
def test_impossible_measurements_are_rejected(kwargs):
    with pytest.raises(ValueError):
        metrics(**kwargs)


def test_values_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics().work_backlog = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        PoolState().since = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        PoolDecision(1, "x").replicas = 2


def test_standing_request_sums_live_pools_in_key_order():
    from polydistill.cluster.autoscaling import PoolDemand, standing_request

    demands = {
        "ns/b/teacher": PoolDemand.of([{"CPU": 1.0}], expires_at=50.0),
        "ns/a/teacher": PoolDemand.of([{"GPU": 1.0}, {"GPU": 1.0}], expires_at=50.0),
        "ns/c/teacher": PoolDemand.of([{"GPU": 1.0}], expires_at=10.0),  # expired: its pool is gone
        "ns/d/teacher": PoolDemand.of([{}], expires_at=50.0),  # a replica that asks for nothing
    }
    assert standing_request(demands, now=20.0) == [{"GPU": 1.0}, {"GPU": 1.0}, {"CPU": 1.0}]
    assert standing_request(demands, now=60.0) == []
