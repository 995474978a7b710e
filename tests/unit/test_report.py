"""The Markdown report and its PNG plots, rendered into tmp_path."""

from pathlib import Path

import pytest

from polydistill.student.report import (
    format_efficiency_table,
    format_language_table,
    format_sequence_length_table,
    render_markdown,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _scores(accuracy, f1):
    return {"accuracy": accuracy, "macro_f1": f1, "macro_precision": f1, "macro_recall": f1}


FULL_REPORT = {
    "per_language": {
        "sw": {"teacher": _scores(0.75, 0.7), "student": _scores(0.6, 0.55),
               "ablation": _scores(0.5, 0.45), "retention": 0.8},
        "en": {"teacher": _scores(0.9, 0.88), "student": _scores(0.855, 0.85),
               "ablation": _scores(0.8, 0.79), "retention": 0.95},
    },
    "overall": {"teacher": _scores(0.825, 0.79), "student": _scores(0.7275, 0.70),
                "ablation": _scores(0.65, 0.62)},
    "efficiency": {
        "teacher": {"params": 278_043_648, "non_embedding_params": 85_054_464,
                    "disk_bytes": 1_112_250_000, "latency_ms_batch1": 40.0,
                    "latency_ms_batch32": 800.0},
        "student": {"params": 117_653_760, "non_embedding_params": 21_263_616,
                    "disk_bytes": 470_600_000, "latency_ms_batch1": 10.0,
                    "latency_ms_batch32": 250.0},
    },
    "loss_history": [
        {"step": step, "epoch": step // 5, "loss": 3.0 / (step + 1), "kd": 2.0 / (step + 1),
         "ce": 1.0 / (step + 1)}
        for step in range(12)
    ],
}


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path.name} is not a PNG"
    assert len(data) > 1024, f"{path.name} is suspiciously small ({len(data)} bytes)"


def test_full_report_writes_markdown_and_both_plots(tmp_path):
    written = write_report(FULL_REPORT, tmp_path / "out")
    names = sorted(path.name for path in written)
    assert names == ["per_language_accuracy.png", "report.md", "training_loss.png"]
    for path in written:
        assert path.exists() and path.parent == tmp_path / "out"
    _assert_png(tmp_path / "out" / "per_language_accuracy.png")
    _assert_png(tmp_path / "out" / "training_loss.png")


def test_markdown_has_a_row_per_language_with_formatted_numbers(tmp_path):
    write_report(FULL_REPORT, tmp_path)
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in markdown.splitlines() if line.startswith("| ")}
    # language | teacher acc | student acc | retention | teacher F1 | student F1 | ablation
    assert rows["sw"] == ["75.0%", "60.0%", "80.0%", "70.0%", "55.0%", "50.0%"]
    assert rows["en"] == ["90.0%", "85.5%", "95.0%", "88.0%", "85.0%", "80.0%"]
    # No stored retention for overall: computed as 0.7275 / 0.825 = 88.2%.
    assert rows["overall"] == ["82.5%", "72.8%", "88.2%", "79.0%", "70.0%", "65.0%"]
    assert rows["parameters"] == ["278,043,648", "117,653,760", "2.36×"]
    assert rows["disk (MB)"] == ["1112.2", "470.6", "2.36×"]
    assert rows["latency, batch 1 (ms)"] == ["40.00", "10.00", "4.00×"]
    assert rows["latency, batch 32 (ms)"] == ["800.00", "250.00", "3.20×"]
    assert "4.00× at batch 1, 3.20× at batch 32" in markdown
    # Languages sorted, overall last.
    assert markdown.index("| en ") < markdown.index("| sw ") < markdown.index("| overall")


def test_language_table_shows_the_confidence_intervals_of_retention_and_of_the_lead_over_the_ablation():
    def interval(estimate, low, high):
        return {"estimate": estimate, "low": low, "high": high}

    report = {
        "per_language": {language: dict(entry) for language, entry in FULL_REPORT["per_language"].items()},
        "overall": {**FULL_REPORT["overall"], "intervals": {
            "language_average": {"retention": interval(0.875, 0.8, 0.95),
                                 "student_minus_ablation": interval(0.0825, 0.02, 0.145)},
            "level": 0.95, "resamples": 1000}},
    }
    report["per_language"]["sw"]["intervals"] = {"retention": interval(0.8, 0.7, 0.9),
                                                 "student_minus_ablation": interval(0.1, -0.025, 0.25)}
    report["per_language"]["en"]["intervals"] = {"retention": interval(None, None, None)}  # a teacher right on no row
    lines = format_language_table(report).splitlines()
    assert "retention 95% CI" in lines[0] and "student − hard-label, points [95% CI]" in lines[0]
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in lines[2:]}
    assert cells["sw"][-2:] == ["[70.0%, 90.0%]", "+10.0 [-2.5, +25.0]"]
    assert cells["en"][-2:] == ["—", "—"]
    assert cells["overall"][-2:] == ["[80.0%, 95.0%]", "+8.2 [+2.0, +14.5]"]
    # Without intervals the table keeps its columns.
    assert "95% CI" not in format_language_table(FULL_REPORT)


def test_report_with_only_overall_and_loss_still_renders(tmp_path):
    report = {"overall": {"teacher": _scores(0.8, 0.8), "student": _scores(0.4, 0.4)},
              "loss_history": [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]}
    written = write_report(report, tmp_path)
    assert sorted(path.name for path in written) == ["report.md", "training_loss.png"]
    _assert_png(tmp_path / "training_loss.png")
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| overall  | 80.0%" in markdown and "50.0%" in markdown
    assert "Efficiency" not in markdown and "hard-label" not in markdown


def test_loss_series_draws_total_once_when_logged_as_both_loss_and_total():
    from polydistill.student.report import _loss_series

    series = _loss_series([{"step": 0, "epoch": 0, "loss": 1.0, "total": 1.0, "soft": 0.5}])
    assert sorted(series) == ["loss", "soft"]


def test_empty_report_renders_a_title_only(tmp_path):
    written = write_report({}, tmp_path)
    assert [path.name for path in written] == ["report.md"]
    assert (tmp_path / "report.md").read_text(encoding="utf-8").startswith("# Distillation report")


def test_missing_values_render_as_dashes():
    report = {"per_language": {"ur": {"student": _scores(0.5, 0.4), "teacher": _scores(0.0, 0.0)}},
              "efficiency": {"student": {"params": 10}}}
    table = format_language_table(report)
    assert "| ur       | 0.0%        | 50.0%       | —" in table
    efficiency = format_efficiency_table(report)
    assert "| parameters" in efficiency and "| —" in efficiency


def test_language_table_is_aligned_for_the_terminal():
    lines = format_language_table(FULL_REPORT).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[0].startswith("| language")
    assert format_language_table({}) == ""


@pytest.mark.parametrize("with_ablation", [True, False])
def test_language_plot_with_and_without_ablation(tmp_path, with_ablation):
    report = {"per_language": {"de": {"teacher": _scores(0.9, 0.9), "student": _scores(0.8, 0.8)}}}
    if with_ablation:
        report["per_language"]["de"]["ablation"] = _scores(0.7, 0.7)
    written = write_report(report, tmp_path)
    assert [path.name for path in written] == ["report.md", "per_language_accuracy.png"]
    _assert_png(written[1])


def test_sequence_lengths_per_language_and_the_latency_sample_in_the_efficiency_section():
    efficiency = {
        "teacher": {**FULL_REPORT["efficiency"]["teacher"], "latency_sample_mean_tokens": 30.0,
                    "mean_tokens_per_row": {"amh_Ethi": 40.0, "eng_Latn": 25.0}},
        "student": {**FULL_REPORT["efficiency"]["student"], "latency_sample_mean_tokens": 45.5,
                    "mean_tokens_per_row": {"amh_Ethi": 70.0, "eng_Latn": 25.0}},
        "latency_sample": {"rows": 32, "seed": 0, "rows_per_language": {"amh_Ethi": 16, "eng_Latn": 16},
                           "sample_ids": list(range(32)), "rounds": 7},
    }
    markdown = render_markdown({"efficiency": efficiency})
    assert "timed in the same 7 rounds" in markdown
    table = format_sequence_length_table({"efficiency": efficiency}).splitlines()
    assert table[0].split("|")[1:-1] == [" language ", " teacher tokens ", " student tokens ", " student ÷ teacher "]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in table[2:]}
    assert rows == {"amh_Ethi": ["40.0", "70.0", "1.75×"], "eng_Latn": ["25.0", "25.0", "1.00×"]}
    assert "\n".join(table) in markdown
    assert markdown.index("## Efficiency") < markdown.index("Sequence length by language")
    assert "32 held-out rows drawn evenly from 2 languages (seed 0" in markdown
    assert "Mean tokens per row of that sample: teacher 30.0, student 45.5." in markdown
    # A report from before sequence lengths were measured has neither.
    older = render_markdown(FULL_REPORT)
    assert "Sequence length" not in older and "held-out rows drawn evenly" not in older
