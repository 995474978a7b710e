"""Several students of one teacher side by side (``extra_students``): each one's size, speed and
accuracy against the teacher and against its own hard-label ablation, and the accuracy-vs-size plot.

Pure reads of report.json's dict; report.py renders them. A student X's numbers sit in the report
under its name, its ablation under "ablation:X" and its intervals under "X_minus_ablation" and
"X_retention" (student/metrics.py ``comparison_names``); the main student keeps the plain names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from polydistill.cluster.config import MAIN_STUDENT
from polydistill.student.metrics import ablation_name, comparison_names, is_distilled_student, retention


def distilled_students(report: Mapping) -> list[str]:
    """The distilled students the evaluation scored, the main one first."""
    averages = (report.get("overall") or {}).get("language_average") or {}
    return sorted(filter(is_distilled_student, averages), key=lambda name: (name != MAIN_STUDENT, name))


def has_extra_students(report: Mapping) -> bool:
    """The evaluation scored more than the main student: the report gets its Students section and plot."""
    return len(distilled_students(report)) > 1


def student_view(report: Mapping, name: str) -> dict:
    """The report's per-language and overall sections with student ``name`` in the main student's place
    (and its ablation in the ablation's), so the main student's language table can show it."""
    minus, kept = comparison_names(name)
    ablation = ablation_name(name)

    def recast(entry: Mapping, intervals: Mapping) -> dict:
        row = {"teacher": entry.get("teacher", {}), "student": entry.get(name, {})}
        if ablation in entry:
            row["ablation"] = entry[ablation]
        teacher_accuracy, student_accuracy = row["teacher"].get("accuracy"), row["student"].get("accuracy")
        row["retention"] = (None if teacher_accuracy is None or student_accuracy is None
                            else retention(student_accuracy, teacher_accuracy))
        row["intervals"] = {new: intervals[old] for old, new in ((minus, "student_minus_ablation"), (kept, "retention"))
                            if old in intervals}
        return row

    per_language = {language: recast(entry, entry.get("intervals") or {})
                    for language, entry in (report.get("per_language") or {}).items()}
    overall = dict(report.get("overall") or {})
    average = (overall.get("intervals") or {}).get("language_average") or {}
    view_overall = recast(overall, average)
    view_overall["intervals"] = {"language_average": view_overall["intervals"]}
    return {"per_language": per_language, "overall": view_overall, "metric": report.get("metric")}


def student_summaries(report: Mapping) -> list[dict]:
    """One summary per model that has a size: the teacher, each distilled student and each ablation, with
    parameters, batch-32 speed-up over the teacher, language-average score, and for the distilled students
    retention and the lead over their ablation (each with its interval) and their weakest language's retention."""
    overall = report.get("overall") or {}
    averages = overall.get("language_average") or {}
    intervals = (overall.get("intervals") or {}).get("language_average") or {}
    efficiency = report.get("efficiency") or {}
    teacher_costs = efficiency.get("teacher") or {}
    summaries = []
    if "teacher" in averages:
        summaries.append({"model": "teacher", "role": "teacher", "params": teacher_costs.get("params"),
                          "speedup_batch32": 1.0 if teacher_costs else None, "score": averages["teacher"],
                          "vocabulary": (report.get("student_init") or {}).get("vocabulary_before")})
    for name in distilled_students(report):
        costs = efficiency.get(name) or {}
        minus, kept = comparison_names(name)
        speedup = efficiency.get("speedup_batch32") if name == MAIN_STUDENT else costs.get("speedup_batch32")
        init = _student_init(report, name)
        vocabulary = init.get("vocabulary_after") if init.get("trimmed_vocabulary") else None
        embedding_size = init.get("embedding_size")  # a factorised embedding (student/factorise.py)
        summaries.append({
            "model": name, "role": "student", "params": costs.get("params"), "speedup_batch32": speedup,
            "score": averages[name], "retention": intervals.get(kept), "minus_ablation": intervals.get(minus),
            "weakest_language": _weakest_language(report, name), "vocabulary": vocabulary,
            "embedding_size": embedding_size,
        })
        ablation = ablation_name(name)
        if ablation in averages:  # the same architecture and vocabulary as its student: the same size and speed
            summaries.append({"model": ablation, "role": "ablation", "params": costs.get("params"),
                              "speedup_batch32": speedup, "score": averages[ablation], "vocabulary": vocabulary,
                              "embedding_size": embedding_size})
    return summaries


def _student_init(report: Mapping, name: str) -> Mapping:
    """How student ``name`` was prepared (cluster/prepare.py ``prepare_student``): its trimmed vocabulary's
    size when it was trimmed, the width of its factorised embedding when it has one."""
    section = report if name == MAIN_STUDENT else (report.get("extra_students") or {}).get(name) or {}
    return section.get("student_init") or {}


def _weakest_language(report: Mapping, name: str) -> tuple[str, float] | None:
    kept = []
    for language, entry in (report.get("per_language") or {}).items():
        teacher, student = entry.get("teacher", {}).get("accuracy"), entry.get(name, {}).get("accuracy")
        share = None if teacher is None or student is None else retention(student, teacher)
        if share is not None:
            kept.append((share, language))
    if not kept:
        return None
    share, language = min(kept)
    return language, share


def plot_accuracy_vs_size(report: Mapping, path: Path) -> Path:
    """Language-average score against parameters (log scale): the teacher, every distilled student, and each
    student's hard-label ablation, joined to its student by a line (the gain the teacher gave)."""
    summaries = [summary for summary in student_summaries(report) if summary["params"]]
    figure = Figure(figsize=(6.5, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    styles = {"teacher": ("*", "tab:blue", 14), "student": ("o", "tab:orange", 8), "ablation": ("s", "tab:gray", 7)}
    by_model = {summary["model"]: summary for summary in summaries}
    for summary in summaries:
        marker, colour, size = styles[summary["role"]]
        millions, score = summary["params"] / 1e6, 100 * summary["score"]
        axes.plot([millions], [score], marker=marker, color=colour, markersize=size, linestyle="none")
        axes.annotate(summary["model"], (millions, score), textcoords="offset points", xytext=(6, 4), fontsize=8)
        partner = by_model.get(ablation_name(summary["model"])) if summary["role"] == "student" else None
        if partner is not None:
            axes.plot([millions, millions], [score, 100 * partner["score"]], color="tab:gray", linewidth=1,
                      linestyle=":")
    for role, (marker, colour, size) in styles.items():
        axes.plot([], [], marker=marker, color=colour, markersize=size, linestyle="none",
                  label={"teacher": "teacher", "student": "distilled student", "ablation": "hard labels only"}[role])
    axes.set_xscale("log")
    axes.set_xlabel("parameters (millions, log scale)")
    axes.set_ylabel(f"{report.get('metric') or 'accuracy'}, mean over languages (%)")
    axes.set_title("Accuracy against size")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path, format="png")
    return path
