"""Metrics against confusion matrices worked out by hand."""

import math

import numpy as np
import pytest

from polydistill.student.metrics import (
    bootstrap_intervals,
    classification_metrics,
    confusion_matrix,
    per_language_metrics,
    perplexity,
    retention,
    retrieval_accuracy,
)

# y_true [0, 0, 1, 1, 2], y_pred [0, 1, 1, 1, 0], num_labels 4 (label 3 never occurs).
#   label 0: tp 1, fp 1 (a true 2), fn 1 (a 0 called 1) -> P 1/2, R 1/2, F1 1/2
#   label 1: tp 2, fp 1 (a true 0), fn 0                 -> P 2/3, R 1,   F1 4/5
#   label 2: tp 0, fp 0, fn 1                            -> P 0 (0/0), R 0, F1 0
#   label 3: absent from both -> left out of the macro average
Y_TRUE = [0, 0, 1, 1, 2]
Y_PRED = [0, 1, 1, 1, 0]


def test_confusion_matrix_counts_true_by_predicted():
    expected = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(confusion_matrix(Y_TRUE, Y_PRED, 4), expected)


def test_classification_metrics_hand_example():
    metrics = classification_metrics(Y_TRUE, Y_PRED, num_labels=4)
    assert metrics["n"] == 5
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert metrics["macro_recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)


def test_classification_metrics_perfect_and_empty():
    perfect = classification_metrics([2, 0, 1], [2, 0, 1], num_labels=3)
    assert perfect == {"accuracy": 1.0, "macro_precision": 1.0, "macro_recall": 1.0,
                       "macro_f1": 1.0, "n": 3}
    assert classification_metrics([], [], num_labels=3)["n"] == 0


def test_a_label_only_predicted_counts_with_precision_zero():
    # true all 0, predicted [0, 1]: label 0 P 1, R 1/2, F1 2/3; label 1 P 0, R 0 (0/0), F1 0.
    metrics = classification_metrics([0, 0], [0, 1], num_labels=3)
    assert metrics["macro_precision"] == pytest.approx(0.5)
    assert metrics["macro_recall"] == pytest.approx(0.25)
    assert metrics["macro_f1"] == pytest.approx(1 / 3)


def test_classification_metrics_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"y_pred holds labels in \[0, 3\], outside 0..2"):
        classification_metrics([0, 1], [0, 3], num_labels=3)
    with pytest.raises(ValueError, match="y_true has 2 labels but y_pred has 1"):
        classification_metrics([0, 1], [0], num_labels=3)


def test_per_language_metrics_splits_by_language():
    languages = ["sw", "en", "sw", "en", "ur"]
    result = per_language_metrics([0, 1, 1, 0, 2], [0, 1, 0, 0, 1], languages, num_labels=3)
    assert list(result) == ["en", "sw", "ur"]
    assert result["en"]["accuracy"] == 1.0 and result["en"]["n"] == 2
    # sw: true [0, 1], pred [0, 0]: label 0 P 1/2 R 1 F1 2/3; label 1 P 0 R 0 F1 0.
    assert result["sw"]["accuracy"] == 0.5
    assert result["sw"]["macro_f1"] == pytest.approx(1 / 3)
    assert result["ur"]["accuracy"] == 0.0 and result["ur"]["n"] == 1


def test_per_language_metrics_rejects_length_mismatch():
    with pytest.raises(ValueError, match=r"languages \(1\)"):
        per_language_metrics([0, 1], [0, 1], ["en"], num_labels=2)


def test_perplexity():
    # total NLL 2 ln 4 over 2 tokens -> mean ln 4 -> perplexity 4.
    assert perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="n_tokens=0"):
        perplexity(1.0, 0)


def test_retrieval_accuracy_counts_rows_whose_nearest_target_is_their_pair():
    src = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # Row 0 -> target 0; row 1 -> target 1; row 2 ([1,1]) is nearest to target 0 ([1,0.2]),
    # not to its pair target 2 ([-1, 1]) -- so 2 of 3 hit. Scale does not matter (cosine).
    tgt = np.array([[5.0, 1.0], [0.0, 3.0], [-1.0, 1.0]])
    assert retrieval_accuracy(src, tgt) == pytest.approx(2 / 3)
    assert retrieval_accuracy(src, 7 * src) == 1.0


def test_retrieval_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        retrieval_accuracy(np.zeros((2, 3)), np.zeros((3, 3)))


def test_retention_is_a_ratio_guarded_for_zero_teacher():
    assert retention(0.8, 0.9) == pytest.approx(0.8 / 0.9)
    assert retention(0.5, 0.0) is None


# -- paired bootstrap intervals -----------------------------------------------------------------------


def exact(estimate, low, high):
    return {"estimate": estimate, "low": low, "high": high}


def test_identical_models_differ_by_an_interval_of_zero_width_around_zero():
    right = [1, 0, 1, 1, 0, 1]
    intervals = bootstrap_intervals({"student": right, "ablation": right, "teacher": right}, ["xx"] * 6)
    assert intervals["per_language"]["xx"] == {"student_minus_ablation": exact(0.0, 0.0, 0.0),
                                               "retention": exact(1.0, 1.0, 1.0)}


def test_right_on_every_row_against_wrong_on_every_row_is_a_whole_hundred_points():
    languages = ["aa"] * 5 + ["bb"] * 3
    better = bootstrap_intervals({"student": [1] * 8, "ablation": [0] * 8}, languages)
    worse = bootstrap_intervals({"student": [0] * 8, "ablation": [1] * 8}, languages)
    for language in ("aa", "bb"):
        assert better["per_language"][language] == {"student_minus_ablation": exact(1.0, 1.0, 1.0)}
        assert worse["per_language"][language] == {"student_minus_ablation": exact(-1.0, -1.0, -1.0)}
    assert better["language_average"] == {"student_minus_ablation": exact(1.0, 1.0, 1.0)}


def test_two_rows_one_won_resample_to_none_half_or_both():
    # Student right on row 0 only, ablation on neither; the teacher on both. A resample of the two rows
    # holds row 0 twice, once or never (1/4, 1/2, 1/4): the difference and the retention are 1, 0.5 or 0,
    # so the central 95 % of 1000 resamples reach from 0 to 1.
    intervals = bootstrap_intervals({"student": [1, 0], "ablation": [0, 0], "teacher": [1, 1]}, ["xx", "xx"])
    assert intervals["per_language"]["xx"] == {"student_minus_ablation": exact(0.5, 0.0, 1.0),
                                               "retention": exact(0.5, 0.0, 1.0)}


def test_the_language_average_averages_the_languages_in_every_resample():
    # aa: the student beats the ablation on every row; bb: they are the same model. Half the teacher's score.
    languages = ["aa"] * 4 + ["bb"] * 6
    student = [1] * 4 + [1, 0, 1, 0, 1, 0]
    intervals = bootstrap_intervals({"student": student, "ablation": [0] * 4 + student[4:], "teacher": [1] * 10},
                                    languages)
    assert intervals["language_average"]["student_minus_ablation"] == pytest.approx(exact(0.5, 0.5, 0.5), abs=1e-12)
    # Retention of the averages: (1 + 0.5) / 2 over 1.
    assert intervals["language_average"]["retention"]["estimate"] == 0.75
    assert intervals["per_language"]["aa"]["retention"] == exact(1.0, 1.0, 1.0)


def test_a_tagger_is_scored_per_word_with_the_rows_word_counts():
    # Row 0 has three words, all tagged right by the student; row 1 one word, tagged wrong: 3 of 4 words.
    intervals = bootstrap_intervals({"student": [3, 0], "ablation": [0, 0], "teacher": [3, 1]}, ["xx", "xx"],
                                    units=[3, 1])
    entry = intervals["per_language"]["xx"]
    assert entry["student_minus_ablation"] == exact(0.75, 0.0, 1.0)
    assert entry["retention"]["estimate"] == 0.75


def test_intervals_are_seeded_per_language_and_reproducible():
    rng = np.random.default_rng(7)
    languages = ["aa"] * 50 + ["bb"] * 50
    correct = {name: rng.integers(0, 2, size=100) for name in ("student", "ablation", "teacher")}
    first = bootstrap_intervals(correct, languages, resamples=200)
    assert bootstrap_intervals(correct, languages, resamples=200) == first
    alone = bootstrap_intervals({name: values[:50] for name, values in correct.items()}, languages[:50], resamples=200)
    assert alone["per_language"]["aa"] == first["per_language"]["aa"]  # bb's rows do not move aa's draws
    assert bootstrap_intervals(correct, languages, resamples=200, seed=1) != first
    interval = first["per_language"]["aa"]["student_minus_ablation"]
    assert interval["low"] <= interval["estimate"] <= interval["high"]


def test_a_teacher_right_on_no_row_has_no_retention():
    intervals = bootstrap_intervals({"student": [1, 0], "teacher": [0, 0]}, ["xx", "xx"])
    assert intervals["per_language"]["xx"] == {"retention": exact(None, None, None)}


def test_a_language_with_no_scored_word_has_no_interval():
    intervals = bootstrap_intervals({"student": [0, 0], "ablation": [0, 0]}, ["xx", "xx"], units=[0, 0])
    assert intervals["per_language"]["xx"] == {"student_minus_ablation": exact(None, None, None)}


def test_bootstrap_refuses_values_that_do_not_match_the_rows():
    with pytest.raises(ValueError, match="one value per test row"):
        bootstrap_intervals({"student": [1, 0], "ablation": [1]}, ["xx", "xx"])
    with pytest.raises(ValueError, match="fewer than 0 units"):
        bootstrap_intervals({"student": [1, 0], "ablation": [1, 0]}, ["xx", "xx"], units=[1, -1])
