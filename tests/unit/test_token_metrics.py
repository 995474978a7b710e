"""student/token_metrics.py: hand-computed tagging metrics per language, averaged and pooled."""

from __future__ import annotations

import numpy as np
import pytest

from polydistill.student.token_metrics import tagging_metrics

LABELS = ["deu", "eng", "fra", "other"]  # ids 0, 1, 2, 3
DEU, ENG, FRA, OTHER = range(4)


def arrays(*rows: list[int]) -> list[np.ndarray]:
    return [np.array(row, dtype=np.int64) for row in rows]


# Sample 0 (fra): gold fra fra eng other,  predicted fra eng eng other.
# Sample 1 (fra): gold eng -100 fra,       predicted eng deu -1; the -100 word is not scored (its
#                 "deu" prediction vanishes with it) and the -1 is a miss for gold fra.
# Sample 2 (deu): gold deu deu eng,        predicted deu fra eng; fra is predicted, never gold.
# Sample 3 (amh): gold -1 -1,              predicted eng eng: no scored word at all.
GOLD = arrays([FRA, FRA, ENG, OTHER], [ENG, -100, FRA], [DEU, DEU, ENG], [-1, -1])
PREDICTED = arrays([FRA, ENG, ENG, OTHER], [ENG, DEU, -1], [DEU, FRA, ENG], [ENG, ENG])
LANGUAGES = ["fra", "fra", "deu", "amh"]


@pytest.fixture(scope="module")
def metrics() -> dict:
    return tagging_metrics(GOLD, PREDICTED, LANGUAGES, LABELS)


def test_french_hand_computed(metrics):
    # Scored words: gold fra fra eng other eng fra / predicted fra eng eng other eng -1.
    # accuracy 4/6. Tags present: eng, fra, other (the -1 is no tag).
    #   fra:   tp 1, predicted 1, gold 3 -> P 1,   R 1/3, F1 2*(1/3)/(4/3) = 1/2
    #   eng:   tp 2, predicted 3, gold 2 -> P 2/3, R 1,   F1 2*(2/3)/(5/3) = 4/5
    #   other: tp 1, predicted 1, gold 1 -> 1, 1, 1
    # macro P = (1 + 2/3 + 1)/3 = 8/9, R = (1/3 + 1 + 1)/3 = 7/9, F1 = (1/2 + 4/5 + 1)/3 = 23/30.
    assert metrics["per_language"]["fra"] == {
        "accuracy": 0.6667,
        "precision": 0.8889,
        "recall": 0.7778,
        "f1": 0.7667,
        "words": 6,
    }


def test_tag_predicted_but_never_gold_counts_as_zero(metrics):
    # German words: gold deu deu eng / predicted deu fra eng; accuracy 2/3.
    #   deu: tp 1, predicted 1, gold 2 -> P 1, R 1/2, F1 2/3
    #   eng: 1, 1, 1
    #   fra: tp 0, predicted 1, gold 0 -> 0, 0, 0 (present only because it was predicted)
    # macro P = 2/3, R = 3/2 / 3 = 1/2, F1 = (2/3 + 1)/3 = 5/9.
    assert metrics["per_language"]["deu"] == {
        "accuracy": 0.6667,
        "precision": 0.6667,
        "recall": 0.5,
        "f1": 0.5556,
        "words": 3,
    }


def test_language_without_scored_words_is_zero_and_left_out_of_the_average(metrics):
    assert metrics["per_language"]["amh"] == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "words": 0}
    # Mean over fra and deu only, of the unrounded values:
    # accuracy (2/3 + 2/3)/2 = 2/3; P (8/9 + 2/3)/2 = 7/9; R (7/9 + 1/2)/2 = 23/36 = 0.63889;
    # F1 (23/30 + 5/9)/2 = 119/180 = 0.66111.
    assert metrics["average"] == {
        "accuracy": 0.6667,
        "precision": 0.7778,
        "recall": 0.6389,
        "f1": 0.6611,
        "languages": 2,
        "words": 9,
    }


def test_overall_pools_every_word(metrics):
    # 9 scored words, 6 correct. Pooled per tag:
    #   deu:   tp 1, predicted 1, gold 2 -> P 1,   R 1/2, F1 2/3
    #   eng:   tp 3, predicted 4, gold 3 -> P 3/4, R 1,   F1 2*(3/4)/(7/4) = 6/7
    #   fra:   tp 1, predicted 2, gold 3 -> P 1/2, R 1/3, F1 2*(1/6)/(5/6) = 2/5
    #   other: 1, 1, 1
    # macro P = 3.25/4 = 0.8125, R = (1/2 + 1 + 1/3 + 1)/4 = 17/24 = 0.70833,
    # F1 = (2/3 + 6/7 + 2/5 + 1)/4 = 307/420 = 0.73095.
    assert metrics["overall"] == {
        "accuracy": 0.6667,
        "precision": 0.8125,
        "recall": 0.7083,
        "f1": 0.731,
        "words": 9,
    }
    assert metrics["per_tag"] == {
        "deu": {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2},
        "eng": {"precision": 0.75, "recall": 1.0, "f1": 0.8571, "support": 3},
        "fra": {"precision": 0.5, "recall": 0.3333, "f1": 0.4, "support": 3},
        "other": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    }


def test_perfect_predictions_score_one():
    gold = arrays([ENG, FRA, OTHER], [DEU])
    result = tagging_metrics(gold, gold, ["fra", "deu"], LABELS)
    for values in [*result["per_language"].values(), result["average"], result["overall"]]:
        assert (values["accuracy"], values["precision"], values["recall"], values["f1"]) == (1.0, 1.0, 1.0, 1.0)


def test_all_unpredicted_words_score_zero():
    # Every word truncated away: no tag is predicted, so only the gold tags are present, each with
    # recall 0 and (no predictions) precision 0.
    result = tagging_metrics(arrays([ENG, FRA]), arrays([-1, -1]), ["fra"], LABELS)
    assert result["overall"] == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "words": 2}


def test_no_samples_at_all():
    result = tagging_metrics([], [], [], LABELS)
    assert result["per_language"] == {}
    assert result["average"] == {
        "accuracy": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "languages": 0,
        "words": 0,
    }
    assert result["overall"]["words"] == 0
    assert result["per_tag"] == {}


@pytest.mark.parametrize(
    ("gold", "predicted", "languages", "message"),
    [
        (arrays([ENG]), arrays([ENG]), ["fra", "deu"], "language entries"),
        (arrays([ENG, FRA]), arrays([ENG]), ["fra"], "predictions"),
        (arrays([7]), arrays([ENG]), ["fra"], "gold label id 7"),
        (arrays([ENG]), arrays([4]), ["fra"], "predicted label id"),
        (arrays([ENG]), arrays([-100]), ["fra"], "predicted label id"),
    ],
)
def test_bad_input_is_rejected(gold, predicted, languages, message):
    with pytest.raises(ValueError, match=message):
        tagging_metrics(gold, predicted, languages, LABELS)
