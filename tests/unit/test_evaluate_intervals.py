"""The evaluation report carries each language's confidence intervals, and the per-row scores they come
from stay out of it."""

import json

import numpy as np

from polydistill.student.evaluate import add_confidence_intervals, side_by_side
from polydistill.student.metrics import per_language_metrics


def _result(labels, predicted, languages):
    predicted = np.asarray(predicted)
    return {"overall": {"accuracy": float((predicted == labels).mean())},
            "per_language": per_language_metrics(labels, predicted, languages, 2),
            "row_correct": (predicted == labels).astype(np.int64)}


def test_intervals_go_into_each_language_and_the_overall_section_and_nothing_per_row_does():
    languages = ["aa"] * 4 + ["bb"] * 4
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    results = {"teacher": _result(labels, labels, languages),
               "student": _result(labels, [0, 1, 0, 1, 0, 1, 1, 0], languages),
               "ablation": _result(labels, [1, 0, 1, 0, 0, 1, 1, 0], languages)}
    report = side_by_side(results)
    add_confidence_intervals(report, results, languages)

    assert report["per_language"]["aa"]["intervals"]["student_minus_ablation"] == {
        "estimate": 1.0, "low": 1.0, "high": 1.0}  # right on all four rows against wrong on all four
    assert report["per_language"]["bb"]["intervals"]["student_minus_ablation"] == {
        "estimate": 0.0, "low": 0.0, "high": 0.0}  # the same predictions
    assert report["per_language"]["aa"]["intervals"]["retention"]["estimate"] == 1.0
    overall = report["overall"]["intervals"]
    assert overall["language_average"]["student_minus_ablation"]["estimate"] == 0.5
    assert (overall["level"], overall["resamples"]) == (0.95, 1000)
    assert "row_correct" not in json.dumps(report)
