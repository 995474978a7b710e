"""Pure helpers of the benchmark harness: medians, ratios, epoch windows, the result and its table.

Nothing here times, starts or reads anything, so tests/unit/test_benchmarks.py checks it all
without a clock. Every headline figure is a ratio of two medians taken in the same run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The top-level keys every results file carries (issue 7, "What must work", item 1).
HEADLINE_KEYS = (
    "student_pace_retention",
    "student_pace_retention_cached",
    "inline_over_pipeline_time",
    "transport_share_of_step",
    "topk32_wire_ratio",
    "topk128_bytes_per_token",
    "topk128_kl_v1_vs_v2",
    "codec_over_memcpy_1mb",
    "fanout",
    "cache_speedup",
)
REQUIRED_KEYS = (*HEADLINE_KEYS, "machine")

# Goals from the issue; None where the issue states none (the figure is reported, not judged).
GOALS: dict[str, tuple[str, float] | None] = {
    "student_pace_retention": (">=", 0.95),
    "student_pace_retention_cached": (">=", 0.97),
    "inline_over_pipeline_time": None,
    "transport_share_of_step": ("<=", 0.01),
    "topk32_wire_ratio": (">=", 1000.0),
    "topk128_bytes_per_token": ("<=", 320.0),
    "topk128_kl_v1_vs_v2": ("<=", 1e-3),
    "codec_over_memcpy_1mb": (">=", 0.5),
    "fanout": None,
    "cache_speedup": None,
}

_MEANINGS = {
    "student_pace_retention": "student samples/s distilling from remote teachers ÷ same student, no teacher",
    "student_pace_retention_cached": "as student_pace_retention, the knowledge stream filled before the student "
                                     "starts (what the knowledge cache or teachers that keep up give it)",
    "inline_over_pipeline_time": "wall s/epoch with the teacher inside the student loop ÷ pipeline wall s/epoch",
    "transport_share_of_step": "the loop's fetch (waiting included) + decode + acknowledgement per batch ÷ the step, "
                               "stream filled ahead, messages read ahead (transport.prefetch)",
    "topk32_wire_ratio": "bytes/token of full fp16 logits (250k vocab) ÷ top-32 soft labels in wire v1",
    "topk128_bytes_per_token": "top-128 of a 250k vocabulary, wire v2 with distill.value_bits 8, peaked logits",
    "topk128_kl_v1_vs_v2": "KL(k+1 buckets from v1 ‖ from v2, 8 bits) nats per token, mean, worst logit shape",
    "codec_over_memcpy_1mb": "wire v2 decode GB/s of a 1 MB message of fp16 hidden states ÷ numpy copy GB/s",
    "fanout": "K students from one teacher pass ÷ K separate runs",
    "cache_speedup": "epoch from the knowledge cache ÷ epoch with teacher recomputation",
}


def median(values: Iterable[float]) -> float:
    """The median of a non-empty sequence (mean of the middle two for an even count)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("median() of no values: the measurement produced no repeats")
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator ÷ denominator, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None:
        return None
    if not math.isfinite(numerator) or not math.isfinite(denominator) or denominator <= 0:
        return None
    return numerator / denominator


def ratio_of_medians(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    if not numerators or not denominators:
        return None
    return ratio(median(numerators), median(denominators))


def gbps(n_bytes: float, seconds: float) -> float | None:
    """Throughput in GB/s (10^9 bytes per second)."""
    return None if seconds <= 0 else n_bytes / seconds / 1e9


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and count, for the details section of a results file."""
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


@dataclass(frozen=True)
class Mark:
    """What the student had done at one moment: the training loop's counters plus a clock."""

    t: float
    batches: int
    samples: int
    wait_seconds: float
    compute_seconds: float
    cpu_seconds: float = 0.0  # CPU time of the loop's thread (blocking reads cost none)


@dataclass(frozen=True)
class Window:
    """One epoch's worth of applied batches (``batches_per_epoch`` in a row)."""

    seconds: float
    samples: int
    wait_seconds: float
    compute_seconds: float
    cpu_seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan

    @property
    def wait_share(self) -> float:
        return self.wait_seconds / self.seconds if self.seconds > 0 else math.nan


def epoch_windows(start: Mark, marks: Sequence[Mark], batches_per_epoch: int) -> list[Window]:
    """Cuts a student's timeline into windows of ``batches_per_epoch`` applied batches.

    ``start`` is the loop's state before its first batch; ``marks`` one entry per applied batch,
    in order. Batches of two epochs can interleave slightly (the feeder runs ahead), so a window
    is "an epoch's worth of consecutive steps" and its sample count is measured, not assumed.
    A trailing partial window is dropped.
    """
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be at least 1, got {batches_per_epoch}")
    by_count = {mark.batches: mark for mark in marks}
    windows = []
    previous = start
    boundary = start.batches + batches_per_epoch
    while boundary in by_count:
        current = by_count[boundary]
        windows.append(
            Window(
                seconds=current.t - previous.t,
                samples=current.samples - previous.samples,
                wait_seconds=current.wait_seconds - previous.wait_seconds,
                compute_seconds=current.compute_seconds - previous.compute_seconds,
                cpu_seconds=current.cpu_seconds - previous.cpu_seconds,
            )
        )
        previous = current
        boundary += batches_per_epoch
    return windows


# Per-run figures that are summarised over the repeated runs of one pipeline setup.
SETUP_FIGURES = ("retention", "inline_over_pipeline_time", "wait_share", "step_over_alone", "step_cpu_over_alone",
                 "cpu_retention", "teacher_forward_over_inline", "transport_share_of_step")


def setup_name(run_name: str) -> str:
    """'colocated_r1#2' -> 'colocated_r1': the setup a repeated run belongs to."""
    return run_name.split("#", 1)[0]


def summarize_setups(per_run: dict[str, dict]) -> dict[str, dict]:
    """For each setup, the median over its repeated runs of each run's figure (itself a median)."""
    grouped: dict[str, list[dict]] = {}
    for name, run in per_run.items():
        grouped.setdefault(setup_name(name), []).append(run)
    summary = {}
    for setup, runs in grouped.items():
        figures: dict[str, Any] = {"runs": len(runs)}
        for key in SETUP_FIGURES:
            values = [run[key]["median"] if isinstance(run[key], dict) else run[key] for run in runs]
            values = [value for value in values if value is not None]
            figures[key] = median(values) if values else None
            figures[f"{key}_per_run"] = values
        summary[setup] = figures
    return summary


# --------------------------------------------------------------------------- the result


def build_result(
    headline: Mapping[str, float | None],
    null_reasons: Mapping[str, str],
    machine: Mapping[str, Any],
    details: Mapping[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """The results document; every headline key present, and a reason for each null figure."""
    missing = [key for key in HEADLINE_KEYS if key not in headline]
    if missing:
        raise ValueError(f"headline figures missing: {missing}")
    unexplained = [key for key in HEADLINE_KEYS if headline[key] is None and not null_reasons.get(key)]
    if unexplained:
        raise ValueError(f"figures {unexplained} are null without a reason in null_reasons")
    result: dict[str, Any] = {key: _rounded(headline[key]) for key in HEADLINE_KEYS}
    result["machine"] = dict(machine)
    result["null_reasons"] = {key: null_reasons[key] for key in HEADLINE_KEYS if headline[key] is None}
    result["goals"] = {key: f"{goal[0]} {goal[1]:g}" for key, goal in GOALS.items() if goal is not None}
    result.update(extra)
    result["details"] = dict(details)
    return result


def missing_keys(result: Mapping[str, Any]) -> list[str]:
    return [key for key in REQUIRED_KEYS if key not in result]


def meets_goal(key: str, value: float | None) -> bool | None:
    goal = GOALS.get(key)
    if goal is None or value is None:
        return None
    op, bound = goal
    return value >= bound if op == ">=" else value <= bound


def _rounded(value: float | None, digits: int = 4) -> float | None:
    if value is None:
        return None
    if value == 0 or not math.isfinite(value):
        return value
    magnitude = int(math.floor(math.log10(abs(value))))
    return round(value, max(0, digits - 1 - magnitude))


def format_value(value: float | None) -> str:
    if value is None:
        return "null"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 0.1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def render_table(result: Mapping[str, Any]) -> str:
    """The headline figures as a Markdown table: value, goal, whether it is met, what it is."""
    lines = ["| figure | value | goal | met | measured as |", "|---|---|---|---|---|"]
    reasons = result.get("null_reasons", {})
    for key in HEADLINE_KEYS:
        value = result.get(key)
        goal = GOALS.get(key)
        goal_text = f"{goal[0]} {goal[1]:g}" if goal else "—"
        met = meets_goal(key, value)
        met_text = "—" if met is None else ("yes" if met else "no")
        meaning = _MEANINGS[key]
        if value is None and key in reasons:
            meaning = f"null: {reasons[key]}"
        lines.append(f"| `{key}` | {format_value(value)} | {goal_text} | {met_text} | {_cell(meaning)} |")
    for row in result.get("secondary", []):
        lines.append(f"| {row['name']} | {format_value(row['value'])} | — | — | {_cell(row['note'])} |")
    return "\n".join(lines)


def secondary_row(name: str, value: float | None, note: str) -> dict[str, Any]:
    """A supporting figure shown under the headline rows (not judged against a goal)."""
    return {"name": name, "value": _rounded(value), "note": note}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
