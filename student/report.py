"""The human-facing report: Markdown tables and PNG plots rendered from report.json's dict.

Every section of the report dict is optional; a section that is absent is left out of the
Markdown and its plot is not written, so a half-finished run still gets a readable report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

# The object-oriented Figure API with the Agg canvas never touches pyplot's global state or
# the process-wide backend, so rendering is safe on headless workers and inside a driver
# that may already have imported pyplot for something else.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from polydistill.student.metrics import retention as retention_ratio
from polydistill.student.report_students import (
    distilled_students,
    has_extra_students,
    plot_accuracy_vs_size,
    student_summaries,
    student_view,
)

MISSING = "—"
BYTES_PER_MB = 1_000_000
# Keys of a loss_history entry that are coordinates, not loss values.
HISTORY_AXES = ("step", "epoch")
# Names the combined loss may be logged under (combine_losses logs it as "total"); when an
# entry carries both they are the same number, so only the first is drawn.
TOTAL_KEYS = ("loss", "total")


# --------------------------------------------------------------------------- formatting


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


def _integer(value: int | None) -> str:
    return MISSING if value is None else f"{int(value):,}"


def _decimal(value: float | None, places: int) -> str:
    return MISSING if value is None else f"{value:.{places}f}"


def _megabytes(value: float | None) -> str:
    return _decimal(value, 1)


def _milliseconds(value: float | None) -> str:
    return _decimal(value, 2)


def _times(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}×"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A pipe table with padded columns, so it reads well both rendered and in a terminal."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


# --------------------------------------------------------------------------- language table


def _metric(entry: Mapping, role: str, name: str) -> float | None:
    return entry.get(role, {}).get(name)


def _retention_of(entry: Mapping) -> float | None:
    """The stored retention, else student accuracy / teacher accuracy when both exist."""
    if entry.get("retention") is not None:
        return entry["retention"]
    teacher, student = _metric(entry, "teacher", "accuracy"), _metric(entry, "student", "accuracy")
    if teacher is None or student is None:
        return None
    return retention_ratio(student, teacher)


def _language_rows(report: Mapping) -> list[tuple[str, Mapping]]:
    rows = list(sorted(report.get("per_language", {}).items()))
    if "overall" in report:
        rows.append(("overall", report["overall"]))
    return rows


def _translation_table(rows: list[tuple[str, Mapping]]) -> str:
    """Translation students: chrF and BLEU (sacrebleu's 0-100 scale) of teacher and student per language."""
    header = ["language", "teacher chrF", "student chrF", "retention", "teacher BLEU", "student BLEU"]
    cells = [[language, _decimal(_metric(entry, "teacher", "chrf"), 1), _decimal(_metric(entry, "student", "chrf"), 1),
              _percent(entry.get("retention")), _decimal(_metric(entry, "teacher", "bleu"), 1),
              _decimal(_metric(entry, "student", "bleu"), 1)] for language, entry in rows]
    return _markdown_table(header, cells)


def _has_ablation(report: Mapping) -> bool:
    return any("ablation" in entry for _, entry in _language_rows(report))


def _intervals_of(language: str, entry: Mapping) -> Mapping:
    """A row's confidence intervals; the overall row's are those of the average over languages."""
    intervals = entry.get("intervals") or {}
    if language == "overall":
        return intervals.get("language_average") or {}
    return intervals


def _points_interval(interval: Mapping | None) -> str:
    """A difference of accuracies in points, with its interval: "+2.5 [-0.5, +5.4]"."""
    if not interval or interval.get("low") is None:
        return MISSING
    return (f"{100 * interval['estimate']:+.1f} "
            f"[{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}]")


def _percent_interval(interval: Mapping | None) -> str:
    if not interval or interval.get("low") is None:
        return MISSING
    return f"[{_percent(interval['low'])}, {_percent(interval['high'])}]"


def format_language_table(report: Mapping) -> str:
    """Per-language accuracy/F1 table (teacher vs student) with an overall row last.

    Accuracy, F1 and retention (student accuracy ÷ teacher accuracy) print as percentages.
    A hard-label-only ablation column appears when any row has one. With confidence intervals
    (student/metrics.py ``bootstrap_intervals``), the retention's 95 % interval and the student's lead
    over the ablation in accuracy points with its interval follow; the overall row's intervals are
    those of the average over languages. Returns "" when the report has neither per-language nor
    overall metrics.
    """
    rows = _language_rows(report)
    if not rows:
        return ""
    ablation = _has_ablation(report)
    # Sentence-embedding jobs score bitext retrieval (both directions), language models next-token
    # accuracy and perplexity, instead of classes.
    metric = report.get("metric")
    if metric == "chrF":
        return _translation_table(rows)
    retrieval = metric == "bitext retrieval accuracy"
    language_model = metric in ("next-token accuracy", "masked-token accuracy")
    if retrieval:
        header = ["language", "teacher retrieval", "student retrieval", "retention", "student eng→xx",
                  "student xx→eng"]
        columns = (("student", "eng_to_xx"), ("student", "xx_to_eng"))
    elif language_model:
        kind = metric.split()[0]
        header = ["language", f"teacher {kind} acc", f"student {kind} acc", "retention", "teacher perplexity",
                  "student perplexity"]
        columns = (("teacher", "perplexity"), ("student", "perplexity"))
    else:
        header = ["language", "teacher acc", "student acc", "retention", "teacher F1", "student F1"]
        columns = (("teacher", "macro_f1"), ("student", "macro_f1"))
    if ablation:
        header.append("hard-label acc")
    intervals = any(_intervals_of(language, entry) for language, entry in rows)
    if intervals:
        header.append("retention 95% CI")
        if ablation:
            header.append("student − hard-label, points [95% CI]")
    cells = []
    for language, entry in rows:
        row = [
            language,
            _percent(_metric(entry, "teacher", "accuracy")),
            _percent(_metric(entry, "student", "accuracy")),
            _percent(_retention_of(entry)),
            *(_decimal(_metric(entry, role, name), 1) if name == "perplexity" else _percent(_metric(entry, role, name))
              for role, name in columns),
        ]
        if ablation:
            row.append(_percent(_metric(entry, "ablation", "accuracy")))
        if intervals:
            found = _intervals_of(language, entry)
            row.append(_percent_interval(found.get("retention")))
            if ablation:
                row.append(_points_interval(found.get("student_minus_ablation")))
        cells.append(row)
    return _markdown_table(header, cells)


# --------------------------------------------------------------------------- efficiency table


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def format_stages_table(report: Mapping) -> str:
    """One row per compression stage (report["stages"]); empty when the job compressed nothing."""
    stages = report.get("stages") or []
    if not stages:
        return ""
    header = ["Stage", "Kind", "Params", "Disk (MB)", "Latency b1 (ms)", "Latency b32 (ms)", "Accuracy", "Retention"]
    rows = []
    for stage in stages:
        rows.append([str(stage.get("name")), str(stage.get("kind", "")), _integer(stage.get("params")),
                     _megabytes(None if stage.get("disk_bytes") is None else stage["disk_bytes"] / BYTES_PER_MB),
                     _milliseconds(stage.get("latency_ms_batch1")), _milliseconds(stage.get("latency_ms_batch32")),
                     _percent(stage.get("accuracy")), _percent(stage.get("retention"))])
        shipped = (stage.get("details") or {}).get("onnx")
        if shipped:  # the same stage as the ONNX graph it ships as, measured in onnxruntime
            rows.append([f"{stage.get('name')} → {shipped['file']}", "onnxruntime", _integer(stage.get("params")),
                         _megabytes(shipped["disk_bytes"] / BYTES_PER_MB), _milliseconds(shipped["latency_ms_batch1"]),
                         _milliseconds(shipped["latency_ms_batch32"]), _percent(shipped["accuracy"]),
                         _percent(shipped["retention"])])
    return _markdown_table(header, rows)


def format_efficiency_table(report: Mapping) -> str:
    """Teacher vs student size and latency; the last column is teacher ÷ student.

    For sizes that ratio is the compression factor, for latencies the speed-up.
    """
    efficiency = report.get("efficiency", {})
    teacher, student = efficiency.get("teacher", {}), efficiency.get("student", {})
    if not teacher and not student:
        return ""

    def megabytes(side: Mapping) -> float | None:
        size = side.get("disk_bytes")
        return None if size is None else size / BYTES_PER_MB

    measures = [
        ("parameters", lambda side: side.get("params"), _integer),
        ("non-embedding parameters", lambda side: side.get("non_embedding_params"), _integer),
        ("disk (MB)", megabytes, _megabytes),
        ("latency, batch 1 (ms)", lambda side: side.get("latency_ms_batch1"), _milliseconds),
        ("latency, batch 32 (ms)", lambda side: side.get("latency_ms_batch32"), _milliseconds),
    ]
    rows = []
    for label, read, render in measures:
        teacher_value, student_value = read(teacher), read(student)
        ratio = _ratio(teacher_value, student_value)
        rows.append([label, render(teacher_value), render(student_value), _times(ratio)])
    return _markdown_table(["", "teacher", "student", "teacher ÷ student"], rows)


def format_students_table(report: Mapping) -> str:
    """Every student of the teacher beside the teacher and the ablations: size, speed, mean score over
    languages, retention and lead over the student's own ablation with their intervals. Empty unless the
    job trained extra students."""
    if not has_extra_students(report):
        return ""
    header = ["model", "parameters", "share of teacher", "vocabulary", "speed-up, batch 32", "mean over languages",
              "retention [95% CI]", "− its ablation, points [95% CI]", "weakest language (retention)"]
    summaries = student_summaries(report)
    teacher_params = next((s["params"] for s in summaries if s["role"] == "teacher"), None)
    rows = []
    for summary in summaries:
        kept, weakest = summary.get("retention"), summary.get("weakest_language")
        rows.append([
            summary["model"], _integer(summary["params"]), _percent(_ratio(summary["params"], teacher_params)),
            _vocabulary_cell(summary),
            _times(summary["speedup_batch32"]), _percent(summary["score"]),
            MISSING if not kept else f"{_percent(kept['estimate'])} {_percent_interval(kept)}",
            _points_interval(summary.get("minus_ablation")),
            MISSING if not weakest else f"{weakest[0]} {_percent(weakest[1])}",
        ])
    return _markdown_table(header, rows)


def _vocabulary_cell(summary: Mapping) -> str:
    """A model's pieces, "× E" after them for a factorised embedding E wide."""
    if summary["role"] == "teacher" or summary.get("vocabulary"):
        pieces = _integer(summary.get("vocabulary"))
    else:
        pieces = "the teacher's"
    return f"{pieces} × {summary['embedding_size']}" if summary.get("embedding_size") else pieces


def format_sequence_length_table(report: Mapping) -> str:
    """Mean tokens per held-out row in each language, teacher and student, and their ratio.

    Each model reads the text through its own tokenizer: a trimmed or smaller vocabulary cuts some
    scripts into more pieces, which costs the student positions and so latency. Empty when the
    efficiency section has no sequence lengths."""
    efficiency = report.get("efficiency", {})
    teacher = efficiency.get("teacher", {}).get("mean_tokens_per_row") or {}
    student = efficiency.get("student", {}).get("mean_tokens_per_row") or {}
    if not teacher and not student:
        return ""
    rows = []
    for language in sorted({*teacher, *student}):
        teacher_tokens, student_tokens = teacher.get(language), student.get(language)
        rows.append([language, _decimal(teacher_tokens, 1), _decimal(student_tokens, 1),
                     _times(_ratio(student_tokens, teacher_tokens))])
    return _markdown_table(["language", "teacher tokens", "student tokens", "student ÷ teacher"], rows)


def _latency_sample_line(report: Mapping) -> str:
    """Which rows the latencies were measured on, and how long they were for each model."""
    efficiency = report.get("efficiency", {})
    sample = efficiency.get("latency_sample") or {}
    if not sample:
        return ""
    languages = sample.get("rows_per_language") or {}
    lengths = [f"{role} {_decimal(efficiency.get(role, {}).get('latency_sample_mean_tokens'), 1)}"
               for role in ("teacher", "student") if efficiency.get(role, {}).get("latency_sample_mean_tokens")]
    device = "a GPU" if efficiency.get("device") == "cuda" else "the CPU"
    rounds = sample.get("rounds")
    timing = (f" The teacher and the students were timed in the same {rounds} rounds, each round running every model "
              "once; each latency is the median over the rounds." if rounds else "")
    line = (f"Latency measured on {device}, on {sample.get('rows')} held-out rows drawn evenly from {len(languages)} languages "
            f"(seed {sample.get('seed')}, the same rows every run): batch 32 on all of them at once (cycled to 32 "
            f"when there are fewer), batch 1 on each alone (the mean of the rows).{timing}")
    return line + (f" Mean tokens per row of that sample: {', '.join(lengths)}." if lengths else "")


def _speedup_line(report: Mapping) -> str:
    efficiency = report.get("efficiency", {})
    teacher, student = efficiency.get("teacher", {}), efficiency.get("student", {})
    parts = []
    for batch in (1, 32):
        key = f"latency_ms_batch{batch}"
        speedup = _ratio(teacher.get(key), student.get(key))
        if speedup is not None:
            parts.append(f"{speedup:.2f}× at batch {batch}")
    return f"Student speed-up over the teacher: {', '.join(parts)}." if parts else ""


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_language_accuracy(report: Mapping, path: Path) -> Path:
    """Grouped bars of accuracy per language: teacher, student, and the ablation if present."""
    rows = _language_rows(report)
    chrf = report.get("metric") == "chrF"  # translation students are scored by chrF, 0-100
    series = [("teacher", "teacher"), ("student", "student")]
    if _has_ablation(report):
        series.append(("hard-label only", "ablation"))
    figure = _new_figure(max(6.0, 0.9 * len(rows) + 2), 4.5)
    axes = figure.add_subplot()
    bar_width = 0.8 / len(series)
    for offset, (label, role) in enumerate(series):
        positions = [i + (offset - (len(series) - 1) / 2) * bar_width for i in range(len(rows))]
        # A missing value becomes an absent bar (height 0) rather than breaking the plot.
        heights = [(_metric(entry, role, "chrf") or 0.0) if chrf else 100 * (_metric(entry, role, "accuracy") or 0.0)
                   for _, entry in rows]
        axes.bar(positions, heights, width=bar_width, label=label)
    axes.set_xticks(range(len(rows)), [language for language, _ in rows])
    axes.set_ylabel("chrF" if chrf else "accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title("chrF by language" if chrf else "Accuracy by language")
    axes.legend(loc="lower right")
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path, format="png")
    return path


def _loss_series(history: Sequence[Mapping]) -> dict[str, tuple[list[float], list[float]]]:
    """Each numeric loss key -> (steps, values), skipping entries that lack that key."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for position, entry in enumerate(history):
        step = entry.get("step", position)
        for name, value in entry.items():
            if name in HISTORY_AXES or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    if all(key in series for key in TOTAL_KEYS):
        del series[TOTAL_KEYS[1]]
    return series


def _epoch_starts(history: Sequence[Mapping]) -> list[float]:
    starts, previous = [], None
    for entry in history:
        epoch = entry.get("epoch")
        if previous is not None and epoch is not None and epoch != previous:
            starts.append(entry.get("step"))
        previous = epoch if epoch is not None else previous
    return [step for step in starts if step is not None]


def plot_training_loss(history: Sequence[Mapping], path: Path) -> Path:
    """Total loss (bold) and each logged term against step; dotted lines mark new epochs."""
    figure = _new_figure(8.0, 4.5)
    axes = figure.add_subplot()
    for name, (steps, values) in sorted(_loss_series(history).items()):
        is_total = name in TOTAL_KEYS
        axes.plot(steps, values, label=name, linewidth=2.0 if is_total else 1.0)
    for step in _epoch_starts(history):
        axes.axvline(step, color="grey", linestyle=":", linewidth=0.8)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("Training loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- the teacher first


# How report.md names the gate's baselines (student/teacher_gate.py names them in report.json).
BASELINE_COLUMNS = {"majority_class": "majority class", "hard_label_student": "short hard-label"}


def _gate(report: Mapping) -> Mapping:
    return (report.get("teacher_finetune") or {}).get("gate") or {}


def _test_accuracy(report: Mapping, language: str, role: str) -> float | None:
    entry = report.get("overall") if language == "overall" else (report.get("per_language") or {}).get(language)
    return None if entry is None else _metric(entry, role, "accuracy")


def language_flags(report: Mapping) -> dict[str, list[str]]:
    """Per language (and "overall"), what went wrong: the teacher below a baseline on dev, the
    student below the hard-label ablation on test."""
    flags: dict[str, list[str]] = {}
    gate = _gate(report)
    for entry in gate.get("weak_languages") or []:
        title = BASELINE_COLUMNS.get(entry["baseline"], entry["baseline"])
        flags.setdefault(entry["language"], []).append(
            f"teacher below the {title} on dev ({_percent(entry['teacher'])} vs {_percent(entry['baseline_score'])})")
    if gate.get("status") == "weak_allowed":
        title = BASELINE_COLUMNS.get(gate.get("strongest_baseline"), gate.get("strongest_baseline"))
        flags.setdefault("overall", []).append(
            f"teacher not {gate.get('min_margin'):g} points above the {title} on dev "
            f"({gate.get('lead_points'):+.1f} points), distilled because teacher.allow_weak")
    for language, _ in _language_rows(report):
        student, ablation = _test_accuracy(report, language, "student"), _test_accuracy(report, language, "ablation")
        if student is not None and ablation is not None and student < ablation:
            flags.setdefault(language, []).append(
                f"student below the hard-label ablation on test ({_percent(student)} vs {_percent(ablation)})")
    return flags


def _finetune_line(section: Mapping) -> str:
    tuning = section.get("fine_tuning")
    if not tuning:
        return f"Teacher `{section.get('teacher_model')}` used as given (no fine-tuning)."
    ending = (f"stopped early: no new best dev score in {tuning['patience']} evaluations" if tuning["stopped_early"]
              else "ran its whole budget")
    reused = " (reused from the fine-tuning cache)" if tuning.get("reused") else ""
    return (f"Teacher `{section.get('teacher_model')}` fine-tuned for {tuning['steps_trained']:,} of at most "
            f"{tuning['max_steps']:,} steps ({tuning['max_epochs']:g} epochs, {tuning['schedule']} schedule, "
            f"dev scored every {tuning['eval_every_steps']:,} steps), {ending}; kept the checkpoint of step "
            f"{tuning['chosen_step']:,} (epoch {tuning['chosen_epoch']:.2f}), dev accuracy "
            f"{_percent(tuning['dev_accuracy'])}; {tuning['seconds']:.0f} s{reused}.")


def _gate_line(section: Mapping) -> str:
    gate = section.get("gate") or {}
    if gate.get("status") == "skipped":
        return f"Teacher gate skipped: {gate.get('note')}."
    dev = section.get("dev") or {}
    where = "the data's own" if dev.get("source") == "data" else "carved from the training split"
    verdict = {"passed": "passed", "weak_allowed": "NOT passed (distilled anyway: teacher.allow_weak)",
               "refused": "refused"}[gate["status"]]
    title = BASELINE_COLUMNS.get(gate.get("strongest_baseline"), gate.get("strongest_baseline"))
    return (f"Teacher gate {verdict}: on the dev split '{dev.get('split')}' ({where}, {_integer(dev.get('rows'))} "
            f"rows) the teacher scores {_percent(gate['teacher']['overall'])}, {gate['lead_points']:+.1f} points from the "
            f"strongest baseline ({title}, {_percent(gate['baselines'][gate['strongest_baseline']]['overall'])}); "
            f"teacher.min_margin asks for {gate['min_margin']:g} points. The majority class is "
            f"'{gate.get('majority_label')}'.")


def _dev_score(scores: Mapping, language: str) -> float | None:
    return scores["overall"] if language == "overall" else scores["per_language"].get(language)


def format_teacher_table(report: Mapping) -> str:
    """The teacher's dev and test accuracy beside the baselines' (dev) and the student's and the
    ablation's (test), per language, with what went wrong in each. Empty without a gate's scores."""
    gate = _gate(report)
    if not gate.get("teacher"):
        return ""
    baselines = list(gate.get("baselines") or {})
    has_ablation = _has_ablation(report)
    flags = language_flags(report)
    header = ["language", "teacher dev", *(f"{BASELINE_COLUMNS.get(name, name)} dev" for name in baselines),
              "teacher test", "student test", *(["ablation test"] if has_ablation else []), "flags"]
    languages = sorted({*gate["teacher"]["per_language"], *(report.get("per_language") or {})})
    rows = []
    for language in [*languages, "overall"]:
        rows.append([language, _percent(_dev_score(gate["teacher"], language)),
                     *(_percent(_dev_score(gate["baselines"][name], language)) for name in baselines),
                     _percent(_test_accuracy(report, language, "teacher")),
                     _percent(_test_accuracy(report, language, "student")),
                     *([_percent(_test_accuracy(report, language, "ablation"))] if has_ablation else []),
                     "; ".join(flags.get(language, []))])
    return _markdown_table(header, rows)


def format_dev_curve_table(report: Mapping) -> str:
    """The teacher's dev accuracy at each evaluation of fine-tuning, the kept one marked."""
    tuning = (report.get("teacher_finetune") or {}).get("fine_tuning") or {}
    if not tuning.get("curve"):
        return ""
    rows = []
    for point in tuning["curve"]:
        weakest = min(point["per_language"].items(), key=lambda item: item[1], default=None)
        rows.append([_integer(point["step"]), _decimal(point["epoch"], 2), _percent(point["accuracy"]),
                     MISSING if weakest is None else f"{weakest[0]} {_percent(weakest[1])}",
                     "kept" if point["step"] == tuning["chosen_step"] else ""])
    return _markdown_table(["step", "epoch", "dev accuracy", "weakest language", ""], rows)


def render_teacher_section(report: Mapping) -> str:
    """The report's opening: how the teacher was made, whether it was worth distilling, and every
    language where the teacher lost to a baseline or the student to the ablation."""
    section = report.get("teacher_finetune")
    flags = language_flags(report)
    if not section and not flags:
        return ""
    parts = ["## Teacher, baselines and flags"]
    if section:
        parts += [_finetune_line(section), _gate_line(section)]
    table = format_teacher_table(report)
    if table:
        parts.append(table)
    if flags:
        parts.append("Flags:\n\n" + "\n".join(f"- {language}: {flag}" for language, entries in sorted(flags.items())
                                                for flag in entries))
    else:
        parts.append("No language where the teacher lost to a baseline or the student to the ablation.")
    curve = format_dev_curve_table(report)
    if curve:
        parts.append("### Teacher fine-tuning, dev accuracy at each evaluation\n\n" + curve)
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- report


def format_teachers_table(report: Mapping) -> str:
    """Several teachers: samples each teacher labelled per language (from the student's side, so each
    sample counts once per epoch), with each teacher's accuracy per language when it was evaluated."""
    served = report.get("teacher_samples_per_language")
    if not served:
        return ""
    teachers = list(served)
    languages = sorted({language for counts in served.values() for language in counts})
    per_language = report.get("per_language") or {}
    header = ["language", *(f"{name} samples" for name in teachers), *(f"{name} acc" for name in teachers)]
    rows = []
    for language in languages:
        entry = per_language.get(language, {})
        accuracy = [_metric(entry, "teacher" if name == "teacher" else f"teacher:{name}", "accuracy")
                    for name in teachers]
        rows.append([language, *(_integer(served[name].get(language, 0)) for name in teachers),
                     *(_percent(value) for value in accuracy)])
    return _markdown_table(header, rows)


def render_markdown(report: Mapping) -> str:
    """The full report.md text; sections missing from `report` are left out."""
    sections = ["# Distillation report"]
    teacher_section = render_teacher_section(report)
    if teacher_section:
        sections.append(teacher_section)
    language_table = format_language_table(report)
    if language_table:
        sections.append("## Accuracy by language\n\n" + language_table)
        if report.get("per_language"):
            sections.append("![Accuracy by language](per_language_accuracy.png)")
    for name, task in (report.get("tasks") or {}).items():  # a multi-task student: each extra task's own table
        table = format_language_table(task) if name != "main" else ""
        if table:
            sections.append(f"## Task {name} ({task.get('task')}, weight {task.get('weight')})\n\n" + table)
    if has_extra_students(report):
        sections.append("## Students\n\n" + format_students_table(report)
                        + "\n\n![Accuracy against size](accuracy_vs_size.png)")
        for name in distilled_students(report)[1:]:
            sections.append(f"### Student {name} by language\n\n" + format_language_table(student_view(report, name)))
    teachers_table = format_teachers_table(report)
    if teachers_table:
        sections.append("## Teachers\n\n" + teachers_table)
    efficiency_table = format_efficiency_table(report)
    if efficiency_table:
        speedup = _speedup_line(report)
        sections.append("## Efficiency\n\n" + efficiency_table)
        if speedup:
            sections.append(speedup)
        latency_sample = _latency_sample_line(report)
        if latency_sample:
            sections.append(latency_sample)
    sequence_table = format_sequence_length_table(report)
    if sequence_table:
        sections.append("### Sequence length by language (mean tokens per row)\n\n" + sequence_table)
    stages_table = format_stages_table(report)
    if stages_table:
        sections.append("## Compression stages\n\n" + stages_table)
    validation_table = format_validation_table(report)
    if validation_table:
        sections.append("## Dev accuracy by epoch\n\n" + validation_table + early_stopping_lines(report))
    if report.get("loss_history"):
        sections.append("## Training loss\n\n![Training loss](training_loss.png)")
    return "\n\n".join(sections) + "\n"


def format_validation_table(report: Mapping) -> str:
    """training.validate_each_epoch: each student's dev accuracy after each epoch, the kept one marked, and
    (training.keep_best) each hard-label ablation's, chosen by the same rule."""
    students = {"student": report, **{name: section for name, section in (report.get("extra_students") or {}).items()}}
    rows = []
    for name, section in students.items():
        for score in section.get("validation") or []:
            kept = " (kept)" if section.get("kept_epoch") == score["epoch"] else ""
            rows.append([name, str(score["epoch"] + 1) + kept, str(score["step"]), _percent(score["accuracy"]),
                         _percent(min(score["per_language"].values(), default=None))])
    for name, section in (report.get("ablation_validation") or {}).items():
        for point in section["curve"]:  # scored after each epoch's last step: epoch is a whole number then
            kept = " (kept)" if section.get("kept_step") == point["step"] else ""
            rows.append([name, f"{point['epoch']:g}{kept}", str(point["step"]), _percent(point["accuracy"]),
                         _percent(min(point["per_language"].values(), default=None))])
    if not rows:
        return ""
    return _markdown_table(["Student", "Epoch", "Step", "Dev accuracy", "Weakest language"], rows)


def early_stopping_lines(report: Mapping) -> str:
    """training.patience: one line per student that stopped before its planned epochs. The rule may fire on
    the last planned epoch too; that model trained its whole plan and gets no line."""
    planned = report["epochs"]
    students = {"student": report, **{name: section for name, section in (report.get("extra_students") or {}).items()}}
    lines = [f"- {name} stopped early: no new best dev score in the {stopped['patience']} epoch(s) up to epoch "
             f"{stopped['after_epoch'] + 1}; trained {stopped['last_epoch'] + 1} of {planned} planned epochs"
             + (" (the epoch under way was finished)" if stopped["last_epoch"] > stopped["after_epoch"] else "")
             for name, section in students.items()
             if (stopped := section.get("stopped_early")) and stopped["last_epoch"] + 1 < planned]
    lines += [f"- {name} stopped early by the same rule: trained {section['curve'][-1]['epoch']:g} of "
              f"{planned} planned epochs"
              for name, section in (report.get("ablation_validation") or {}).items()
              if section.get("stopped_early") and section.get("curve") and section["curve"][-1]["epoch"] < planned]
    return "\n\n" + "\n".join(lines) if lines else ""


def write_report(report: Mapping, out_dir: Path) -> list[Path]:
    """Write report.md and the plots its sections call for; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown_path = out_dir / "report.md"
    markdown_path.write_text(render_markdown(report), encoding="utf-8")
    written = [markdown_path]
    if report.get("per_language"):
        written.append(plot_language_accuracy(report, out_dir / "per_language_accuracy.png"))
    if has_extra_students(report):
        written.append(plot_accuracy_vs_size(report, out_dir / "accuracy_vs_size.png"))
    if report.get("loss_history"):
        written.append(plot_training_loss(report["loss_history"], out_dir / "training_loss.png"))
    return written
