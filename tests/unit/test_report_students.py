"""Extra students in the report: each compared with its own ablation and with the teacher, shown in the
students table and its own language table, and drawn on the accuracy-vs-size plot."""

import numpy as np

from polydistill.student.evaluate import add_confidence_intervals, side_by_side
from polydistill.student.metrics import per_language_metrics
from polydistill.student.report import format_students_table, render_markdown, write_report
from polydistill.student.report_students import student_summaries, student_view

LANGUAGES = ["aa"] * 4 + ["bb"] * 4
LABELS = np.array([0, 1, 0, 1, 0, 1, 0, 1])


def _result(predicted):
    predicted = np.asarray(predicted)
    return {"overall": {"accuracy": float((predicted == LABELS).mean())},
            "per_language": per_language_metrics(LABELS, predicted, LANGUAGES, 2),
            "row_correct": (predicted == LABELS).astype(np.int64)}


def _report():
    results = {"teacher": _result(LABELS),
               "student": _result([0, 1, 0, 1, 0, 1, 1, 0]),   # aa 4/4, bb 2/4
               "small": _result([0, 1, 0, 0, 0, 1, 0, 1]),     # aa 3/4, bb 4/4
               "ablation": _result([1, 0, 1, 0, 0, 1, 1, 0]),  # aa 0/4, bb 2/4
               "ablation:small": _result([0, 1, 1, 0, 1, 0, 0, 1])}  # aa 2/4, bb 2/4
    report = side_by_side(results)
    add_confidence_intervals(report, results, LANGUAGES)
    report["efficiency"] = {
        "teacher": {"params": 1_000_000, "latency_ms_batch32": 30.0},
        "student": {"params": 250_000, "latency_ms_batch32": 12.0},
        "small": {"params": 90_000, "latency_ms_batch32": 6.0, "speedup_batch32": 5.0, "param_ratio": 0.09},
        "speedup_batch32": 2.5,
    }
    # The main student over a trimmed vocabulary of its own, the small one over a smaller one.
    report["student_init"] = {"trimmed_vocabulary": True, "vocabulary_before": 250_037, "vocabulary_after": 57_092}
    report["extra_students"] = {"small": {"student_init": {"trimmed_vocabulary": True, "vocabulary_before": 250_037,
                                                           "vocabulary_after": 16_918}}}
    return report


def test_an_extra_student_is_compared_with_its_own_ablation_and_the_teacher():
    intervals = _report()["per_language"]["aa"]["intervals"]
    assert intervals["small_minus_ablation"]["estimate"] == 0.25   # 3/4 against 2/4
    assert intervals["small_retention"]["estimate"] == 0.75
    assert intervals["student_minus_ablation"]["estimate"] == 1.0  # the main student's keys are unchanged
    average = _report()["overall"]["intervals"]["language_average"]
    assert average["small_minus_ablation"]["estimate"] == 0.375    # (0.25 + 0.5) / 2


def test_the_view_puts_the_extra_student_in_the_main_students_place():
    view = student_view(_report(), "small")
    bb = view["per_language"]["bb"]
    assert bb["student"]["accuracy"] == 1.0 and bb["ablation"]["accuracy"] == 0.5
    assert bb["retention"] == 1.0
    assert bb["intervals"]["student_minus_ablation"]["estimate"] == 0.5
    assert view["overall"]["intervals"]["language_average"]["student_minus_ablation"]["estimate"] == 0.375


def test_summaries_give_each_model_its_size_speed_and_weakest_language():
    summaries = {summary["model"]: summary for summary in student_summaries(_report())}
    assert list(summaries) == ["teacher", "student", "ablation", "small", "ablation:small"]
    assert summaries["small"]["speedup_batch32"] == 5.0 and summaries["student"]["speedup_batch32"] == 2.5
    assert summaries["ablation:small"]["params"] == 90_000  # its student's architecture
    assert summaries["small"]["weakest_language"] == ("aa", 0.75)
    assert summaries["student"]["weakest_language"] == ("bb", 0.5)
    assert [summaries[name]["vocabulary"] for name in summaries] == [250_037, 57_092, 57_092, 16_918, 16_918]


def test_the_students_table_names_each_students_vocabulary():
    report = _report()
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in format_students_table(report).splitlines()[2:]}
    assert rows["teacher"][2] == "250,037" and rows["student"][2] == "57,092"
    assert rows["small"][2] == rows["ablation:small"][2] == "16,918"
    report["extra_students"]["small"]["student_init"] = {"trimmed_vocabulary": False}
    assert "| the teacher's " in format_students_table(report)


def test_a_factorised_embedding_shows_its_width_beside_the_vocabulary():
    report = _report()
    report["extra_students"]["small"]["student_init"]["embedding_size"] = 128
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in format_students_table(report).splitlines()[2:]}
    assert rows["small"][2] == rows["ablation:small"][2] == "16,918 × 128"
    assert rows["student"][2] == "57,092"


def test_the_students_section_and_plot_appear_only_with_extra_students(tmp_path):
    report = _report()
    table = format_students_table(report)
    assert "| small " in table and "9.0%" in table and "5.00×" in table
    markdown = render_markdown(report)
    assert "## Students" in markdown and "### Student small by language" in markdown
    written = write_report(report, tmp_path)
    assert (tmp_path / "accuracy_vs_size.png") in written
    assert (tmp_path / "accuracy_vs_size.png").read_bytes()[:4] == b"\x89PNG"

    for name in ("small", "ablation:small"):
        for entry in (*report["per_language"].values(), report["overall"], report["overall"]["language_average"]):
            entry.pop(name, None)
    assert format_students_table(report) == ""
    assert "accuracy_vs_size.png" not in {path.name for path in write_report(report, tmp_path / "one")}
