"""Word-level tagging metrics, per language and overall, in plain numpy.

Used to score word-level language identification (storage/code_switch.py), where one language's
samples can be near perfect while another's fail: the per-language view shows which.

Conventions:
- Inputs are per-sample arrays of word label ids. Gold entries below 0 (-1, -100) are not scored.
- A predicted -1 (a word the model never saw, e.g. truncated away) is a wrong answer: it lowers
  accuracy and the recall of the gold tag, but is no tag of its own, so it adds no false positive.
- precision / recall / f1 are macro averages over the tags that occur in the gold or the
  predictions of the words being scored. A tag predicted but never gold counts with precision,
  recall and f1 0, which is the price of predicting it. A tag's f1 is its own harmonic mean;
  the macro f1 is the mean of those, not the harmonic mean of macro precision and recall.
- "per_language": each language on its own words. "average": the mean of the per-language
  values over the languages that have at least one scored word. "overall": the same metrics on
  all words pooled, so large languages weigh more. "per_tag": each tag over all words.
- Values are floats rounded to 4 decimals; a language with no scored words gets 0.0 everywhere
  and words = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["tagging_metrics"]

_DECIMALS = 4


def _per_tag_counts(gold: np.ndarray, predicted: np.ndarray, n_labels: int) -> tuple[np.ndarray, ...]:
    """(true positives, predicted count, gold count) per tag id."""
    correct = gold == predicted
    true_positives = np.bincount(gold[correct], minlength=n_labels)
    predicted_count = np.bincount(predicted[predicted >= 0], minlength=n_labels)
    gold_count = np.bincount(gold, minlength=n_labels)
    return true_positives, predicted_count, gold_count


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


_METRICS = ("accuracy", "precision", "recall", "f1")


def _raw_scores(gold: np.ndarray, predicted: np.ndarray, n_labels: int) -> dict[str, float]:
    """Unrounded metrics of one group of words (0.0 for an empty group)."""
    if gold.size == 0:
        return dict.fromkeys(_METRICS, 0.0)
    true_positives, predicted_count, gold_count = _per_tag_counts(gold, predicted, n_labels)
    present = (predicted_count > 0) | (gold_count > 0)
    precision = _safe_divide(true_positives, predicted_count)
    recall = _safe_divide(true_positives, gold_count)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {
        "accuracy": float(true_positives.sum() / gold.size),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
    }


def _rounded(scores: dict[str, float], **counts: int) -> dict[str, float | int]:
    return {**{metric: round(scores[metric], _DECIMALS) for metric in _METRICS}, **counts}


def _per_tag(gold: np.ndarray, predicted: np.ndarray, label_names: Sequence[str]) -> dict[str, dict]:
    n_labels = len(label_names)
    true_positives, predicted_count, gold_count = _per_tag_counts(gold, predicted, n_labels)
    precision = _safe_divide(true_positives, predicted_count)
    recall = _safe_divide(true_positives, gold_count)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    return {
        name: {
            "precision": round(float(precision[i]), _DECIMALS),
            "recall": round(float(recall[i]), _DECIMALS),
            "f1": round(float(f1[i]), _DECIMALS),
            "support": int(gold_count[i]),
        }
        for i, name in enumerate(label_names)
        if gold_count[i] > 0 or predicted_count[i] > 0
    }


def _checked_pairs(
    gold: Sequence[np.ndarray], predicted: Sequence[np.ndarray], languages: Sequence[str], n_labels: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each sample's (gold, predicted) with unscored words dropped, after checking shapes and ids."""
    if not len(gold) == len(predicted) == len(languages):
        raise ValueError(f"{len(gold)} gold, {len(predicted)} predicted and {len(languages)} language entries")
    pairs = []
    for index, (gold_row, predicted_row) in enumerate(zip(gold, predicted)):
        gold_row = np.asarray(gold_row, dtype=np.int64).reshape(-1)
        predicted_row = np.asarray(predicted_row, dtype=np.int64).reshape(-1)
        if gold_row.shape != predicted_row.shape:
            raise ValueError(f"sample {index}: {gold_row.size} gold words but {predicted_row.size} predictions")
        scored = gold_row >= 0
        gold_row, predicted_row = gold_row[scored], predicted_row[scored]
        if (gold_row >= n_labels).any():
            raise ValueError(f"sample {index}: gold label id {gold_row.max()} outside the {n_labels} label names")
        if ((predicted_row < -1) | (predicted_row >= n_labels)).any():
            raise ValueError(f"sample {index}: predicted label id outside -1 and 0..{n_labels - 1}")
        pairs.append((gold_row, predicted_row))
    return pairs


def tagging_metrics(
    gold: Sequence[np.ndarray],
    predicted: Sequence[np.ndarray],
    languages: Sequence[str],
    label_names: Sequence[str],
) -> dict:
    """Accuracy and macro precision / recall / f1 of word tags, per language and overall.

    ``gold[i]``, ``predicted[i]`` and ``languages[i]`` describe sample i. Returns
    {"per_language": {lang: {...}}, "average": {...}, "overall": {...}, "per_tag": {name: {...}}}.
    """
    n_labels = len(label_names)
    pairs = _checked_pairs(gold, predicted, languages, n_labels)
    empty = np.zeros(0, dtype=np.int64)

    by_language: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for language, pair in zip(languages, pairs):
        by_language.setdefault(language, []).append(pair)

    def pooled(selected: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if not selected:
            return empty, empty
        return np.concatenate([g for g, _ in selected]), np.concatenate([p for _, p in selected])

    raw: dict[str, tuple[dict[str, float], int]] = {}
    for language, rows in sorted(by_language.items()):
        language_gold, language_predicted = pooled(rows)
        raw[language] = (_raw_scores(language_gold, language_predicted, n_labels), int(language_gold.size))
    per_language = {language: _rounded(scores, words=words) for language, (scores, words) in raw.items()}
    # Languages without a scored word have no defined score; averaging their zeros in would
    # pull the mean down for a reason that says nothing about the model. The mean is taken
    # before rounding, so it does not inherit the per-language rounding error.
    scored = [(scores, words) for scores, words in raw.values() if words > 0]
    mean = {metric: float(np.mean([scores[metric] for scores, _ in scored])) if scored else 0.0 for metric in _METRICS}
    average = _rounded(mean, languages=len(scored), words=sum(words for _, words in scored))

    all_gold, all_predicted = pooled(pairs)
    return {
        "per_language": per_language,
        "average": average,
        "overall": _rounded(_raw_scores(all_gold, all_predicted, n_labels), words=int(all_gold.size)),
        "per_tag": _per_tag(all_gold, all_predicted, label_names),
    }
