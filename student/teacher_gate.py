"""Is the teacher worth distilling? A pure decision on dev scores measured before any actor starts.

A teacher that cannot beat what a trivial classifier (the majority class) or a briefly trained
student reaches on the same dev rows only teaches the student its mistakes: the job is refused
unless ``teacher.allow_weak``. A teacher weak in some languages only is distilled, and those
languages are named (a warning and the report), since the other languages still gain from it.

The verdict and the numbers behind it go to ``RECORD_FILE`` in the teacher's output folder;
the driver (cluster/driver.py) puts that record in the report's ``teacher_finetune`` section.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from polydistill.student.architecture import ModelSetupError

RECORD_FILE = "teacher_finetune.json"

MAJORITY = "majority_class"
HARD_LABEL_STUDENT = "hard_label_student"
BASELINE_TITLES = {MAJORITY: "majority class", HARD_LABEL_STUDENT: "short hard-label student"}


class WeakTeacherError(ModelSetupError):
    """The teacher does not beat the baselines on the dev split by teacher.min_margin; the message
    names the numbers, the languages and what to change."""


@dataclass(frozen=True)
class DevScores:
    """Accuracy (0-1) on the dev split: over all its rows, and per language."""

    overall: float
    per_language: Mapping[str, float]


@dataclass(frozen=True)
class WeakLanguage:
    """A language where the teacher scores below a baseline (the strongest one there)."""

    language: str
    teacher: float
    baseline: str
    baseline_score: float


@dataclass(frozen=True)
class GateVerdict:
    passed: bool  # the teacher beats the strongest baseline overall by the margin
    teacher: float
    baseline: str  # the strongest baseline overall
    baseline_score: float
    margin_points: float
    weak_languages: tuple[WeakLanguage, ...]

    @property
    def lead_points(self) -> float:
        """Accuracy points the teacher leads the strongest baseline by (negative: it trails)."""
        return 100 * (self.teacher - self.baseline_score)


def judge_teacher(teacher: DevScores, baselines: Mapping[str, DevScores], margin_points: float) -> GateVerdict:
    """The gate: ``teacher`` must score at least ``margin_points`` accuracy points above every baseline
    overall. Per language it must not score below any baseline; the languages where it does are
    listed (worst first) but do not fail the gate on their own."""
    if not baselines:
        raise ValueError("the teacher gate needs at least one baseline to compare with")
    strongest = max(baselines, key=lambda name: baselines[name].overall)
    best = baselines[strongest].overall
    # Compared in points and rounded, so that 0.52 - 0.50 counts as the 2 points it is.
    passed = round(100 * (teacher.overall - best), 6) >= margin_points
    weak = []
    for language, score in teacher.per_language.items():
        there = {name: scores.per_language[language] for name, scores in baselines.items()
                 if language in scores.per_language}
        if not there:
            continue
        rival = max(there, key=there.get)
        if score < there[rival]:
            weak.append(WeakLanguage(language, score, rival, there[rival]))
    weak.sort(key=lambda entry: (entry.teacher - entry.baseline_score, entry.language))
    return GateVerdict(passed, teacher.overall, strongest, best, margin_points, tuple(weak))


def _weak_language_list(verdict: GateVerdict) -> str:
    return ", ".join(f"{entry.language} {entry.teacher:.1%} ({BASELINE_TITLES.get(entry.baseline, entry.baseline)} "
                     f"{entry.baseline_score:.1%})" for entry in verdict.weak_languages)


def refusal_message(verdict: GateVerdict, baselines: Mapping[str, DevScores], *, dev_description: str,
                    teacher_model: str, finetune_epochs: float) -> str:
    """What the user reads when the gate refuses: the numbers, the languages, and what to change."""
    rivals = ", ".join(f"{BASELINE_TITLES.get(name, name)} {scores.overall:.1%}" for name, scores in baselines.items())
    standing = (f"{verdict.lead_points:.1f} points above" if verdict.lead_points >= 0
                else f"{-verdict.lead_points:.1f} points below")
    lines = [
        f"the teacher ({teacher_model}) is not worth distilling: on {dev_description} it scores "
        f"{verdict.teacher:.1%} accuracy, {standing} the {BASELINE_TITLES.get(verdict.baseline, verdict.baseline)} "
        f"({verdict.baseline_score:.1%}), and teacher.min_margin asks for {verdict.margin_points:g} points above "
        f"the strongest baseline (baselines: {rivals})."
    ]
    if verdict.weak_languages:
        lines.append(f"Below a baseline in {len(verdict.weak_languages)} language(s): {_weak_language_list(verdict)}.")
    if finetune_epochs > 0:
        more = (f"fine-tune it longer (teacher.finetune_epochs, the most epochs, is {finetune_epochs:g}; "
                "teacher.finetune_patience and teacher.finetune_lr shape the run)")
    else:
        more = "fine-tune it on this data (teacher.finetune_epochs, e.g. 3)"
    lines.append(f"To go on: {more}, choose another teacher (teacher.model), give it more labelled data, "
                 "or set teacher.allow_weak: true to distil it anyway.")
    return "\n".join(lines)


def weak_languages_warning(verdict: GateVerdict, teacher_name: str) -> str:
    """The warning for a teacher distilled although it trails a baseline in some languages."""
    return (f"{teacher_name} scores below a baseline on the dev split in {len(verdict.weak_languages)} "
            f"language(s): {_weak_language_list(verdict)}; the student learns these languages from a teacher "
            "that knows them less well than the baseline does")


def read_teacher_record(out_dir: Path, teacher_dir: Path) -> dict | None:
    """The record ``RECORD_FILE`` in ``out_dir`` holds, when it is about the teacher in ``teacher_dir``."""
    path = Path(out_dir) / RECORD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if record.get("teacher_path") == str(teacher_dir) else None


def write_teacher_record(out_dir: Path, record: Mapping) -> Path:
    path = Path(out_dir) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path
