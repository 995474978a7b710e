"""How many teacher replicas the pool should run: a pure decision, in the style of Ray Serve's
autoscaling policies.

    decide(metrics, config, state, now) -> (PoolDecision, PoolState)

The caller measures (``PoolMetrics``), keeps the returned ``PoolState`` and passes it back on the
next call, together with the clock. This module does no I/O, reads no clock and imports no Ray, so
every rule below is tested with plain values (tests/unit/test_autoscaling.py).

The rules, in the order they apply:

1. **Manual override wins.** ``metrics.manual_override`` is applied at once (no delay), clamped to
   ``[min_replicas, max_replicas]``: the bounds are the budget/quota an operator set in the same
   config, so an override outside them is treated as a typo rather than a wish; the reason says
   when it was clamped. The pending proposal is dropped.
2. **Out of bounds is fixed at once.** A pool running outside ``[min_replicas, max_replicas]``
   (the bounds were just changed) is brought inside immediately.
3. **Match the student.** With both rates known, the teachers should produce about as fast as the
   student consumes: ``ceil(student_rate * headroom / per_replica_rate)``. The work backlog can only
   raise this: ``ceil(work_backlog / target_backlog_per_replica)``. With a rate unknown (before the
   first measurement) the backlog term alone sizes the pool.
4. **Never feed a full student.** With the knowledge backlog at or above
   ``knowledge_high_watermark`` of its limit the students are the bottleneck: more teachers would
   only wait on backpressure, so the pool steps down (at least one replica). Between the low and
   the high watermark the pool may shrink but not grow; below the low watermark rule 3 applies in
   full. The gap between the two watermarks is the hysteresis that keeps the pool from flapping.
5. **Smoothing** (Ray Serve's ``upscaling_factor`` / ``downscaling_factor``): the pool moves
   ``factor`` of the way from the current size to the target, at least one replica, never past it.
6. **Delays.** A proposal to grow is applied only after growing was proposed on every call for
   ``upscale_delay_s``; shrinking likewise for ``downscale_delay_s``. The clock restarts whenever
   the proposed direction changes (up, down, or hold); within one direction the latest target is
   applied, so noisy rates (5, 6, 5, 6) still scale, like Ray Serve's consecutive-decision count.
7. Everything is clamped to ``[min_replicas, max_replicas]``.

What the caller should measure:
- ``running_replicas``: the replicas the pool has or is starting (the last applied decision), not
  only the ready ones; otherwise a slow start would be asked for twice.
- ``per_replica_batches_per_s``: batches per second of *busy* time, so that waiting on
  backpressure does not look like a slow teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Direction = Literal["up", "down"]


class PoolScalingConfig(BaseModel):
    """Bounds, targets and delays of the teacher pool's sizing policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=0, le=1024)
    max_replicas: int = Field(default=8, ge=1, le=1024)
    target_backlog_per_replica: float = Field(
        default=2.0, gt=0, description="Work batches waiting (or in flight) per replica that we aim for."
    )
    headroom: float = Field(
        default=1.1, ge=1.0, le=4.0, description="Teachers produce this much faster than the student consumes."
    )
    knowledge_high_watermark: float = Field(
        default=0.9, gt=0, le=1.0, description="Knowledge backlog / limit at which the students are the bottleneck."
    )
    knowledge_low_watermark: float = Field(
        default=0.5, ge=0, le=1.0, description="Knowledge backlog / limit under which the pool may grow again."
    )
    upscale_delay_s: float = Field(default=30.0, ge=0, description="Growing must be proposed this long first.")
    downscale_delay_s: float = Field(default=300.0, ge=0, description="Shrinking must be proposed this long first.")
    upscaling_factor: float = Field(default=1.0, gt=0, le=1.0, description="Fraction of the way up to move per step.")
    downscaling_factor: float = Field(
        default=1.0, gt=0, le=1.0, description="Fraction of the way down to move per step."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "PoolScalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.knowledge_low_watermark > self.knowledge_high_watermark:
            raise ValueError(
                f"knowledge_low_watermark ({self.knowledge_low_watermark}) is above "
                f"knowledge_high_watermark ({self.knowledge_high_watermark})"
            )
        return self


@dataclass(frozen=True)
class PoolMetrics:
    """One measurement of the pipeline; no timestamps, the clock is passed to ``decide``."""

    work_backlog: int  # work batches undelivered + pending (delivered, not yet acked)
    knowledge_backlog: int  # knowledge messages waiting for the students
    knowledge_backlog_limit: int  # transport.max_knowledge_backlog
    running_replicas: int
    per_replica_batches_per_s: float | None = None  # None before the first measurement
    student_batches_per_s: float | None = None  # None before the first measurement
    manual_override: int | None = None

    def __post_init__(self) -> None:
        for name in ("work_backlog", "knowledge_backlog", "running_replicas"):
            if getattr(self, name) < 0:
                raise ValueError(f"PoolMetrics.{name} is negative ({getattr(self, name)}): a measurement bug")
        if self.knowledge_backlog_limit < 1:
            raise ValueError(
                f"PoolMetrics.knowledge_backlog_limit must be at least 1, got {self.knowledge_backlog_limit}"
            )
        for name in ("per_replica_batches_per_s", "student_batches_per_s"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"PoolMetrics.{name} must be a finite rate >= 0 or None, got {value}")
        if self.manual_override is not None and self.manual_override < 0:
            raise ValueError(f"PoolMetrics.manual_override is negative ({self.manual_override})")


@dataclass(frozen=True)
class PoolState:
    """The pending proposal: its direction, its latest target and since when it has been proposed."""

    direction: Direction | None = None
    proposed: int | None = None
    since: float | None = None


@dataclass(frozen=True)
class PoolDecision:
    replicas: int
    reason: str


def _clamp(value: int, config: PoolScalingConfig) -> int:
    return max(config.min_replicas, min(config.max_replicas, value))


def _raw_target(metrics: PoolMetrics, config: PoolScalingConfig) -> tuple[int, str]:
    """Rules 3 and 4: the size the measurements ask for, before bounds, smoothing and delays."""
    current = metrics.running_replicas
    backlog_target = math.ceil(metrics.work_backlog / config.target_backlog_per_replica)
    per_replica = config.target_backlog_per_replica
    parts = [f"work backlog {metrics.work_backlog} wants {backlog_target} at {per_replica:g}/replica"]
    target = backlog_target
    teacher_rate, student_rate = metrics.per_replica_batches_per_s, metrics.student_batches_per_s
    if teacher_rate and student_rate is not None:  # a rate of 0 per replica says nothing about capacity
        rate_target = math.ceil(student_rate * config.headroom / teacher_rate - 1e-9)
        parts.insert(0, f"student {student_rate:g}/s over {teacher_rate:g}/s per replica wants {rate_target}")
        target = max(target, rate_target)
    else:
        parts.append("rates unknown")

    fill = metrics.knowledge_backlog / metrics.knowledge_backlog_limit
    knowledge = f"knowledge backlog {metrics.knowledge_backlog}/{metrics.knowledge_backlog_limit}"
    if fill >= config.knowledge_high_watermark:
        target = min(target, current - 1)
        parts.append(f"{knowledge} full: students are the bottleneck, step down")
    elif fill >= config.knowledge_low_watermark and target > current:
        target = current
        parts.append(f"{knowledge} above the low watermark: no growth")
    return target, "; ".join(parts)


def _smooth(current: int, target: int, config: PoolScalingConfig) -> int:
    """Rule 5: move a fraction of the way, at least one replica, never past the target."""
    if target > current:
        return math.ceil(current + config.upscaling_factor * (target - current) - 1e-9)
    if target < current:
        return math.floor(current + config.downscaling_factor * (target - current) + 1e-9)
    return current


def decide(
    metrics: PoolMetrics, config: PoolScalingConfig, state: PoolState, now: float
) -> tuple[PoolDecision, PoolState]:
    """Returns how many teacher replicas to run and the state to pass to the next call."""
    current = metrics.running_replicas

    if metrics.manual_override is not None:
        replicas = _clamp(metrics.manual_override, config)
        clamped = "" if replicas == metrics.manual_override else (
            f" (asked {metrics.manual_override}, clamped to [{config.min_replicas}, {config.max_replicas}])"
        )
        return PoolDecision(replicas, f"manual override{clamped}"), PoolState()

    if _clamp(current, config) != current:
        replicas = _clamp(current, config)
        return (
            PoolDecision(replicas, f"{current} running is outside [{config.min_replicas}, {config.max_replicas}]"),
            PoolState(),
        )

    raw, why = _raw_target(metrics, config)
    target = _clamp(_smooth(current, _clamp(raw, config), config), config)
    if target == current:
        return PoolDecision(current, f"hold at {current}: {why}"), PoolState()

    direction: Direction = "up" if target > current else "down"
    if state.direction == direction and state.since is not None:
        since = state.since
    else:
        since = now  # a new proposal: the clock starts again
    delay = config.upscale_delay_s if direction == "up" else config.downscale_delay_s
    waited = now - since
    if waited >= delay:
        return PoolDecision(target, f"scale {direction} {current} -> {target} after {waited:g}s: {why}"), PoolState()
    pending = PoolState(direction=direction, proposed=target, since=since)
    return (
        PoolDecision(current, f"hold at {current}, {direction} to {target} pending {waited:g}/{delay:g}s: {why}"),
        pending,
    )


# --------------------------------------------------------------------------------------------------
# One standing request for every job on the cluster
# --------------------------------------------------------------------------------------------------

Bundle = dict[str, float]


@dataclass(frozen=True)
class PoolDemand:
    """What one teacher pool asks the cluster for, valid until ``expires_at`` (wall-clock seconds):
    a pool that dies stops renewing it, and it drops out of the sum once expired."""

    bundles: tuple[tuple[tuple[str, float], ...], ...]
    expires_at: float

    @classmethod
    def of(cls, bundles: list[Bundle], expires_at: float) -> "PoolDemand":
        return cls(tuple(tuple(sorted(bundle.items())) for bundle in bundles), expires_at)


def standing_request(demands: dict[str, PoolDemand], now: float) -> list[Bundle]:
    """The request that covers every live pool on the cluster.

    Ray's autoscaler keeps only the latest ``request_resources`` call, cluster-wide: a pool that
    sent only its own bundles would cancel every other job's. So whoever changes its demand sends
    the sum of all demands that have not expired, in a fixed order (by pool key)."""
    return [dict(bundle) for key in sorted(demands) if demands[key].expires_at > now
            for bundle in demands[key].bundles if bundle]
