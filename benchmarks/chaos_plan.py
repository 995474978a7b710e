"""The chaos run's pure parts: the seeded fault schedule, the accounting, the verdict per fault and
the comparison of a faulted run's student with a fault-free one. No Ray, no Redis."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

# Processes killed by SIGKILL, by the Ray actor class that runs them.
KILLED_ACTOR = {
    "teacher": "TeacherActor",
    "student": "StudentActor",
    "pool": "TeacherPoolActor",
    "feeder": "FeederActor",
    "cache-writer": "CacheWriterActor",
}
# How the report names a control actor Ray restarted (recovery["actor_restarted"]).
RESTARTED_AS = {"pool": "teacher pool", "feeder": "feeder", "cache-writer": "cache writer"}
# Bad messages written per fault: work batches a teacher must refuse (an overflowing shape, token ids
# past the vocabulary, rows longer than the positions), knowledge a student must refuse (an epoch
# outside the plan, token ids past the vocabulary).
POISON_MESSAGES = {"poison-work": 3, "poison-knowledge": 2}
KINDS = ("teacher", "student", "redis-empty", "redis-outage", *list(KILLED_ACTOR)[2:], *POISON_MESSAGES)
WINDOW = (0.15, 0.85)  # faults fire between these shares of the job's batches
OUTAGE_S = (1.0, 4.0)  # how long a redis-outage keeps the server down
Z_95 = 1.96


@dataclass(frozen=True)
class PlannedFault:
    index: int  # 1-based, in firing order
    kind: str
    after_batches: int  # fires once the student has applied this many batches
    down_s: float | None = None  # redis-outage only


def parse_kinds(text: str) -> tuple[str, ...]:
    """'teacher,student' -> ('teacher', 'student'); unknown or repeated names are errors."""
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"unknown fault kind(s) {unknown or [text]}: choose from {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"fault kind listed twice in {text!r}")
    return kinds


def plan_faults(n: int, kinds: tuple[str, ...], seed: int, total_batches: int,
                window: tuple[float, float] = WINDOW, outage_s: tuple[float, float] = OUTAGE_S) -> list[PlannedFault]:
    """``n`` faults: the kinds as even as possible (each kind once per round, the remainder drawn),
    in a shuffled order, each at a random batch of its own slice of the window (so they spread over
    the job and never share a batch)."""
    if n < 1:
        raise ValueError("plan at least one fault")
    first, last = math.ceil(window[0] * total_batches), math.floor(window[1] * total_batches)
    if last - first + 1 < n:
        raise ValueError(f"{n} faults do not fit in batches {first}-{last} of {total_batches}: "
                         "use more data, more epochs, a smaller batch or fewer faults")
    rng = random.Random(seed)
    sequence = list(kinds) * (n // len(kinds)) + rng.sample(kinds, n % len(kinds))
    rng.shuffle(sequence)
    width = (last - first + 1) / n
    faults = []
    for i, kind in enumerate(sequence):
        start, stop = first + math.ceil(i * width), first + math.ceil((i + 1) * width) - 1
        down_s = round(rng.uniform(*outage_s), 1) if kind == "redis-outage" else None
        faults.append(PlannedFault(i + 1, kind, rng.randint(start, stop), down_s))
    return faults


@dataclass
class FaultRecord:
    planned: PlannedFault
    injected_at: float | None = None  # time.time()
    seconds_into_job: float | None = None
    batches_at_injection: int | None = None
    detail: str = ""
    error: str | None = None
    poison_messages: int = 0  # bad messages written (poison kinds)
    skipped: bool = False  # nothing alive to hit (a replica that had finished its work): no fault, no blame


def accounting(report: dict, poison_messages: int = 0) -> dict:
    """The figures that prove nothing was lost or counted twice: every sample distilled once or
    dead-lettered (only where bad messages were written), one optimiser step per applied batch."""
    steps = report["student_steps"]
    dead_samples = sum(report.get("samples_dead_lettered", {}).values())
    per_epoch = report["samples_expected"] // max(report["epochs"], 1)
    figures = {
        "samples_distilled": report["samples_distilled"],
        "samples_dead_lettered": dead_samples,
        "samples_expected": report["samples_expected"],
        "samples_per_epoch": report["samples_per_epoch"],
        "batches_expected": report["batches_expected"],
        "batches_applied": report["batches_applied"],
        "batches_missing": report["batches_missing"],
        "student_steps": steps,
        # One optimiser step per applied batch: any step beyond them applied a batch twice.
        "duplicates_applied": steps - report["batches_applied"],
        "duplicates_dropped": report["duplicates_dropped"],  # copies the ledger refused: as designed
        "dead_letters": report["dead_letters"],
        "poison_messages": poison_messages,
        "recoveries": len(report["recoveries"]),
        "teacher_replicas_served": len(report["teachers"]),
        "resumed_from_step": report.get("resumed_from_step"),
    }
    per_epoch_counts = [int(n) for n in report["samples_per_epoch"].values()]
    figures["exact"] = (
        figures["samples_distilled"] + dead_samples == figures["samples_expected"]
        and figures["batches_applied"] + figures["batches_missing"] == figures["batches_expected"]
        and (figures["batches_missing"] == 0) == (dead_samples == 0)
        and figures["duplicates_applied"] == 0
        # Dead letters only for messages written bad; a Redis emptied later may have taken some with it.
        and figures["dead_letters"] <= poison_messages
        and sum(per_epoch_counts) == figures["samples_distilled"]
        and (dead_samples > 0 or all(n == per_epoch for n in per_epoch_counts))
        and len(report["samples_per_epoch"]) == report["epochs"]
    )
    return figures


def _answers(record: FaultRecord, recovery: dict) -> bool:
    """Whether ``recovery`` is the one this fault calls for (the fault came first)."""
    if recovery["detected_at"] < record.injected_at:
        return False
    kind = record.planned.kind
    if kind == "student":
        return bool(recovery["student_restarted"])
    if kind == "redis-empty":
        return "Redis lost" in recovery["cause"]
    if kind in RESTARTED_AS:
        return (recovery.get("actor_restarted") or "").startswith(RESTARTED_AS[kind])
    return False


def attribute_recoveries(injected: list[FaultRecord], recoveries: list[dict]) -> tuple[dict[int, list[dict]], list[dict]]:
    """Each recovery to the fault it answers: first by kind (a control actor's death is noticed only when
    the driver next looks at its call, often after later faults fired), the earliest unanswered fault of
    that kind; the rest to the last fault injected before it was detected."""
    caused: dict[int, list[dict]] = {record.planned.index: [] for record in injected}
    rest = []
    for recovery in recoveries:
        answered = next((record for record in injected
                         if _answers(record, recovery) and not any(_answers(record, r) for r in caused[record.planned.index])),
                        None)
        if answered is not None:
            caused[answered.planned.index].append(recovery)
        else:
            rest.append(recovery)
    unattributed = []
    for recovery in rest:
        before = [record for record in injected if record.injected_at <= recovery["detected_at"]]
        (caused[before[-1].planned.index] if before else unattributed).append(recovery)
    return caused, unattributed


def _during_a_recovery(record: FaultRecord, recoveries: list[dict]) -> bool:
    """Whether the fault struck while a recovery was under way: that recovery's reset (fresh streams, groups
    and run marker, then a re-feed of what the students lack) comes after it and repairs a Redis emptied
    before it; one emptied after the reset loses the new run marker, which the driver then notices."""
    return any(r["detected_at"] <= record.injected_at <= r["detected_at"] + r["seconds"] for r in recoveries)


def _why_not_survived(record: FaultRecord, mine: list[dict], report: dict, replaced: bool,
                      restarted_by_ray: bool) -> str:
    kind = record.planned.kind
    if kind == "student" and not any(r["student_restarted"] for r in mine):
        return "no student restart followed the kill"
    if (kind == "redis-empty" and not any("Redis lost" in r["cause"] for r in mine)
            and not _during_a_recovery(record, report["recoveries"])):
        return "the driver did not notice the lost data"
    if kind == "teacher" and not replaced:
        return "the pool did not replace every killed replica"
    # A control actor killed after its last call returned (the feed was complete) is restarted by Ray and
    # never needed again: no recovery of the driver's, but Ray's restart count shows it came back.
    if (kind in RESTARTED_AS and not restarted_by_ray
            and not any((r.get("actor_restarted") or "").startswith(RESTARTED_AS[kind]) for r in mine)):
        return f"no {RESTARTED_AS[kind]} restart followed the kill"
    # Bad messages need not be read at all: written after the last planned batch, or dropped when a
    # recovery re-feeds the work stream, they go with the job's keys. Read, they must be dead-lettered,
    # which the accounting checks (dead letters only for bad messages, every sample once).
    return ""


def judge(records: list[FaultRecord], report: dict | None, job_error: str | None, replicas: int,
          ray_restarts: dict[str, int] | None = None) -> dict:
    """Per fault: survived or not, and why; the recoveries each fault caused; the verdict. ``ray_restarts``:
    how often Ray restarted each actor class (``KILLED_ACTOR``'s names) during the job."""
    ray_restarts = ray_restarts or {}
    poison = sum(r.poison_messages for r in records)
    figures = accounting(report, poison) if report is not None else None
    exact = bool(figures and figures["exact"]) and job_error is None
    recoveries = sorted(report["recoveries"] if report else [], key=lambda r: r["detected_at"])
    injected = [r for r in records if r.injected_at is not None]
    caused, unattributed = attribute_recoveries(injected, recoveries)
    for record in records:
        caused.setdefault(record.planned.index, [])
    teacher_kills = sum(1 for r in injected if r.planned.kind == "teacher")
    # A restarted pool starts every replica anew (the old ones' figures go with it): that replaces a killed one too.
    pool_restarted = bool(report and (report.get("teacher_pool") or {}).get("restarted"))
    replaced = report is not None and (pool_restarted or len(report["teachers"]) >= replicas + teacher_kills)

    faults = []
    for record in records:
        if record.skipped:
            why = ""
        elif record.injected_at is None:
            why = record.error or "not injected (the job ended first)"
        elif not exact:
            why = job_error or "the job's accounting is not exact"
        else:
            kind = record.planned.kind
            kills = sum(1 for r in injected if r.planned.kind == kind)
            restarted = kind in RESTARTED_AS and ray_restarts.get(KILLED_ACTOR[kind], 0) >= kills
            why = _why_not_survived(record, caused[record.planned.index], report, replaced, restarted)
        faults.append({**asdict(record.planned), "seconds_into_job": record.seconds_into_job,
                       "batches_at_injection": record.batches_at_injection, "detail": record.detail,
                       "poison_messages": record.poison_messages, "skipped": record.skipped,
                       "survived": not why and not record.skipped, "why_not": why or None,
                       "recoveries": caused[record.planned.index]})

    by_kind = tally_by_kind(faults)
    survived = sum(f["survived"] for f in faults)
    skipped = sum(f["skipped"] for f in faults)
    ok = survived + skipped == len(faults) and exact
    kinds_text = ", ".join(f"{kind} {t['survived']}/{t['planned'] - t['skipped']}" for kind, t in by_kind.items())
    if ok:
        verdict = (f"PASS: {survived}/{len(faults) - skipped} faults survived ({kinds_text}), nothing lost or applied twice"
                   + (f"; {skipped} skipped (nothing alive to hit)" if skipped else ""))
    else:
        problem = job_error or ("accounting not exact" if not exact else "a fault was not survived")
        verdict = f"FAIL: {survived}/{len(faults) - skipped} faults survived ({kinds_text}); {problem}"
    return {"ok": ok, "verdict": verdict, "faults": faults, "survived_by_kind": by_kind,
            "accounting": figures, "unattributed_recoveries": unattributed}


def tally_by_kind(faults: list[dict]) -> dict[str, dict[str, int]]:
    """Per fault kind: how many were planned, injected, survived and skipped (``judge``'s fault entries)."""
    by_kind: dict[str, dict[str, int]] = {}
    for fault in faults:
        tally = by_kind.setdefault(fault["kind"], {"planned": 0, "injected": 0, "survived": 0, "skipped": 0})
        tally["planned"] += 1
        tally["injected"] += fault["seconds_into_job"] is not None
        tally["survived"] += fault["survived"]
        tally["skipped"] += fault["skipped"]
    return by_kind


def same_student(accuracy: float, reference: float, rows: int) -> dict:
    """Is a faulted run's student as good as the fault-free run's? Two runs differ by chance (the order
    in which batches arrive, and any batch dead-lettered): within 1.96 standard errors of the
    difference of two accuracies measured on the same ``rows`` held-out rows counts as equal."""
    p = (accuracy + reference) / 2
    tolerance = Z_95 * math.sqrt(2 * p * (1 - p) / rows) if rows else 0.0
    difference = accuracy - reference
    return {"accuracy": accuracy, "reference": reference, "difference": difference,
            "tolerance": tolerance, "rows": rows, "equal": abs(difference) <= tolerance}
